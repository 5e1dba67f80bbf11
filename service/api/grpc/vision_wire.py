"""``visionserve.v1`` messages ↔ the core's typed calls and results (Classify, Embed)."""

from __future__ import annotations

import numpy as np

from visionserve.v1 import visionserve_pb2 as pb

from ...core.messages import DEFAULT_TOP_K, ClassifyCall, ClassifyResult, EmbedCall, EmbedResult
from ...engine.preprocess import EncodedImage, ImageInput, RawTensor
from ...errors import InvalidInput, check_image_count

_DTYPES = {pb.DTYPE_FLOAT32: "float32", pb.DTYPE_UINT8: "uint8"}
_LAYOUTS = {pb.LAYOUT_UNSPECIFIED: "", pb.LAYOUT_CHW: "CHW", pb.LAYOUT_HWC: "HWC"}


def images_from_grpc(images: list[pb.Image], model: str, max_images: int) -> list[ImageInput]:
    check_image_count(len(images), max_images, f"model {model}")
    out: list[ImageInput] = []
    for i, image in enumerate(images):
        kind = image.WhichOneof("source")
        if kind == "encoded":
            out.append(EncodedImage(image.encoded))
        elif kind == "tensor":
            t = image.tensor
            if t.dtype not in _DTYPES:
                raise InvalidInput(f"model {model}: images[{i}].tensor.dtype must be "
                                   "DTYPE_FLOAT32 or DTYPE_UINT8")
            out.append(RawTensor(tuple(t.shape), _DTYPES[t.dtype], t.data,
                                 _LAYOUTS.get(t.layout, "")))
        else:
            raise InvalidInput(f"model {model}: images[{i}] is empty; set encoded (file bytes) "
                               "or tensor")
    return out


def _version(model: str, version: int) -> int:
    if version < 0:
        raise InvalidInput(f"model {model}: version must be >= 0 (0 = newest), got {version}")
    return version


def classify_call(req: pb.ClassifyRequest, max_images: int) -> ClassifyCall:
    if req.top_k < 0:
        raise InvalidInput(f"model {req.model}: top_k must be >= 0 (0 = {DEFAULT_TOP_K}), "
                           f"got {req.top_k}")
    return ClassifyCall(model=req.model, version=_version(req.model, req.version),
                        images=images_from_grpc(list(req.images), req.model, max_images),
                        top_k=req.top_k or DEFAULT_TOP_K, request_id=req.request_id)


def classify_reply(result: ClassifyResult) -> pb.ClassifyResponse:
    return pb.ClassifyResponse(
        model=result.model, version=result.version, request_id=result.request_id,
        results=[pb.Classification(classes=[pb.Class(index=c.index, label=c.label,
                                                     score=c.score) for c in row])
                 for row in result.results])


def embed_call(req: pb.EmbedRequest, max_images: int) -> EmbedCall:
    return EmbedCall(model=req.model, version=_version(req.model, req.version),
                     images=images_from_grpc(list(req.images), req.model, max_images),
                     normalize=req.normalize, request_id=req.request_id)


def embed_reply(result: EmbedResult) -> pb.EmbedResponse:
    e = np.ascontiguousarray(result.embeddings, dtype="<f4")
    return pb.EmbedResponse(
        model=result.model, version=result.version, request_id=result.request_id,
        embeddings=pb.Tensor(shape=list(e.shape), dtype=pb.DTYPE_FLOAT32, data=e.tobytes(),
                             layout=pb.LAYOUT_UNSPECIFIED))
