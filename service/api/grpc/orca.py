"""Per-call ORCA load reports, for gRPC clients that balance on load (``--orca-load-reports``).

Every unary reply carries the trailing metadata ``endpoint-load-metrics-bin``: an
``xds.data.orca.v3.OrcaLoadReport`` (gRFC A51) with the server's engine utilization
(``application_utilization``: ``visionserve_engine_utilization`` without labels) and its recent
call rate (``rps_fractional``). gRPC's client-side ``weighted_round_robin`` policy (gRFC A58;
grpcio, grpc-go, grpc-java, Envoy's client_side_weighted_round_robin) weighs each server by
rate ÷ utilization, so a busier replica gets fewer calls (docs/deploy.md, measured).

The report is rebuilt at most every ``REFRESH_S`` (a scrape of the utilization costs a lock and
a walk over the window); between rebuilds each call reuses the same bytes.
"""

from __future__ import annotations

import struct
import time
from collections.abc import Callable

from ...utilization import UtilizationCollector

KEY = "endpoint-load-metrics-bin"
REFRESH_S = 0.25
Metadata = tuple[tuple[str, bytes], ...]


def encode(application_utilization: float, rps: float) -> bytes:
    """An OrcaLoadReport with rps_fractional (field 6) and application_utilization (field 9),
    both doubles: the two fields the weighted_round_robin policy reads."""
    return (struct.pack("<Bd", (6 << 3) | 1, rps)
            + struct.pack("<Bd", (9 << 3) | 1, application_utilization))


class LoadReports:
    def __init__(self, utilization: UtilizationCollector,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self._utilization = utilization
        self._clock = clock
        self._calls = 0
        self._counted = 0  # calls at the last rebuild
        self._since = clock()
        self._metadata: Metadata = ((KEY, encode(0.0, 0.0)),)

    def metadata(self) -> Metadata:
        """The trailing metadata of one more call (event loop only)."""
        self._calls += 1
        now = self._clock()
        if now - self._since >= REFRESH_S:
            rps = (self._calls - self._counted) / (now - self._since)
            self._counted, self._since = self._calls, now
            self._metadata = ((KEY, encode(self._utilization.server_utilization(), rps)),)
        return self._metadata
