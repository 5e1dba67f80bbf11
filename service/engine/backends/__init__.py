"""Inference engines behind one interface; ``create_backend`` picks one from a model's config."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from ...errors import ConfigError
from ...format.model_config import ModelConfig
from ...format.repository import VersionEntry
from .base import Backend, ModelOutputs


@dataclass(frozen=True, kw_only=True)
class EngineOptions:
    """What the server, not the model's config, decides for its engines (``serve`` flags)."""

    openvino_cache_dir: Path | None = None  # --openvino-cache-dir: compiled models, reused


def create_backend(name: str, config: ModelConfig, version: VersionEntry,
                   options: EngineOptions = EngineOptions()) -> Backend:
    """Load ``version`` with the engine its config names. Blocking: call from an executor."""
    if config.backend == "onnxruntime":
        from .onnxruntime import OnnxRuntimeBackend

        return OnnxRuntimeBackend(name, config, version)
    if config.backend == "openvino":
        from .openvino import OpenVinoBackend

        return OpenVinoBackend(name, config, version, cache_dir=options.openvino_cache_dir)
    if config.backend == "tensorrt":
        from .tensorrt import TensorRTBackend

        return TensorRTBackend(name, config, version)
    raise ConfigError(f"model {name}: unknown backend {config.backend!r}")


__all__ = ["Backend", "EngineOptions", "ModelOutputs", "create_backend"]
