"""The dynamic batcher's rules, with a fake backend gated by events: no sleeps, no timing."""

from __future__ import annotations

import asyncio
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

from visionserve.service.backends.base import ModelOutputs
from visionserve.service.batching import BatchPolicy, Computed, DynamicBatcher
from visionserve.service.errors import BackendError, DeadlineExceeded, QueueFull


class GatedBackend:
    """Echoes each image's id (its first pixel) as logits; each batch waits for a release."""

    def __init__(self, gated: bool = True) -> None:
        self.batches: list[list[int]] = []
        self.started = threading.Semaphore(0)
        self.release = threading.Semaphore(0)
        self.gated = gated
        self.wrong_rows = False
        self.wrong_embedding_rows = False

    def run(self, batch: np.ndarray) -> ModelOutputs:
        ids = [int(v) for v in batch[:, 0, 0, 0]]
        self.batches.append(ids)
        self.started.release()
        if self.gated:
            self.release.acquire()
        rows = batch.shape[0] - (1 if self.wrong_rows else 0)
        logits = batch[:rows, 0, 0, :1].copy()
        embedding = logits[:-1] if self.wrong_embedding_rows else logits
        return ModelOutputs(logits, embedding * 2)


class Recorder:
    """The batcher's observer: what it reported expiring or rejecting, and the sizes it
    computed."""

    def __init__(self) -> None:
        self.expired_counts: dict[str, int] = {}
        self.rejected_counts: dict[str, int] = {}
        self.sizes: list[int] = []

    def queue_depth(self, images: int) -> None:
        pass

    def expired(self, reason: str, images: int) -> None:
        self.expired_counts[reason] = self.expired_counts.get(reason, 0) + images

    def rejected(self, reason: str, images: int) -> None:
        self.rejected_counts[reason] = self.rejected_counts.get(reason, 0) + images

    def batch_done(self, size: int, queue_waits_s: list[float], compute_s: float) -> None:
        self.sizes.append(size)


def images(*ids: int) -> list[np.ndarray]:
    return [np.full((1, 2, 2), i, dtype=np.float32) for i in ids]


async def started(backend: GatedBackend) -> None:
    await asyncio.to_thread(backend.started.acquire)


def make(backend: GatedBackend, **policy: object) -> tuple[DynamicBatcher, Recorder]:
    rec = Recorder()
    args = {"max_batch_size": 4, "max_queue_size": 16, **policy}
    batcher = DynamicBatcher("model m version 1", backend.run, BatchPolicy(**args),
                             ThreadPoolExecutor(2), rec)
    batcher.start()
    return batcher, rec


def ids_of(out: Computed) -> list[int]:
    return [int(v) for v in out.outputs.logits[:, 0]]


async def test_a_lone_request_runs_at_once_without_waiting_for_company():
    backend = GatedBackend(gated=False)
    batcher, rec = make(backend)
    out = await batcher.submit(images(7), None)
    assert ids_of(out) == [7] and backend.batches == [[7]]
    await batcher.close()


async def test_arrivals_during_compute_form_the_next_batch_and_each_gets_its_own_rows():
    backend = GatedBackend()
    batcher, rec = make(backend)
    first = asyncio.create_task(batcher.submit(images(1), None))
    await started(backend)  # batch [1] is computing; the next three queue up behind it
    rest = [asyncio.create_task(batcher.submit(images(i, i + 10), None)) for i in (2, 3)]
    last = asyncio.create_task(batcher.submit(images(4), None))
    await asyncio.sleep(0)
    backend.release.release()
    await started(backend)
    backend.release.release()
    # 2 + 2 images fit max_batch_size 4; request 4 waits for the batch after
    await started(backend)
    backend.release.release()
    assert ids_of(await first) == [1]
    assert [ids_of(await t) for t in rest] == [[2, 12], [3, 13]]
    assert ids_of(await last) == [4]
    assert backend.batches == [[1], [2, 12, 3, 13], [4]]
    assert rec.sizes == [1, 4, 1]
    await batcher.close()


