"""The dynamic batcher: one per model version, between the API layer and the backend.

Rules (DESIGN §5, STYLE §6):
- When an instance is idle, whatever is queued (up to ``max_batch_size`` images) runs at once;
  while it computes, arrivals accumulate into the next batch. ``max_queue_delay_ms`` only lets an
  idle instance wait for more work (the window starts at the oldest queued request), up to the
  largest preferred batch size; with 0 a lone request never waits for company.
- The queue is bounded in images; a request that does not fit is refused with QueueFull, at
  once. So is a request with a deadline when the images queued ahead of it cannot be computed
  before that deadline at the recent compute rate (``reject_unreachable_deadlines``): under
  overload, the excess is refused in microseconds instead of timing out in the queue.
- Expired (deadline passed) and cancelled requests are dropped before compute and reported.
- A request's images stay together, in order; a request larger than ``max_batch_size`` is split
  into consecutive chunks, and its outputs are stitched back in order.
- The backend's output row count is checked against the batch; every future is finished through
  "if not done" helpers so that none can hang.
- The loop wakes on events, never polls; time comes from the monotonic clock (injected: tests
  pass a fake one and move it by hand).

The batcher knows no gRPC and no Prometheus: it reports through a ``BatchObserver``.
"""

from __future__ import annotations

import asyncio
import contextvars
import enum
import logging
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import Executor
from dataclasses import dataclass
from typing import Protocol

import numpy as np

from ..errors import BackendError, DeadlineExceeded, ModelUnavailable, QueueFull, VisionServeError
from ..logs import REQUEST_ID
from .backends.base import ModelOutputs

log = logging.getLogger(__name__)


class Expiry(enum.StrEnum):
    """Why queued images were dropped before compute (the value is the metric's label)."""

    DEADLINE = "deadline"  # the request's deadline passed while it waited
    CANCELLED = "cancelled"  # the client went away


class Rejection(enum.StrEnum):
    """Why a request was refused at the queue (the value is the metric's label)."""

    QUEUE_FULL = "queue_full"
    DEADLINE_UNREACHABLE = "deadline_unreachable"  # the queue ahead outlasts its deadline


class BatchObserver(Protocol):
    """What the batcher reports; a version's accounting (``accounting``) implements it."""

    def queue_depth(self, images: int) -> None: ...

    def expired(self, reason: Expiry, images: int) -> None: ...

    def rejected(self, reason: Rejection, images: int) -> None: ...

    def batch_done(self, size: int, queue_waits_s: list[float], compute_s: float) -> None: ...

    def busy(self, instances: int) -> None: ...  # instances computing a batch, at each change


class NullObserver:
    def queue_depth(self, images: int) -> None:
        pass

    def expired(self, reason: Expiry, images: int) -> None:
        pass

    def rejected(self, reason: Rejection, images: int) -> None:
        pass

    def batch_done(self, size: int, queue_waits_s: list[float], compute_s: float) -> None:
        pass

    def busy(self, instances: int) -> None:
        pass


@dataclass(frozen=True, kw_only=True)
class BatchPolicy:
    max_batch_size: int
    max_queue_size: int  # images
    max_queue_delay_ms: float = 0.0
    preferred_batch_sizes: tuple[int, ...] = ()
    instances: int = 1  # batches computed concurrently
    reject_unreachable_deadlines: bool = True


@dataclass(frozen=True, slots=True)
class Computed:
    """One request's outputs, with where its time went (for statistics)."""

    outputs: ModelOutputs
    queue_s: float  # the longest wait of its chunks
    compute_s: float  # summed compute time of the batches its chunks ran in


@dataclass(slots=True)
class _Work:
    images: list[np.ndarray]
    future: asyncio.Future[Computed]
    deadline: float | None  # the batcher's clock, seconds
    enqueued: float
    request_id: str  # for the log line of a failed batch


RunBatch = Callable[[np.ndarray], ModelOutputs]
Assemble = Callable[[list[np.ndarray]], np.ndarray]  # prepared images → the batch tensor


