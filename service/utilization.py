"""How busy the engines are: the load signal for an autoscaler or a balancer.

Each served version's ``BusyTime`` follows how many of its engine instances compute a batch at
each moment (the batcher reports every change). From it, at each scrape:

- ``visionserve_engine_utilization{model,version}``: the fraction of the last ``WINDOW_S``
  seconds its instances spent computing: busy instance-seconds ÷ (window × ``instance_count``).
  It grows in proportion to the offered load while the engine keeps up, and reaches 1.0 when
  every instance computes all the time, which is when throughput stops growing
  (docs/metrics.md shows it measured beside throughput, p99 and queue depth).
- ``visionserve_engine_utilization`` without labels: the same over the whole server (the busy
  instance-seconds of every version ÷ the window × all their instances).
- ``visionserve_engine_busy_seconds_total{model,version}``: the integral, so that PromQL can
  take ``rate()`` over any window (÷ ``instance_count`` = utilization).

CPU percent cannot tell a server that keeps up from a saturated one (the engine's threads keep
the cores busy either way), and queue depth reads 0 until the engine saturates.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Callable, Iterator

from prometheus_client.metrics_core import Metric
from prometheus_client.registry import Collector

WINDOW_S = 10.0
UTILIZATION = "visionserve_engine_utilization"
BUSY_SECONDS = "visionserve_engine_busy_seconds"


class BusyTime:
    """Busy instances of one version over time. ``set_busy`` from the event loop; the readings
    from any thread (a scrape)."""

    def __init__(self, instances: int, window_s: float = WINDOW_S,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.instances = max(1, instances)
        self.window_s = window_s
        self._clock = clock
        self._lock = threading.Lock()
        self._start = clock()
        # (time, busy instance-seconds up to it, instances busy from it on), oldest first
        self._changes: deque[tuple[float, float, int]] = deque([(self._start, 0.0, 0)])

    def set_busy(self, instances: int) -> None:
        with self._lock:
            now = self._clock()
            self._changes.append((now, self._area_at(now), instances))
            horizon = now - self.window_s
            while len(self._changes) > 1 and self._changes[1][0] <= horizon:
                self._changes.popleft()  # the one before the horizon stays: it covers it

    def busy_seconds(self) -> float:
        """Busy instance-seconds since the version started counting."""
        with self._lock:
            return self._area_at(self._clock())

    def busy_over_window(self) -> tuple[float, float]:
        """(busy instance-seconds, instance-seconds available) over the last window (shorter
        while the version is younger than it)."""
        with self._lock:
            now = self._clock()
            since = max(now - self.window_s, self._start)
            return (self._area_at(now) - self._area_at(since),
                    (now - since) * self.instances)

    def _area_at(self, at: float) -> float:
        for t, area, busy in reversed(self._changes):
            if t <= at:
                return area + busy * (at - t)
        return 0.0


class UtilizationCollector(Collector):
    """The utilization series of every version being counted (``add`` once routed, ``remove``
    once released), computed at each scrape."""

    def __init__(self) -> None:
        self._versions: dict[tuple[str, str], BusyTime] = {}
        self._lock = threading.Lock()

    def add(self, model: str, version: str, busy: BusyTime) -> None:
        with self._lock:
            self._versions[(model, version)] = busy

    def remove(self, model: str, version: str, busy: BusyTime) -> None:
        """Drop ``busy``'s series, unless a reload of the same version replaced it already."""
        with self._lock:
            if self._versions.get((model, version)) is busy:
                del self._versions[(model, version)]

    def server_utilization(self) -> float:
        """The whole server's utilization (the series without labels)."""
        with self._lock:
            versions = list(self._versions.values())
        windows = [busy.busy_over_window() for busy in versions]
        return _fraction(sum(w[0] for w in windows), sum(w[1] for w in windows))

    def collect(self) -> Iterator[Metric]:
        with self._lock:
            versions = sorted(self._versions.items())
        gauge = Metric(UTILIZATION, "Fraction of the last 10 s the engine instances spent "
                                    "computing (busy instance-seconds / (10 s x "
                                    "instance_count)); without labels: the whole server.",
                       "gauge")
        total = Metric(BUSY_SECONDS, "Instance-seconds the engine spent computing batches "
                                     "(rate() / instance_count = utilization).", "counter")
        busy_sum = available_sum = 0.0
        for (model, version), busy in versions:
            used, available = busy.busy_over_window()
            busy_sum += used
            available_sum += available
            labels = {"model": model, "version": version}
            gauge.add_sample(UTILIZATION, labels, _fraction(used, available))
            total.add_sample(BUSY_SECONDS + "_total", labels, busy.busy_seconds())
        gauge.add_sample(UTILIZATION, {}, _fraction(busy_sum, available_sum))
        yield gauge
        yield total


def _fraction(used: float, available: float) -> float:
    return min(1.0, used / available) if available > 0 else 0.0
