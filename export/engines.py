"""The engine an export is checked on: the server's own backend for the model's config, so that
parity and the golden set hold what will serve (engine, precision, settings), not a stand-in."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from visionserve.service.engine.backends import Backend, create_backend
from visionserve.service.errors import BackendError, ConfigError
from visionserve.service.format.model_config import ModelConfig
from visionserve.service.format.repository import VersionEntry

from .errors import ExportError, ExportErrorCode


class EngineError(ExportError):
    code = ExportErrorCode.PARITY

    """The engine the model is configured for cannot run it here; nothing was published."""


def describe(config: ModelConfig) -> str:
    """``ONNX Runtime (CPU)``, ``OpenVINO (CPU, BF16)``…: what the export was checked on."""
    if config.backend == "openvino":
        return f"OpenVINO (CPU, {config.openvino.precision.upper()})"
    if config.backend == "tensorrt":
        return "TensorRT"
    providers = (p.removesuffix("ExecutionProvider") for p in config.onnxruntime.providers)
    return f"ONNX Runtime ({', '.join(providers)})"


@contextmanager
def open_engine(name: str, version: int, config: ModelConfig,
                model_file: Path) -> Iterator[Backend]:
    """The backend ``create_backend`` gives the server for ``config``, on ``model_file``."""
    entry = VersionEntry(version=version, path=model_file.parent, model_file=model_file,
                         labels=())
    try:
        engine = create_backend(name, config, entry)
    except (ConfigError, BackendError) as exc:
        raise EngineError(f"{name}: the exported model cannot be checked on "
                          f"{describe(config)}: {exc}; nothing was published") from None
    try:
        yield engine
    finally:
        engine.close()