async def test_a_request_larger_than_max_batch_size_is_split_in_order_and_stitched_back():
    backend = GatedBackend(gated=False)
    batcher, _ = make(backend, max_batch_size=3)
    out = await batcher.submit(images(*range(8)), None)
    assert ids_of(out) == list(range(8))
    assert backend.batches == [[0, 1, 2], [3, 4, 5], [6, 7]]
    await batcher.close()


async def test_a_full_queue_refuses_with_queue_full_and_keeps_serving():
    backend = GatedBackend()
    batcher, rec = make(backend, max_queue_size=4)
    busy = asyncio.create_task(batcher.submit(images(1), None))
    await started(backend)
    queued = asyncio.create_task(batcher.submit(images(2, 3, 4), None))
    await asyncio.sleep(0)
    with pytest.raises(QueueFull, match="model m version 1: queue full"):
        await batcher.submit(images(5, 6), None)
    assert rec.rejected_counts == {"queue_full": 2}
    backend.gated = False
    backend.release.release()
    assert ids_of(await busy) == [1] and ids_of(await queued) == [2, 3, 4]
    assert ids_of(await batcher.submit(images(5, 6), None)) == [5, 6]
    await batcher.close()


async def a_batcher_that_learned_50_ms_per_image(backend: GatedBackend,
                                                 ) -> tuple[DynamicBatcher, Recorder]:
    """A batch-1 batcher whose first batch computed for at least 50 ms: its drain-rate
    estimate (what admission uses) is >= 50 ms per image. The backend stays gated."""
    batcher, rec = make(backend, max_batch_size=1)
    first = asyncio.create_task(batcher.submit(images(1), None))
    await started(backend)
    await asyncio.sleep(0.05)  # only lengthens the batch; nothing asserts on time
    backend.release.release()
    await first
    return batcher, rec


async def test_a_deadline_the_queue_cannot_meet_is_refused_at_admission():
    backend = GatedBackend()
    batcher, rec = await a_batcher_that_learned_50_ms_per_image(backend)
    busy = asyncio.create_task(batcher.submit(images(2), None))
    await started(backend)
    queued = asyncio.create_task(batcher.submit(images(3, 4), None))
    await asyncio.sleep(0)
    # 2 images queued ahead at >= 50 ms each cannot finish within 10 ms: refused, not queued
    with pytest.raises(QueueFull, match="model m version 1: overloaded for this deadline: 2 "
                                        "images are queued ahead"):
        await batcher.submit(images(5), time.monotonic() + 0.01)
    patient = asyncio.create_task(batcher.submit(images(6), time.monotonic() + 600))
    backend.gated = False
    backend.release.release()
    assert ids_of(await busy) == [2] and ids_of(await queued) == [3, 4]
    assert ids_of(await patient) == [6]
    assert rec.rejected_counts == {"deadline_unreachable": 1}
    assert [b for b in backend.batches] == [[1], [2], [3], [4], [6]]
    await batcher.close()


async def test_a_stale_slow_estimate_never_refuses_a_request_with_nothing_queued_ahead():
    backend = GatedBackend()
    batcher, rec = await a_batcher_that_learned_50_ms_per_image(backend)
    backend.gated = False
    # nothing is queued: a 10 ms deadline is admitted, and the batch refreshes the estimate
    assert ids_of(await batcher.submit(images(2), time.monotonic() + 0.01)) == [2]
    assert rec.rejected_counts == {}
    await batcher.close()


async def test_expired_work_is_dropped_before_compute_and_reported():
    backend = GatedBackend()
    batcher, rec = make(backend)
    busy = asyncio.create_task(batcher.submit(images(1), None))
    await started(backend)
    doomed = asyncio.create_task(batcher.submit(images(2), time.monotonic() + 0.01))
    alive = asyncio.create_task(batcher.submit(images(3), None))
    await asyncio.sleep(0.02)  # only lets the deadline pass; nothing asserts on time
    backend.gated = False
    backend.release.release()
    with pytest.raises(DeadlineExceeded, match="before compute"):
        await doomed
    assert ids_of(await busy) == [1] and ids_of(await alive) == [3]
    assert backend.batches == [[1], [3]]
    assert rec.expired_counts == {"deadline": 1}
    await batcher.close()


