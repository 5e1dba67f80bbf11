"""ONNX → TensorRT engine (``model.plan``), through TensorRT's documented Python API (10.x).

No machine of this project can run TensorRT (no GPU; the PyPI packages need NVIDIA's servers):
this code follows the API as documented — Builder, OnnxParser, an optimization profile covering
batch 1..max_batch_size, the FP16 builder flag, a timing cache — and its decisions are tested
against a recording fake of that API surface (tests/fakes/tensorrt_fake.py). docs/gpu.md says
exactly what was and was not run.
"""

from __future__ import annotations

import importlib
import logging
from pathlib import Path
from types import ModuleType

from .errors import ExportError, ExportErrorCode

log = logging.getLogger(__name__)


class TensorRTError(ExportError):
    code = ExportErrorCode.ENGINE

    """The engine could not be built; the message says why."""


def import_tensorrt() -> ModuleType:
    try:
        return importlib.import_module("tensorrt")
    except ImportError:
        raise TensorRTError("--format tensorrt needs NVIDIA's `tensorrt` Python package and a "
                            "GPU: install visionserve[gpu] on a CUDA machine") from None


def profile_shapes(input_shape: tuple[int, int, int], max_batch_size: int,
                   opt_batch_size: int | None = None
                   ) -> tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]]:
    """(min, opt, max) shapes of the one optimization profile: batch 1, the typical dynamic
    batch (half the maximum unless given), and max_batch_size."""
    opt = opt_batch_size or max(1, max_batch_size // 2)
    if not 1 <= opt <= max_batch_size:
        raise TensorRTError(f"opt batch size {opt} must lie in 1..{max_batch_size}")
    return ((1, *input_shape), (opt, *input_shape), (max_batch_size, *input_shape))


def build_engine(onnx_path: Path, plan_path: Path, *, input_name: str,
                 input_shape: tuple[int, int, int], max_batch_size: int, fp16: bool,
                 workspace_bytes: int = 1 << 30, timing_cache: Path | None = None,
                 opt_batch_size: int | None = None,
                 trt: ModuleType | None = None) -> dict[str, object]:
    """Build and write the engine; return what export.json records about it."""
    trt = trt or import_tensorrt()
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    network = builder.create_network(0)  # explicit batch is the only mode in TensorRT 10
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):
        errors = [str(parser.get_error(i)) for i in range(parser.num_errors)]
        raise TensorRTError(f"TensorRT could not parse {onnx_path}: {'; '.join(errors)}")
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, workspace_bytes)
    if fp16:
        if not builder.platform_has_fast_fp16:
            log.warning("this GPU has no fast FP16; the FP16 engine may be slower than FP32")
        config.set_flag(trt.BuilderFlag.FP16)
    shapes = profile_shapes(input_shape, max_batch_size, opt_batch_size)
    profile = builder.create_optimization_profile()
    profile.set_shape(input_name, *shapes)
    config.add_optimization_profile(profile)
    cache_bytes = timing_cache.read_bytes() if timing_cache and timing_cache.exists() else b""
    config.set_timing_cache(config.create_timing_cache(cache_bytes), False)
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise TensorRTError(f"TensorRT failed to build an engine from {onnx_path} (see the "
                            "TensorRT log above)")
    plan_path.write_bytes(bytes(serialized))
    if timing_cache is not None:
        timing_cache.write_bytes(bytes(config.get_timing_cache().serialize()))
    return {"version": trt.__version__, "fp16": fp16, "workspace_bytes": workspace_bytes,
            "profile": {"input": input_name, "min": list(shapes[0]), "opt": list(shapes[1]),
                        "max": list(shapes[2])}}
