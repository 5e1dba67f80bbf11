"""Admission: which calls get in, and the drain that shutdown waits on.

From STOPPING on, new calls are refused UNAVAILABLE (and the refusal's answer held, see
``hold_refusal``); at most ``--max-inflight-requests``
inference requests run at once (more are refused RESOURCE_EXHAUSTED at once, while health and
metadata calls still pass); a model name that could not name a repository folder is refused
INVALID_ARGUMENT before anything looks it up.
"""

from __future__ import annotations

import asyncio
import math
from collections.abc import Iterator
from contextlib import contextmanager

from ..errors import InvalidInput, ServerBusy, ShuttingDown
from ..lifecycle import Lifecycle
from ..logs import printable
from .methods import INFERENCE_METHODS

MAX_MODEL_NAME = 256
# while accepted calls still run, a refusal is answered after at most this long: a client that
# retries at once learns it soon, at a pace that leaves the drain alone
HOLD_S = 0.5
# the end of a drain: calls that clients sent just before it land in a handler (and are held)
SETTLE_S = 0.05
# gRPC's shutdown sends a GOAWAY, then its final one a ping round trip later; the refusals held
# are answered after it, so that a client's retry opens a new connection (to another replica)
GOAWAY_S = 0.25


class Admission:
    def __init__(self, lifecycle: Lifecycle, max_inference: int = 0) -> None:
        self._lifecycle = lifecycle
        self._max_inference = max_inference  # 0 = no limit
        self._inference = 0  # inference requests admitted and not yet finished
        self._running = 0  # requests of any kind inside ``admitted`` now
        self._drained = asyncio.Event()
        self._holding = asyncio.Event()  # the drain is over: refusals wait for the GOAWAY alone
        self._answering = asyncio.Event()  # gRPC has sent its GOAWAY: refusals are answered

    @contextmanager
    def admitted(self, method: str, model: str) -> Iterator[None]:
        """The body runs only if the call is admitted; raises the refusal otherwise."""
        counted = method in INFERENCE_METHODS
        self._running += 1
        self._inference += counted
        try:
            if not self._lifecycle.admitting:
                raise ShuttingDown("the server is shutting down and takes no new requests; "
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

    async def hold_refusal(self, time_left: float | None) -> None:
        """Wait before answering a call refused because the server is stopping, so that the
        client's retry goes to a new connection (another replica) and never into gRPC's own
        shutdown, which answers the calls it receives meanwhile CANCELLED (grpc/grpc#41785):
        while accepted calls still run, at most ``HOLD_S``; once they are done, until gRPC has
        sent clients its GOAWAY (``answer_refusals``). Never past half the client's remaining
        deadline (``time_left``, None: no deadline), so it reads UNAVAILABLE, not
        DEADLINE_EXCEEDED."""
        loop = asyncio.get_running_loop()
        start = loop.time()
        cap = math.inf if time_left is None else time_left / 2
        while not self._answering.is_set():
            holding = self._holding.is_set()
            left = (cap if holding else min(cap, HOLD_S)) - (loop.time() - start)
            if left <= 0:
                return
            try:
                await asyncio.wait_for((self._answering if holding else self._holding).wait(),
                                       left)
            except TimeoutError:
                return

    def hold_refusals(self) -> None:
        """The drain is over: refusals wait for ``answer_refusals`` (or their deadline)."""
        self._holding.set()

    def answer_refusals(self) -> None:
        """gRPC has told its clients to go away (or the grace is over): answer every refusal
        held, and the next."""
        self._answering.set()
        self._holding.set()  # wakes those waiting for the drain's end
