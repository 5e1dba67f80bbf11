"""Typed requests and results between the API layer and the core: plain dataclasses.

Every front end (our gRPC API, KServe v2 over gRPC, later HTTP) converts its wire messages into
these at its boundary (``api/*_wire.py``) and back; the core never sees protobuf. Tensors travel
as little-endian bytes or NumPy arrays, never as per-element Python loops.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..engine.postprocess import ClassScore
from ..engine.preprocess import ImageInput

DEFAULT_TOP_K = 5


@dataclass(frozen=True, kw_only=True)
class ClassifyCall:
    model: str
    version: int  # 0 = the newest ready version
    images: list[ImageInput]
    top_k: int
    request_id: str


@dataclass(frozen=True, kw_only=True)
class ClassifyResult:
    model: str
    version: int
    results: list[list[ClassScore]]
    request_id: str


@dataclass(frozen=True, kw_only=True)
class EmbedCall:
    model: str
    version: int
    images: list[ImageInput]
    normalize: bool
    request_id: str


@dataclass(frozen=True, kw_only=True)
class EmbedResult:
    model: str
    version: int
    embeddings: np.ndarray  # float32 [N, D]
    request_id: str


@dataclass(frozen=True, kw_only=True)
class InferInput:
    """One named input tensor of a KServe v2 ModelInfer, as the client sent it. ``data`` holds
    the FP32/UINT8 values as little-endian bytes (the raw buffer itself, or the typed contents
    converted once), ``elements`` the BYTES elements; ``source`` names where they came from, for
    error messages (``raw_input_contents[0]`` or ``contents``)."""

    name: str
    datatype: str  # as sent: FP32 | UINT8 | BYTES are accepted, anything else is refused
    shape: tuple[int, ...]
    data: bytes | memoryview | None = None
    elements: list[bytes] | None = None
    source: str = "contents"


@dataclass(frozen=True, kw_only=True)
class RequestedOutput:
    name: str
    class_count: int | None = None  # set: the classification extension ("value:index:label")


@dataclass(frozen=True, kw_only=True)
class InferCall:
    model: str
    version: int  # 0 = the newest ready version
    inputs: list[InferInput]
    outputs: list[RequestedOutput]  # empty = every output, raw
    request_id: str


@dataclass(frozen=True, kw_only=True)
class OutputTensor:
    """One output of an InferResult: FP32 values (``array``) or BYTES ``elements``."""

    name: str
    datatype: str  # FP32 | BYTES
    shape: tuple[int, ...]
    array: np.ndarray | None = None
    elements: list[bytes] | None = None


@dataclass(frozen=True, kw_only=True)
class InferResult:
    model: str
    version: int
    outputs: list[OutputTensor]
    request_id: str
