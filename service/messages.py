"""Typed requests and results between the API layer and the core; wire conversion lives here.

``from_grpc`` / ``to_grpc`` are the only places that touch visionserve.v1 messages, so the core
works on plain dataclasses and the KServe v2 path can build the same requests from its own wire
types. Tensors and embeddings cross as raw little-endian bytes, never per-element loops.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from visionserve.v1 import visionserve_pb2 as pb

from .errors import InvalidInput, check_image_count
from .postprocess import ClassScore
from .preprocess import EncodedImage, ImageInput, RawTensor

_DTYPES = {pb.DTYPE_FLOAT32: "float32", pb.DTYPE_UINT8: "uint8"}
_LAYOUTS = {pb.LAYOUT_UNSPECIFIED: "", pb.LAYOUT_CHW: "CHW", pb.LAYOUT_HWC: "HWC"}
DEFAULT_TOP_K = 5


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


@dataclass(frozen=True, kw_only=True)
class ClassifyCall:
    model: str
    version: int
    images: list[ImageInput]
    top_k: int
    request_id: str

    @classmethod
    def from_grpc(cls, req: pb.ClassifyRequest, max_images: int) -> ClassifyCall:
        if req.top_k < 0:
            raise InvalidInput(f"model {req.model}: top_k must be >= 0 (0 = {DEFAULT_TOP_K}), "
                               f"got {req.top_k}")
        if req.version < 0:
            raise InvalidInput(f"model {req.model}: version must be >= 0 (0 = newest), got "
                               f"{req.version}")
        return cls(model=req.model, version=req.version,
                   images=images_from_grpc(list(req.images), req.model, max_images),
                   top_k=req.top_k or DEFAULT_TOP_K, request_id=req.request_id)


@dataclass(frozen=True, kw_only=True)
class ClassifyResult:
    model: str
    version: int
    results: list[list[ClassScore]]
    request_id: str

    def to_grpc(self) -> pb.ClassifyResponse:
        return pb.ClassifyResponse(
            model=self.model, version=self.version, request_id=self.request_id,
            results=[pb.Classification(classes=[pb.Class(index=c.index, label=c.label,
                                                         score=c.score) for c in row])
                     for row in self.results])


@dataclass(frozen=True, kw_only=True)
class EmbedCall:
    model: str
    version: int
    images: list[ImageInput]
    normalize: bool
    request_id: str

    @classmethod
    def from_grpc(cls, req: pb.EmbedRequest, max_images: int) -> EmbedCall:
        if req.version < 0:
            raise InvalidInput(f"model {req.model}: version must be >= 0 (0 = newest), got "
                               f"{req.version}")
        return cls(model=req.model, version=req.version,
                   images=images_from_grpc(list(req.images), req.model, max_images),
                   normalize=req.normalize, request_id=req.request_id)


@dataclass(frozen=True, kw_only=True)
class EmbedResult:
    model: str
    version: int
    embeddings: np.ndarray  # float32 [N, D]
    request_id: str

    def to_grpc(self) -> pb.EmbedResponse:
        e = np.ascontiguousarray(self.embeddings, dtype="<f4")
        return pb.EmbedResponse(
            model=self.model, version=self.version, request_id=self.request_id,
            embeddings=pb.Tensor(shape=list(e.shape), dtype=pb.DTYPE_FLOAT32, data=e.tobytes(),
                                 layout=pb.LAYOUT_UNSPECIFIED))
