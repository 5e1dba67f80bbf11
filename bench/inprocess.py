"""The ceiling: the model file in an in-process ONNX Runtime session, no server in between.

Same thread settings as the server's session for that model (``[onnxruntime]`` in its
config.toml), batch 1…max, fixed duration per batch size.
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np

from visionserve.service.format.model_config import ModelConfig
from visionserve.service.limits import cpu_count

BATCH_SIZES = (1, 2, 4, 8, 16, 32, 64)


class InProcessEngine:
    def __init__(self, model_file: Path, config: ModelConfig) -> None:
        import onnxruntime as ort

        opts = ort.SessionOptions()
        opts.intra_op_num_threads = config.onnxruntime.intra_op_threads or cpu_count()
        opts.inter_op_num_threads = config.onnxruntime.inter_op_threads or 1
        opts.add_session_config_entry("session.intra_op.allow_spinning",
                                      "1" if config.onnxruntime.allow_spinning else "0")
        self._session = ort.InferenceSession(str(model_file), opts,
                                             providers=["CPUExecutionProvider"])
        self._input = config.input.name
        self._shape = config.input.shape
        self.batch_sizes = [b for b in BATCH_SIZES if b <= config.max_batch_size]

    def images_per_s(self, batch: int, duration_s: float) -> float:
        x = np.random.default_rng(0).standard_normal((batch, *self._shape), dtype=np.float32)
        self._session.run(None, {self._input: x})  # warm-up (allocations for this shape)
        images, start = 0, time.perf_counter()
        while (elapsed := time.perf_counter() - start) < duration_s or images < 3 * batch:
            self._session.run(None, {self._input: x})
            images += batch
        return images / elapsed
