"""What model control answers, as typed views every front end encodes for its wire: a model's
metadata (its tensors and versions), its Triton configuration, its statistics, the repository
index. No view is a protobuf message: the gRPC servicers and the HTTP API each write their own
form of the same answer."""

from __future__ import annotations

from dataclasses import dataclass

from ..format.model_config import ModelConfig
from ..states import VersionState
from .statistics import VersionStatistics


@dataclass(frozen=True)
class TensorSpec:
    name: str
    datatype: str
    shape: tuple[int, ...]  # -1: any size (the batch)


@dataclass(frozen=True)
class ModelMetadata:
    """KServe's model metadata: one input entry per accepted input form, FP32 first."""

    name: str
    versions: tuple[int, ...]
    platform: str
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    weights: str = ""  # where the answering version's weights came from


@dataclass(frozen=True)
class ServedConfig:
    """What Triton's model configuration of a served version is written from."""

    name: str
    version: int
    config: ModelConfig
    num_classes: int
    embedding_dim: int
    weights: str = ""  # where its weights came from (format/provenance.py)


@dataclass(frozen=True)
class VersionStats:
    """One version's statistics, cumulative since it loaded."""

    name: str
    version: int
    stats: VersionStatistics


@dataclass(frozen=True)
class IndexEntry:
    """A line of the repository index: a model version, or a model without any (version 0)."""

    name: str
    version: int
    state: VersionState | None  # None: a model folder the server has not loaded (explicit mode)
    reason: str
