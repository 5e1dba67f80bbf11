"""The core every API shares: resolve the model version, preprocess, batch, postprocess.

Classify, Embed and KServe ModelInfer arrive as typed calls (``messages``) and all end in
``InferenceCore.infer``, so requests from every API meet the same batcher of their model
version and batch together, and are counted in the same statistics. The core returns typed
results; encoding them for a wire is the front end's work, outside the timed stages.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import TypeVar

import numpy as np

from ..engine.backends.base import ModelOutputs
from ..engine.decode_pool import DecodePool
from ..engine.postprocess import l2_normalize, top_k
from ..engine.preprocess import EncodedImage, ImageInput, RawTensor
from ..errors import InvalidInput, check_image_count
from ..limits import ServerLimits
from ..models.routing import Router, ServedVersion
from .messages import ClassifyCall, ClassifyResult, EmbedCall, EmbedResult, InferCall, InferResult
from .tensor_io import check_requested_outputs, images_from_inputs, output_tensors

T = TypeVar("T")


class InferenceCore:
    def __init__(self, router: Router, decode_pool: DecodePool, limits: ServerLimits) -> None:
        self._router = router
        self._pool = decode_pool
        self._limits = limits

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
                    deadline: float | None, postprocess: Callable[[ModelOutputs], T],
                    client: bool = True) -> T:
        """Preprocess ``images``, run them through the version's batcher (in order), and
        ``postprocess`` the outputs, accounted in the version's metrics and statistics (which
        count from the moment the version is routed: the golden check's requests before do
        not). A ``client`` request gets the model's default timeout when it sent none."""
        with served.in_use():  # entered before the first await: no swap can retire it now
            return await self._infer(served, images, deadline, postprocess, client)

    async def outputs(self, served: ServedVersion, image: ImageInput) -> ModelOutputs:
        """One image's raw outputs through the whole path, with no deadline: the golden check."""
        return await self.infer(served, [image], None, lambda out: out, client=False)

    async def _infer(self, served: ServedVersion, images: list[ImageInput],
                     deadline: float | None, postprocess: Callable[[ModelOutputs], T],
                     client: bool) -> T:
        accounting = served.accounting
        start = time.perf_counter()
        try:
            if not images:
                raise InvalidInput(f"{served.where}: images is empty; send at least one image")
            check_image_count(len(images), self._limits.max_images_per_request, served.where)
            timeout_ms = served.config.batching.default_timeout_ms
            if client and deadline is None and timeout_ms > 0:
                deadline = time.monotonic() + timeout_ms / 1000
            tensors = await self._preprocess(served, images, deadline)
            preprocessed = time.perf_counter()
            accounting.preprocessed(preprocessed - start)
            computed = await served.batcher.submit(tensors, deadline)
            post_start = time.perf_counter()
            result = postprocess(computed.outputs)
        except BaseException:
            accounting.request_failed(time.perf_counter() - start)
            raise
        end = time.perf_counter()
        accounting.request_done(total_s=end - start, preprocess_s=preprocessed - start,
                                queue_s=computed.queue_s, compute_s=computed.compute_s,
                                postprocess_s=end - post_start)
        return result

    async def _preprocess(self, served: ServedVersion, images: list[ImageInput],
                          deadline: float | None) -> list[np.ndarray]:
        """Raw tensors only validate (zero-copy views): done inline. Encoded images decode in the
        decode pool, within the request's pixel budget. Normalization happens later, in the
        batch (``Preprocessor.assemble``)."""
        prep = served.preprocessor
        results: list[np.ndarray | None] = [prep.prepare(i, image)
                                            if isinstance(image, RawTensor) else None
                                            for i, image in enumerate(images)]
        encoded = [(i, image.data) for i, image in enumerate(images)
                   if isinstance(image, EncodedImage)]
        if encoded:
            decoded = await self._pool.decode(prep, encoded, served.where, deadline)
            for (i, _), pixels in zip(encoded, decoded, strict=True):
                results[i] = pixels
        return results  # type: ignore[return-value]  # every image prepared