class DynamicBatcher:
    """Queue + ``instances`` worker tasks. Create, ``start()``, ``submit()`` many, ``close()``."""

    def __init__(self, name: str, run: RunBatch, policy: BatchPolicy, executor: Executor,
                 observer: BatchObserver | None = None, assemble: Assemble = np.stack,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.name = name  # "model M version V", used in every message
        self._clock = clock  # deadlines, queue waits and the drain-rate estimate use it
        self._run = run
        self._assemble = assemble
        self._policy = policy
        self._executor = executor
        self._observer = observer or NullObserver()
        self._queue: deque[_Work] = deque()
        self._queued_images = 0
        self._computing = 0
        self._has_work = asyncio.Event()
        self._arrived = asyncio.Event()
        self._changed = asyncio.Condition()
        self._workers: list[asyncio.Task[None]] = []
        self._closed = False
        # recent seconds per image one instance takes to drain the queue (EWMA): measured
        # batch end to batch end while the queue never ran dry, else over the batch alone
        self._image_s: float | None = None

    @property
    def queued_images(self) -> int:
        return self._queued_images

    def start(self) -> None:
        for i in range(self._policy.instances):
            # a fresh context: not the request id of whichever call happened to load the model
            self._workers.append(asyncio.create_task(self._worker(), name=f"{self.name}#{i}",
                                                     context=contextvars.Context()))

    async def submit(self, images: list[np.ndarray], deadline: float | None) -> Computed:
        """Queue one request's images (each prepared for ``assemble``: by default float32
        [C, H, W]); return their outputs in order."""
        n, cap = len(images), self._policy.max_queue_size
        if self._closed:
            raise ModelUnavailable(f"{self.name} is unloading; retry (a newer version, if any, "
                                   "takes new requests)")
        if n > cap:
            self._observer.rejected(Rejection.QUEUE_FULL, n)
            raise QueueFull(f"{self.name}: a request of {n} images can never fit the queue of "
                            f"{cap} images; send at most {cap} per request or raise "
                            "batching.max_queue_size")
        if self._queued_images + n > cap:
            self._observer.rejected(Rejection.QUEUE_FULL, n)
            raise QueueFull(f"{self.name}: queue full ({self._queued_images} of {cap} images "
                            "waiting); retry with backoff, add capacity, or raise "
                            "batching.max_queue_size")
        now = self._clock()
        if deadline is not None and deadline <= now:
            self._observer.expired(Expiry.DEADLINE, n)
            raise DeadlineExceeded(f"{self.name}: the deadline passed before the request was "
                                   "queued; allow more time")
        if deadline is not None and self._image_s is not None and self._queued_images \
                and self._policy.reject_unreachable_deadlines:
            # only the queue ahead counts: with nothing queued a request is always admitted, so
            # a stale (too slow) estimate cannot lock traffic out, and batches keep refreshing it
            wait_s = self._queued_images * self._image_s / self._policy.instances
            if now + wait_s > deadline:
                self._observer.rejected(Rejection.DEADLINE_UNREACHABLE, n)
                raise QueueFull(
                    f"{self.name}: overloaded for this deadline: {self._queued_images} images "
                    f"are queued ahead, about {wait_s * 1000:.0f} ms of compute, but the "
                    f"deadline is in {(deadline - now) * 1000:.0f} ms; refused now rather than "
                    "dropped later. Retry with backoff or a longer deadline, or add capacity")
        loop = asyncio.get_running_loop()
        step = self._policy.max_batch_size
        rid = REQUEST_ID.get()
        chunks = [_Work(images[i:i + step], loop.create_future(), deadline, now, rid)
                  for i in range(0, n, step)]
        self._queue.extend(chunks)
        self._queued_images += n
        self._observer.queue_depth(self._queued_images)
        self._has_work.set()
        self._arrived.set()
        try:
            parts = [await w.future for w in chunks]
        finally:
            for w in chunks:  # on failure or cancel, the request's other chunks are dropped
                if w.future.done() and not w.future.cancelled():
                    w.future.exception()  # retrieved: no "never retrieved" warning
                w.future.cancel()
        if len(parts) == 1:
            return parts[0]
        return Computed(ModelOutputs(np.concatenate([p.outputs.logits for p in parts]),
                                     np.concatenate([p.outputs.embedding for p in parts])),
                        queue_s=max(p.queue_s for p in parts),
                        compute_s=sum(p.compute_s for p in parts))

    async def close(self) -> None:
        """Stop taking requests, finish everything queued or computing, stop the workers."""
        self._closed = True
        async with self._changed:
            await self._changed.wait_for(lambda: not self._queue and not self._computing)
        for task in self._workers:
            task.cancel()
        await asyncio.gather(*self._workers, return_exceptions=True)

    async def _worker(self) -> None:
        last_end: float | None = None  # when this instance's previous batch ended
        failures = 0  # consecutive worker errors: each one backs off longer
        while True:
            if not self._has_work.is_set():
                last_end = None  # idle: the next cycle is not back to back
            await self._has_work.wait()
            batch: list[_Work] = []
            try:
                if self._policy.max_queue_delay_ms > 0:
                    await self._wait_for_company()
                begin = self._clock()
                self._take(batch)
                if not self._queue:
                    self._has_work.clear()
                if batch:
                    self._computing += 1
                    self._observer.busy(self._computing)
                    try:
                        ok = await self._compute(batch)
                    finally:
                        self._computing -= 1
                        self._observer.busy(self._computing)
                    end = self._clock()
                    if ok:
                        self._learn((end - (last_end or begin)) / sum(len(w.images)
                                                                      for w in batch))
                    last_end = end
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # a bug here must not stop the model serving
                # the batch it held is answered (never left hanging), and a fault that repeats
                # cannot spin the event loop: each consecutive one waits twice as long (<= 1 s)
                failures += 1
                log.exception("%s: batcher worker error (%d in a row); its batch of %d requests "
                              "gets INTERNAL", self.name, failures, len(batch))
                error = BackendError(f"{self.name}: the batcher failed ({type(exc).__name__}) "
                                     "on the batch this request was in; see the server log. "
                                     "Retry: the model keeps serving")
                for w in batch:
                    _fail(w.future, error)
                await asyncio.sleep(min(0.01 * 2 ** failures, 1.0))
            else:
                failures = 0
            async with self._changed:
                self._changed.notify_all()

    async def _wait_for_company(self) -> None:
        """Idle instance, delay configured: wait until the target size or the window's end."""
        preferred = self._policy.preferred_batch_sizes
        target = max(preferred) if preferred else self._policy.max_batch_size
        window_end = self._queue[0].enqueued + self._policy.max_queue_delay_ms / 1000 \
            if self._queue else self._clock()
        while self._queue and self._queued_images < target:
            remaining = window_end - self._clock()
            if remaining <= 0:
                return
            self._arrived.clear()
            try:
                await asyncio.wait_for(self._arrived.wait(), remaining)
            except TimeoutError:
                return

    def _take(self, batch: list[_Work]) -> None:
        """Pop the next batch into ``batch`` in FIFO order, dropping cancelled and expired work
        first. Filled in place: whatever left the queue is the caller's to answer, even if
        something here raises half-way."""
        size = 0
        now = self._clock()
        while self._queue:
            work = self._queue[0]
            n = len(work.images)
            if work.future.done():  # cancelled by the client or its request's other chunk
                self._pop(n)
                self._observer.expired(Expiry.CANCELLED, n)
                continue
            if work.deadline is not None and work.deadline <= now:
                self._pop(n)
                self._observer.expired(Expiry.DEADLINE, n)
                _fail(work.future, DeadlineExceeded(
                    f"{self.name}: the deadline passed after {now - work.enqueued:.3f} s in the "
                    "queue, before compute; the work was dropped. Allow more time or reduce "
                    "load"))
                continue
            if size + n > self._policy.max_batch_size:
                break
            self._pop(n)
            batch.append(work)
            size += n
        self._observer.queue_depth(self._queued_images)

    def _pop(self, n: int) -> None:
        self._queue.popleft()
        self._queued_images -= n

    def _learn(self, per_image_s: float) -> None:
        self._image_s = per_image_s if self._image_s is None \
            else 0.8 * self._image_s + 0.2 * per_image_s

    async def _compute(self, batch: list[_Work]) -> bool:
        """Run one batch and finish its futures; False when it failed."""
        size = sum(len(w.images) for w in batch)
        started = self._clock()
        waits = [started - w.enqueued for w in batch for _ in w.images]
        loop = asyncio.get_running_loop()
        images = [img for w in batch for img in w.images]
        try:
            outputs, compute_s = await loop.run_in_executor(self._executor, self._run_timed,
                                                            images)
            rows = (len(outputs.logits), len(outputs.embedding))
            if rows != (size, size):
                raise BackendError(f"{self.name}: the backend returned {rows[0]} logits rows and "
                                   f"{rows[1]} embedding rows for a batch of {size} images")
        except Exception as exc:
            ids = ", ".join(sorted({w.request_id for w in batch}))
            if isinstance(exc, VisionServeError):
                log.error("%s: batch of %d images failed (requests %s): %s", self.name, size,
                          ids, exc)
            else:
                log.exception("%s: inference failed on a batch of %d images (requests %s); "
                              "they get INTERNAL, the next batch runs", self.name, size, ids)
                exc = BackendError(f"{self.name}: inference failed ({type(exc).__name__}) on "
                                   f"the batch this request was in; see the server log. Retry: "
                                   "the model keeps serving")
            for w in batch:
                _fail(w.future, exc)
            return False
        offset = 0
        for w in batch:
            n = len(w.images)
            _resolve(w.future, Computed(outputs.rows(offset, offset + n), started - w.enqueued,
                                        compute_s))
            offset += n
        self._observer.batch_done(size, waits, compute_s)
        return True

    def _run_timed(self, images: list[np.ndarray]) -> tuple[ModelOutputs, float]:
        """Executor thread: one pass that assembles the batch, then the engine."""
        batch = self._assemble(images)
        start = time.perf_counter()
        outputs = self._run(batch)
        return outputs, time.perf_counter() - start


def _resolve(future: asyncio.Future[Computed], value: Computed) -> None:
    if not future.done():
        future.set_result(value)


def _fail(future: asyncio.Future[Computed], exc: BaseException) -> None:
    if not future.done():
        future.set_exception(exc)
