"""Inference engines behind one interface; ``create_backend`` picks one from a model's config."""

from __future__ import annotations

from ..config import ModelConfig
from ..errors import ConfigError
from ..repository import VersionEntry
from .base import Backend, ModelOutputs


def create_backend(name: str, config: ModelConfig, version: VersionEntry) -> Backend:
    """Load ``version`` with the engine its config names. Blocking: call from an executor."""
    if config.backend == "onnxruntime":
        from .onnxruntime import OnnxRuntimeBackend

        return OnnxRuntimeBackend(name, config, version)
    if config.backend == "tensorrt":
        from .tensorrt import TensorRTBackend

        return TensorRTBackend(name, config, version)
    raise ConfigError(f"model {name}: unknown backend {config.backend!r}")


__all__ = ["Backend", "ModelOutputs", "create_backend"]
