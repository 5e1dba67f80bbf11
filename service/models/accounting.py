"""One served version's accounting: its Prometheus series and its statistics, written together.

Every count of a version goes through one ``VersionAccounting``: each request (from the
inference core: succeeded or failed, and where its time went) and each batch, expiry and
refusal (from the batcher, as its ``BatchObserver``). It counts nothing until ``start``: the
golden check's requests, run before a version is routed, are not its clients' and stay out of
its figures. Updated from the event loop only, so no lock is needed.
"""

from __future__ import annotations

from ..engine.batching import Expiry, Rejection
from ..metrics import Metrics
from ..utilization import BusyTime
from .statistics import VersionStatistics


class VersionAccounting:
    """The metrics (label values bound once) and the KServe statistics of one version."""

    def __init__(self, metrics: Metrics, model: str, version: int, queue_capacity: int,
                 instances: int = 1) -> None:
        labels = (model, str(version))
        self.stats = VersionStatistics()
        self.counting = False
        self._labels = labels
        self._utilization = metrics.utilization
        self._busy = BusyTime(instances)
        metrics.queue_capacity.labels(*labels).set(queue_capacity)
        self._preprocess = metrics.preprocess_duration.labels(*labels)
        self._depth = metrics.queue_depth.labels(*labels)
        self._queue = metrics.queue_duration.labels(*labels)
        self._compute = metrics.compute_duration.labels(*labels)
        self._size = metrics.batch_size.labels(*labels)
        self._expired = {r: metrics.expired.labels(*labels, r.value) for r in Expiry}
        self._rejected = {r: metrics.rejected.labels(*labels, r.value) for r in Rejection}

    def start(self) -> None:
        """From now on the version's requests and batches count (it is about to be routed)."""
        self.counting = True
        self._busy = BusyTime(self._busy.instances)  # the golden check's batches left out
        self._utilization.add(*self._labels, self._busy)

    def stop(self) -> None:
        """The version's engine is released: its utilization series go."""
        self.counting = False
        self._utilization.remove(*self._labels, self._busy)

    # --- from the inference core, once per request ---------------------------------------------

    def preprocessed(self, seconds: float) -> None:
        """The request's images are decoded and checked (counted even if it fails later)."""
        if self.counting:
            self._preprocess.observe(seconds)

    def request_failed(self, total_s: float) -> None:
        if self.counting:
            self.stats.request_done(ok=False, total_s=total_s)

    def request_done(self, *, total_s: float, preprocess_s: float, queue_s: float,
                     compute_s: float, postprocess_s: float) -> None:
        if self.counting:
            self.stats.request_done(ok=True, total_s=total_s, preprocess_s=preprocess_s,
                                    queue_s=queue_s, compute_s=compute_s,
                                    postprocess_s=postprocess_s)

    # --- BatchObserver: from the batcher ---------------------------------------------------------

    def queue_depth(self, images: int) -> None:
        if self.counting:
            self._depth.set(images)

    def expired(self, reason: Expiry, images: int) -> None:
        if self.counting:
            self._expired[reason].inc(images)

    def rejected(self, reason: Rejection, images: int) -> None:
        if self.counting:
            self._rejected[reason].inc(images)

    def batch_done(self, size: int, queue_waits_s: list[float], compute_s: float) -> None:
        if not self.counting:
            return
        self._size.observe(size)
        self._compute.observe(compute_s)
        for wait in queue_waits_s:
            self._queue.observe(wait)
        self.stats.batch_done(size, compute_s)

    def busy(self, instances: int) -> None:
        if self.counting:
            self._busy.set_busy(instances)
