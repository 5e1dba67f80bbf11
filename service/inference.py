"""The core every API shares: resolve the model version, preprocess, batch, postprocess.

Classify, Embed (and later KServe ModelInfer) all end in ``InferenceCore.run``, so requests
from every API meet the same batcher of their model version and batch together.
"""

from __future__ import annotations

import asyncio
import time
from concurrent.futures import Executor

import numpy as np

from .backends.base import ModelOutputs
from .config import ServerLimits
from .errors import InvalidInput, LimitExceeded
from .messages import ClassifyCall, ClassifyResult, EmbedCall, EmbedResult
from .metrics import Metrics
from .postprocess import l2_normalize, top_k
from .preprocess import ImageInput, RawTensor
from .registry import ModelRegistry, ServedVersion


class InferenceCore:
    def __init__(self, registry: ModelRegistry, preprocess_executor: Executor,
                 limits: ServerLimits, metrics: Metrics) -> None:
        self.registry = registry
        self._executor = preprocess_executor
        self._limits = limits
        self._metrics = metrics

    async def classify(self, call: ClassifyCall, deadline: float | None) -> ClassifyResult:
        served = self.registry.resolve(call.model, call.version)
        outputs = await self.run(served, call.images, deadline)
        return ClassifyResult(model=served.name, version=served.version,
                              results=top_k(outputs.logits, call.top_k, served.labels),
                              request_id=call.request_id)

    async def embed(self, call: EmbedCall, deadline: float | None) -> EmbedResult:
        served = self.registry.resolve(call.model, call.version)
        outputs = await self.run(served, call.images, deadline)
        vectors = l2_normalize(outputs.embedding) if call.normalize else outputs.embedding
        return EmbedResult(model=served.name, version=served.version, embeddings=vectors,
                           request_id=call.request_id)

    async def run(self, served: ServedVersion, images: list[ImageInput],
                  deadline: float | None) -> ModelOutputs:
        """Preprocess ``images`` and run them through the version's batcher, in order."""
        if not images:
            raise InvalidInput(f"{served.where}: images is empty; send at least one image")
        if len(images) > self._limits.max_images_per_request:
            raise LimitExceeded(f"{served.where}: {len(images)} images in one request, over the "
                                f"limit of {self._limits.max_images_per_request}; split the "
                                "request")
        if deadline is None and served.config.batching.default_timeout_ms > 0:
            deadline = time.monotonic() + served.config.batching.default_timeout_ms / 1000
        start = time.perf_counter()
        tensors = await self._preprocess(served, images)
        self._metrics.preprocess_duration.labels(served.name, str(served.version)).observe(
            time.perf_counter() - start)
        return await served.batcher.submit(tensors, deadline)

    async def _preprocess(self, served: ServedVersion,
                          images: list[ImageInput]) -> list[np.ndarray]:
        """Raw float32 tensors are zero-copy views: done inline. Anything that decodes or
        converts pixels runs in the preprocessing pool, one image per task, in parallel."""
        prep = served.preprocessor
        loop = asyncio.get_running_loop()
        results: list[np.ndarray | asyncio.Future[np.ndarray]] = []
        for i, image in enumerate(images):
            if isinstance(image, RawTensor) and image.dtype == "float32":
                results.append(prep.tensor(i, image))
            else:
                results.append(loop.run_in_executor(self._executor, prep.tensor, i, image))
        pending = [r for r in results if isinstance(r, asyncio.Future)]
        if pending:
            await asyncio.gather(*pending)
        return [r.result() if isinstance(r, asyncio.Future) else r for r in results]