async def test_a_cancelled_request_is_dropped_not_computed():
    backend = GatedBackend()
    batcher, rec = make(backend)
    busy = asyncio.create_task(batcher.submit(images(1), None))
    await started(backend)
    gone = asyncio.create_task(batcher.submit(images(2, 22), None))
    await asyncio.sleep(0)
    gone.cancel()
    backend.gated = False
    backend.release.release()
    await busy
    assert ids_of(await batcher.submit(images(3), None)) == [3]
    assert backend.batches == [[1], [3]]
    assert rec.expired_counts == {"cancelled": 2}
    await batcher.close()


async def test_max_queue_delay_lets_an_idle_instance_wait_for_the_preferred_size():
    backend = GatedBackend(gated=False)
    batcher, _ = make(backend, max_queue_delay_ms=60_000, preferred_batch_sizes=(3,))
    tasks = [asyncio.create_task(batcher.submit(images(i), None)) for i in range(3)]
    assert [ids_of(await t) for t in tasks] == [[0], [1], [2]]
    assert backend.batches == [[0, 1, 2]]
    await batcher.close()


async def test_a_backend_returning_the_wrong_row_count_fails_that_batch_only():
    backend = GatedBackend(gated=False)
    batcher, _ = make(backend)
    backend.wrong_rows = True
    with pytest.raises(BackendError, match="returned 1 logits rows and 1 embedding rows for a "
                                           "batch of 2"):
        await batcher.submit(images(1, 2), None)
    backend.wrong_rows = False
    assert ids_of(await batcher.submit(images(3), None)) == [3]
    await batcher.close()


async def test_an_embedding_with_the_wrong_row_count_is_an_error_not_a_silent_slice():
    backend = GatedBackend(gated=False)
    batcher, _ = make(backend)
    backend.wrong_embedding_rows = True
    with pytest.raises(BackendError, match="returned 2 logits rows and 1 embedding rows"):
        await batcher.submit(images(1, 2), None)
    backend.wrong_embedding_rows = False
    assert ids_of(await batcher.submit(images(3), None)) == [3]
    await batcher.close()


class FailingObserver(Recorder):
    """An observer that raises while the worker takes a batch: a bug inside the batcher."""

    def __init__(self, failures: int) -> None:
        super().__init__()
        self.failures = failures

    def queue_depth(self, images: int) -> None:
        if self.failures and images == 0:  # raised by _take, after the batch left the queue
            self.failures -= 1
            raise RuntimeError("observer bug")


async def test_a_worker_error_answers_its_batch_instead_of_leaving_it_hanging():
    backend = GatedBackend(gated=False)
    observer = FailingObserver(failures=1)
    batcher = DynamicBatcher("model m version 1", backend.run,
                             BatchPolicy(max_batch_size=4, max_queue_size=16),
                             ThreadPoolExecutor(1), observer)
    batcher.start()
    # wait_for only guards against the hang this test is about; nothing here is timed
    with pytest.raises(BackendError, match="the batcher failed \\(RuntimeError\\)"):
        await asyncio.wait_for(batcher.submit(images(1), None), 60)
    assert ids_of(await asyncio.wait_for(batcher.submit(images(2), None), 60)) == [2]
    await batcher.close()


async def test_close_drains_queued_and_computing_work():
    backend = GatedBackend()
    batcher, _ = make(backend)
    tasks = [asyncio.create_task(batcher.submit(images(i), None)) for i in range(3)]
    await started(backend)
    closing = asyncio.create_task(batcher.close())
    await asyncio.sleep(0)
    backend.gated = False
    backend.release.release()
    await closing
    assert [ids_of(t.result()) for t in tasks] == [[0], [1], [2]]
