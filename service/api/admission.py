"""Admission: which calls get in, and the drain that shutdown waits on.

From STOPPING on, new calls are refused UNAVAILABLE; at most ``--max-inflight-requests``
inference requests run at once (more are refused RESOURCE_EXHAUSTED at once, while health and
metadata calls still pass); a model name that could not name a repository folder is refused
INVALID_ARGUMENT before anything looks it up.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from contextlib import contextmanager

from ..errors import InvalidInput, ModelUnavailable, ServerBusy
from ..lifecycle import Lifecycle
from ..logs import printable
from .methods import INFERENCE_METHODS

MAX_MODEL_NAME = 256


class Admission:
    def __init__(self, lifecycle: Lifecycle, max_inference: int = 0) -> None:
        self._lifecycle = lifecycle
        self._max_inference = max_inference  # 0 = no limit
        self._inference = 0  # inference requests admitted and not yet finished
        self._running = 0  # requests of any kind inside ``admitted`` now
        self._drained = asyncio.Event()
        self._last_refused = 0.0  # time.monotonic() of the last call refused while stopping

    @contextmanager
    def admitted(self, method: str, model: str) -> Iterator[None]:
        """The body runs only if the call is admitted; raises the refusal otherwise."""
        counted = method in INFERENCE_METHODS
        self._running += 1
        self._inference += counted
        try:
            if not self._lifecycle.admitting:
                self._last_refused = time.monotonic()
                raise ModelUnavailable("the server is shutting down and takes no new requests; "
                                       "retry (another replica, or this one once restarted)")
            if counted and self._max_inference and self._inference > self._max_inference:
                raise ServerBusy(f"server busy: {self._max_inference} inference requests are in "
                                 "progress (its --max-inflight-requests); retry with backoff, "
                                 "or add replicas")
            if len(model) > MAX_MODEL_NAME or not model.isprintable() \
                    or any(c in model for c in "/\\") or model in (".", ".."):
                raise InvalidInput(f"model name {printable(model)!r} ({len(model)} chars) is not "
                                   f"a model name: use at most {MAX_MODEL_NAME} printable "
                                   "characters, no path separators (it names a folder of the "
                                   "repository)")
            yield
        finally:
            self._running -= 1
            self._inference -= counted
            if not self._running and not self._lifecycle.admitting:
                self._drained.set()

    async def drain(self, timeout_s: float) -> bool:
        """Once the lifecycle is STOPPING (new requests refused UNAVAILABLE): wait up to
        ``timeout_s`` for the running ones to finish; True when none is left."""
        if self._running == 0:
            return True
        try:
            await asyncio.wait_for(self._drained.wait(), timeout_s)
        except TimeoutError:
            return False
        return True

    async def quiet(self, period_s: float, timeout_s: float) -> None:
        """After ``drain``: keep refusing until no call arrived for ``period_s`` (at most
        ``timeout_s``), so that clients still sending get UNAVAILABLE from us rather than a
        CANCELLED from gRPC's own shutdown racing their calls."""
        end = time.monotonic() + timeout_s
        while (now := time.monotonic()) < end:
            wait = min(self._last_refused + period_s, end) - now
            if wait <= 0:
                return
            await asyncio.sleep(wait)
