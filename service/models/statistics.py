"""Per-version inference statistics, cumulative since load, as KServe v2 / Triton report them.

Written by the version's accounting (``accounting``) only, from the event loop: no lock.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field


@dataclass
class Duration:
    count: int = 0
    ns: int = 0

    def add(self, seconds: float) -> None:
        self.count += 1
        self.ns += int(seconds * 1e9)


@dataclass
class VersionStatistics:
    success: Duration = field(default_factory=Duration)  # whole request, successful ones
    fail: Duration = field(default_factory=Duration)
    queue: Duration = field(default_factory=Duration)
    compute_input: Duration = field(default_factory=Duration)  # preprocessing
    compute_infer: Duration = field(default_factory=Duration)  # the batches it ran in
    compute_output: Duration = field(default_factory=Duration)  # postprocessing
    inference_count: int = 0  # images computed
    execution_count: int = 0  # batches run
    last_inference_ms: int = 0  # since the epoch
    batches: dict[int, Duration] = field(default_factory=dict)  # batch size → compute time

    def request_done(self, *, ok: bool, total_s: float, preprocess_s: float = 0.0,
                     queue_s: float = 0.0, compute_s: float = 0.0,
                     postprocess_s: float = 0.0) -> None:
        if not ok:
            self.fail.add(total_s)
            return
        self.success.add(total_s)
        self.compute_input.add(preprocess_s)
        self.queue.add(queue_s)
        self.compute_infer.add(compute_s)
        self.compute_output.add(postprocess_s)
        self.last_inference_ms = int(time.time() * 1000)

    def batch_done(self, size: int, compute_s: float) -> None:
        self.inference_count += size
        self.execution_count += 1
        self.batches.setdefault(size, Duration()).add(compute_s)
