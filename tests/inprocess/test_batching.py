"""The dynamic batcher's rules, with a fake backend gated by semaphores and a fake clock moved
by hand: no sleeps, no timing, nothing that depends on how fast the machine is."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

from visionserve.service.engine.backends.base import ModelOutputs
from visionserve.service.engine.batching import BatchPolicy, Computed, DynamicBatcher
from visionserve.service.errors import BackendError, DeadlineExceeded, ModelUnavailable, QueueFull


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
    computed. The reasons the tests expect ("deadline", "cancelled", "queue_full",
    "deadline_unreachable") are kept literal: they become the ``reason`` label values of
    docs/metrics.md, which dashboards and alerts rely on."""

    def __init__(self) -> None:
        self.expired_counts: dict[str, int] = {}
        self.rejected_counts: dict[str, int] = {}
        self.sizes: list[int] = []
        self.busy_changes: list[int] = []  # instances computing, at each change

    def queue_depth(self, images: int) -> None:
        pass

    def expired(self, reason: str, images: int) -> None:
        self.expired_counts[reason] = self.expired_counts.get(reason, 0) + images

    def rejected(self, reason: str, images: int) -> None:
        self.rejected_counts[reason] = self.rejected_counts.get(reason, 0) + images

    def batch_done(self, size: int, queue_waits_s: list[float], compute_s: float) -> None:
        self.sizes.append(size)

    def busy(self, instances: int) -> None:
        self.busy_changes.append(instances)


def images(*ids: int) -> list[np.ndarray]:
    return [np.full((1, 2, 2), i, dtype=np.float32) for i in ids]


