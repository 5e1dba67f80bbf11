"""The core every API shares: resolve the model version, preprocess, batch, postprocess.

Classify, Embed and KServe ModelInfer arrive as typed calls (``messages``) and all end in
``InferenceCore.infer``, so requests from every API meet the same batcher of their model
version and batch together, and are counted in the same statistics. The core returns typed
results; encoding them for a wire is the front end's work, outside the timed stages.
"""

from __future__ import annotations

import asyncio
import contextvars
import time
from collections.abc import Callable
from concurrent.futures import Executor
from typing import TypeVar

import numpy as np

from .backends.base import ModelOutputs
from .config import ServerLimits
from .errors import InvalidInput, check_image_count
from .messages import ClassifyCall, ClassifyResult, EmbedCall, EmbedResult, InferCall, InferResult
from .metrics import Metrics
from .postprocess import l2_normalize, top_k
from .preprocess import ImageInput, RawTensor
from .routing import Router, ServedVersion
from .tensor_io import check_requested_outputs, images_from_inputs, output_tensors

T = TypeVar("T")


class InferenceCore:
    def __init__(self, router: Router, preprocess_executor: Executor,
                 limits: ServerLimits, metrics: Metrics) -> None:
        self._router = router
        self._executor = preprocess_executor
        self._limits = limits
        self._metrics = metrics

    @property
    def limits(self) -> ServerLimits:
        return self._limits

    async def classify(self, call: ClassifyCall, deadline: float | None) -> ClassifyResult:
        served = self._router.resolve(call.model, call.version)
        results = await self.infer(served, call.images, deadline,
                                   lambda out: top_k(out.logits, call.top_k, served.labels))
        return ClassifyResult(model=served.name, version=served.version, results=results,
                              request_id=call.request_id)

    async def embed(self, call: EmbedCall, deadline: float | None) -> EmbedResult:
        served = self._router.resolve(call.model, call.version)
        vectors = await self.infer(
            served, call.images, deadline,
            lambda out: l2_normalize(out.embedding) if call.normalize else out.embedding)
        return EmbedResult(model=served.name, version=served.version, embeddings=vectors,
                           request_id=call.request_id)

    async def model_infer(self, call: InferCall, deadline: float | None) -> InferResult:
        """KServe v2 ModelInfer: named input tensors in, the requested outputs out."""
        served = self._router.resolve(call.model, call.version)
        images = images_from_inputs(call, served)
        requested = check_requested_outputs(call, served)
        outputs = await self.infer(served, images, deadline,
                                   lambda out: output_tensors(requested, served, out))
        return InferResult(model=served.name, version=served.version, outputs=outputs,
                           request_id=call.request_id)

    async def infer(self, served: ServedVersion, images: list[ImageInput],
                    deadline: float | None, postprocess: Callable[[ModelOutputs], T]) -> T:
        """Preprocess ``images``, run them through the version's batcher (in order), and
        ``postprocess`` the outputs; the request is counted in the version's statistics."""
        with served.in_use():  # entered before the first await: no swap can retire it now
            return await self._infer(served, images, deadline, postprocess)

    async def _infer(self, served: ServedVersion, images: list[ImageInput],
                     deadline: float | None, postprocess: Callable[[ModelOutputs], T]) -> T:
        start = time.perf_counter()
        try:
            if not images:
                raise InvalidInput(f"{served.where}: images is empty; send at least one image")
            check_image_count(len(images), self._limits.max_images_per_request, served.where)
            if deadline is None and served.config.batching.default_timeout_ms > 0:
                deadline = time.monotonic() + served.config.batching.default_timeout_ms / 1000
            tensors = await self._preprocess(served, images)
            preprocessed = time.perf_counter()
            self._metrics.preprocess_duration.labels(served.name, str(served.version)).observe(
                preprocessed - start)
            computed = await served.batcher.submit(tensors, deadline)
            post_start = time.perf_counter()
            result = postprocess(computed.outputs)
        except BaseException:
            served.stats.request_done(ok=False, total_s=time.perf_counter() - start)
            raise
        end = time.perf_counter()
        served.stats.request_done(ok=True, total_s=end - start,
                                  preprocess_s=preprocessed - start, queue_s=computed.queue_s,
                                  compute_s=computed.compute_s, postprocess_s=end - post_start)
        return result

    async def _preprocess(self, served: ServedVersion,
                          images: list[ImageInput]) -> list[np.ndarray]:
        """Raw tensors only validate (zero-copy views): done inline. Encoded images decode in the
        preprocessing pool, one image per task, in parallel. Normalization happens later, in
        the batch (``Preprocessor.assemble``)."""
        prep = served.preprocessor
        loop = asyncio.get_running_loop()
        results: list[np.ndarray | asyncio.Future[np.ndarray]] = []
        for i, image in enumerate(images):
            if isinstance(image, RawTensor):
                results.append(prep.prepare(i, image))
            else:
                # in the request's context: a log line from the decoder carries its request id
                results.append(loop.run_in_executor(self._executor, contextvars.copy_context().run,
                                                    prep.prepare, i, image))
        pending = [r for r in results if isinstance(r, asyncio.Future)]
        if pending:
            await asyncio.gather(*pending)
        return [r.result() if isinstance(r, asyncio.Future) else r for r in results]