class FakeClock:
    """The batcher's clock: it moves only when a test says so."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds

    def after(self, seconds: float) -> float:
        """A deadline ``seconds`` from now."""
        return self.now + seconds


async def started(backend: GatedBackend) -> None:
    """Until one more batch is inside the backend."""
    await asyncio.to_thread(backend.started.acquire)


async def settle() -> None:
    """Let every task that is ready run (submissions reach the queue); no time passes."""
    for _ in range(10):
        await asyncio.sleep(0)


Make = Callable[..., tuple[DynamicBatcher, Recorder]]


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def make(clock: FakeClock) -> Iterator[Make]:
    """Builds batchers on the fake clock; their executors are shut down afterwards."""
    executors: list[ThreadPoolExecutor] = []

    def build(backend: GatedBackend, observer: Recorder | None = None,
              **policy: object) -> tuple[DynamicBatcher, Recorder]:
        rec = observer or Recorder()
        args = {"max_batch_size": 4, "max_queue_size": 16, **policy}
        executors.append(ThreadPoolExecutor(int(args.get("instances", 1)) + 1))
        batcher = DynamicBatcher("model m version 1", backend.run, BatchPolicy(**args),
                                 executors[-1], rec, clock=clock)
        batcher.start()
        return batcher, rec

    yield build
    for executor in executors:
        executor.shutdown(wait=True, cancel_futures=True)


def ids_of(out: Computed) -> list[int]:
    return [int(v) for v in out.outputs.logits[:, 0]]


async def test_a_lone_request_runs_at_once_without_waiting_for_company(make):
    backend = GatedBackend(gated=False)
    batcher, rec = make(backend)
    out = await batcher.submit(images(7), None)
    assert ids_of(out) == [7] and backend.batches == [[7]]
    await batcher.close()


async def test_arrivals_during_compute_form_the_next_batch_and_each_gets_its_own_rows(make):
    backend = GatedBackend()
    batcher, rec = make(backend)
    first = asyncio.create_task(batcher.submit(images(1), None))
    await started(backend)  # batch [1] is computing; the next three queue up behind it
    rest = [asyncio.create_task(batcher.submit(images(i, i + 10), None)) for i in (2, 3)]
    last = asyncio.create_task(batcher.submit(images(4), None))
    await settle()
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


@pytest.mark.parametrize(("max_batch_size", "n", "chunks"), [
    (1, 3, [1, 1, 1]),
    (3, 8, [3, 3, 2]),
    (4, 4, [4]),
    (5, 12, [5, 5, 2]),
])
async def test_a_request_larger_than_max_batch_size_is_split_in_order_and_stitched_back(
        make, max_batch_size, n, chunks):
    backend = GatedBackend(gated=False)
    batcher, rec = make(backend, max_batch_size=max_batch_size)
    out = await batcher.submit(images(*range(n)), None)
    assert ids_of(out) == list(range(n))
    assert [len(b) for b in backend.batches] == chunks == rec.sizes
    assert sum(backend.batches, []) == list(range(n))
    await batcher.close()


@pytest.mark.parametrize("instances", [2, 3])
async def test_each_instance_computes_its_own_batch_at_the_same_time(make, instances):
    backend = GatedBackend()
    batcher, rec = make(backend, instances=instances, max_batch_size=2)
    tasks = []
    for i in range(instances):  # each request reaches an idle instance while the others compute
        tasks.append(asyncio.create_task(batcher.submit(images(i), None)))
        await started(backend)
    # every instance is inside the backend with its own batch; none has ended
    assert sorted(sum(backend.batches, [])) == list(range(instances))
    queued = [asyncio.create_task(batcher.submit(images(10 + i, 20 + i), None))
              for i in range(instances)]
    await settle()
    assert batcher.queued_images == 2 * instances  # all instances busy: the rest waits
    backend.gated = False
    for _ in range(instances):
        backend.release.release()
    assert [ids_of(await t) for t in tasks] == [[i] for i in range(instances)]
    assert [ids_of(await t) for t in queued] == [[10 + i, 20 + i] for i in range(instances)]
    assert sorted(rec.sizes) == [1] * instances + [2] * instances
    # the utilization's input: every instance became busy, and all are idle at the end
    assert max(rec.busy_changes) == instances and rec.busy_changes[-1] == 0
    assert rec.busy_changes[:instances] == list(range(1, instances + 1))
    await batcher.close()


async def test_a_full_queue_refuses_with_queue_full_and_keeps_serving(make):
    backend = GatedBackend()
    batcher, rec = make(backend, max_queue_size=4)
    busy = asyncio.create_task(batcher.submit(images(1), None))
    await started(backend)
    queued = asyncio.create_task(batcher.submit(images(2, 3, 4), None))
    await settle()
    with pytest.raises(QueueFull, match="model m version 1: queue full"):
        await batcher.submit(images(5, 6), None)
    assert rec.rejected_counts == {"queue_full": 2}
    backend.gated = False
    backend.release.release()
    assert ids_of(await busy) == [1] and ids_of(await queued) == [2, 3, 4]
    assert ids_of(await batcher.submit(images(5, 6), None)) == [5, 6]
    await batcher.close()


async def test_a_request_larger_than_the_whole_queue_is_refused_with_what_to_send(make):
    batcher, rec = make(GatedBackend(gated=False), max_queue_size=4)
    with pytest.raises(QueueFull, match="a request of 5 images can never fit the queue of 4 "
                                        "images; send at most 4 per request"):
        await batcher.submit(images(*range(5)), None)
    assert rec.rejected_counts == {"queue_full": 5}
    await batcher.close()


async def a_batcher_that_learned_50_ms_per_image(make, clock: FakeClock, backend: GatedBackend,
                                                 instances: int = 1,
                                                 ) -> tuple[DynamicBatcher, Recorder]:
    """A batch-1 batcher whose first batch took 50 ms on its clock: its drain-rate estimate
    (what admission uses) is 50 ms per image. The backend stays gated."""
    batcher, rec = make(backend, max_batch_size=1, instances=instances)
    first = asyncio.create_task(batcher.submit(images(1), None))
    await started(backend)
    clock.advance(0.05)
    backend.release.release()
    await first
    return batcher, rec


@pytest.mark.parametrize("instances", [1, 2])
async def test_a_deadline_the_queue_cannot_meet_is_refused_at_admission(make, clock, instances):
    backend = GatedBackend()
    batcher, rec = await a_batcher_that_learned_50_ms_per_image(make, clock, backend, instances)
    busy = []
    for i in range(instances):  # every instance busy
        busy.append(asyncio.create_task(batcher.submit(images(2 + i), None)))
        await started(backend)
    queued = asyncio.create_task(batcher.submit(images(7, 8), None))
    await settle()
    # 2 images queued ahead at 50 ms each over `instances` workers: 100 ms / instances of work
    wait_ms = 100 // instances
    with pytest.raises(QueueFull, match=f"overloaded for this deadline: 2 images are queued "
                                        f"ahead, about {wait_ms} ms of compute"):
        await batcher.submit(images(5), clock.after(wait_ms / 1000 - 0.001))
    patient = asyncio.create_task(batcher.submit(images(6), clock.after(wait_ms / 1000 + 0.001)))
    backend.gated = False
    for _ in range(instances):
        backend.release.release()
    assert [ids_of(await t) for t in busy] == [[2 + i] for i in range(instances)]
    assert ids_of(await queued) == [7, 8] and ids_of(await patient) == [6]
    assert rec.rejected_counts == {"deadline_unreachable": 1}
    assert 5 not in sum(backend.batches, [])
    await batcher.close()


async def test_a_stale_slow_estimate_never_refuses_a_request_with_nothing_queued_ahead(
        make, clock):
    backend = GatedBackend()
    batcher, rec = await a_batcher_that_learned_50_ms_per_image(make, clock, backend)
    backend.gated = False
    # nothing is queued: a 10 ms deadline is admitted, and the batch refreshes the estimate
    assert ids_of(await batcher.submit(images(2), clock.after(0.01))) == [2]
    assert rec.rejected_counts == {}
    await batcher.close()


async def test_a_deadline_already_passed_is_refused_before_queueing(make, clock):
    batcher, rec = make(GatedBackend(gated=False))
    with pytest.raises(DeadlineExceeded, match="the deadline passed before the request was "
                                               "queued"):
        await batcher.submit(images(1), clock.after(0))
    assert rec.expired_counts == {"deadline": 1}
    await batcher.close()


async def test_expired_work_is_dropped_before_compute_and_reported(make, clock):
    backend = GatedBackend()
    batcher, rec = make(backend)
    busy = asyncio.create_task(batcher.submit(images(1), None))
    await started(backend)
    doomed = asyncio.create_task(batcher.submit(images(2), clock.after(0.01)))
    alive = asyncio.create_task(batcher.submit(images(3), clock.after(0.03)))
    await settle()
    clock.advance(0.02)  # the first deadline passes while both wait behind batch [1]
    backend.gated = False
    backend.release.release()
    with pytest.raises(DeadlineExceeded, match="before compute"):
        await doomed
    assert ids_of(await busy) == [1] and ids_of(await alive) == [3]
    assert backend.batches == [[1], [3]]
    assert rec.expired_counts == {"deadline": 1}
    await batcher.close()


async def test_a_cancelled_request_is_dropped_not_computed(make):
    backend = GatedBackend()
    batcher, rec = make(backend)
    busy = asyncio.create_task(batcher.submit(images(1), None))
    await started(backend)
    gone = asyncio.create_task(batcher.submit(images(2, 22), None))
    await settle()
    gone.cancel()
    backend.gated = False
    backend.release.release()
    await busy
    assert ids_of(await batcher.submit(images(3), None)) == [3]
    assert backend.batches == [[1], [3]]
    assert rec.expired_counts == {"cancelled": 2}
    await batcher.close()


@pytest.mark.parametrize("preferred", [2, 3, 4])
async def test_max_queue_delay_lets_an_idle_instance_wait_for_the_preferred_size(
        make, preferred):
    backend = GatedBackend(gated=False)
    batcher, _ = make(backend, max_queue_delay_ms=60_000, preferred_batch_sizes=(preferred,))
    tasks = [asyncio.create_task(batcher.submit(images(i), None)) for i in range(preferred)]
    assert [ids_of(await t) for t in tasks] == [[i] for i in range(preferred)]
    assert backend.batches == [list(range(preferred))]
    await batcher.close()


async def test_a_backend_returning_the_wrong_row_count_fails_that_batch_only(make):
    backend = GatedBackend(gated=False)
    batcher, _ = make(backend)
    backend.wrong_rows = True
    with pytest.raises(BackendError, match="returned 1 logits rows and 1 embedding rows for a "
                                           "batch of 2"):
        await batcher.submit(images(1, 2), None)
    backend.wrong_rows = False
    assert ids_of(await batcher.submit(images(3), None)) == [3]
    await batcher.close()


async def test_an_embedding_with_the_wrong_row_count_is_an_error_not_a_silent_slice(make):
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


async def test_a_worker_error_answers_its_batch_instead_of_leaving_it_hanging(make):
    batcher, _ = make(GatedBackend(gated=False), observer=FailingObserver(failures=1))
    # wait_for only guards against the hang this test is about; nothing here is timed
    with pytest.raises(BackendError, match="the batcher failed \\(RuntimeError\\)"):
        await asyncio.wait_for(batcher.submit(images(1), None), 60)
    assert ids_of(await asyncio.wait_for(batcher.submit(images(2), None), 60)) == [2]
    await batcher.close()


async def test_a_closing_batcher_refuses_new_work_and_drains_queued_and_computing_work(make):
    backend = GatedBackend()
    batcher, _ = make(backend)
    tasks = [asyncio.create_task(batcher.submit(images(i), None)) for i in range(3)]
    await started(backend)
    closing = asyncio.create_task(batcher.close())
    await settle()
    with pytest.raises(ModelUnavailable, match="is unloading; retry"):
        await batcher.submit(images(9), None)
    backend.gated = False
    backend.release.release()
    await closing
    assert [ids_of(t.result()) for t in tasks] == [[0], [1], [2]]
