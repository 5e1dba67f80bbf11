"""TensorRT backend: a serialized engine (``model.plan``) run through TensorRT's documented
Python API (10.x: tensors bound by name, ``execute_async_v3``) with CUDA memory from
``cuda-python``'s runtime bindings.

Not runnable on any machine of this project (no GPU): the code follows the documented API and is
tested against recording fakes of TensorRT and the CUDA runtime (tests/fakes/). What was and
was not run is in docs/gpu.md.
"""

from __future__ import annotations

import importlib
import json
import threading
from types import ModuleType

import numpy as np

from ...errors import BackendError, ConfigError
from ...format.model_config import ModelConfig
from ...format.repository import VersionEntry
from .base import Backend, ModelOutputs


def _import(name: str, where: str) -> ModuleType:
    try:
        return importlib.import_module(name)
    except ImportError:
        raise ConfigError(f"{where}: backend = \"tensorrt\" needs the `{name}` package and an "
                          "NVIDIA GPU (install visionserve[gpu] on a CUDA image), or set "
                          "backend = \"onnxruntime\"") from None


class TensorRTBackend(Backend):
    """One engine, one execution context, device buffers sized for max_batch_size, one CUDA
    stream; ``run`` is serialized by a lock (one context runs one batch at a time)."""

    def __init__(self, name: str, config: ModelConfig, version: VersionEntry,
                 trt: ModuleType | None = None, cudart: ModuleType | None = None) -> None:
        where = f"model {name} version {version.version}"
        self._trt = trt or _import("tensorrt", where)
        self._cudart = cudart or _import("cuda.bindings.runtime", where)
        self._where = where
        built_with = _recorded_tensorrt_version(version)
        if built_with and built_with != self._trt.__version__:
            raise ConfigError(f"{where}: the engine was built with TensorRT {built_with}, this "
                              f"server runs {self._trt.__version__}; engines are not portable "
                              "across versions: rebuild it with `visionserve export --format "
                              "tensorrt` on this image")
        logger = self._trt.Logger(self._trt.Logger.WARNING)
        self._runtime = self._trt.Runtime(logger)
        self._engine = self._runtime.deserialize_cuda_engine(version.model_file.read_bytes())
        if self._engine is None:
            raise BackendError(f"{where}: TensorRT could not deserialize {version.model_file}")
        self._input = config.input.name
        self._outputs = (config.output.logits, config.output.embedding)
        self._check_io(config)
        self._context = self._engine.create_execution_context()
        self._lock = threading.Lock()
        self._stream = self._call("cudaStreamCreate")
        self._max_batch = config.max_batch_size
        self._shapes = {self._input: config.input.shape,
                        self._outputs[0]: (self.num_classes,),
                        self._outputs[1]: (self.embedding_dim,)}
        self._device = {n: self._call("cudaMalloc", self._max_batch * int(np.prod(s)) * 4)
                        for n, s in self._shapes.items()}

    def _check_io(self, config: ModelConfig) -> None:
        trt, engine, where = self._trt, self._engine, self._where
        names = [engine.get_tensor_name(i) for i in range(engine.num_io_tensors)]
        modes = {n: engine.get_tensor_mode(n) for n in names}
        if modes.get(self._input) != trt.TensorIOMode.INPUT:
            raise ConfigError(f"{where}: input.name {self._input!r} is not an input of the "
                              f"engine (its tensors: {names})")
        for out in self._outputs:
            if modes.get(out) != trt.TensorIOMode.OUTPUT:
                raise ConfigError(f"{where}: output {out!r} is not an output of the engine "
                                  f"(its tensors: {names})")
        for n in (self._input, *self._outputs):
            if engine.get_tensor_dtype(n) != trt.DataType.FLOAT:
                raise ConfigError(f"{where}: tensor {n!r} is not FP32; build the engine from "
                                  "the FP32-I/O ONNX model that visionserve export writes")
        max_shape = tuple(engine.get_tensor_profile_shape(self._input, 0)[2])
        if tuple(max_shape[1:]) != config.input.shape:
            raise ConfigError(f"{where}: the engine's input is {list(max_shape[1:])}, "
                              f"config.toml says {list(config.input.shape)}")
        if max_shape[0] < config.max_batch_size:
            raise ConfigError(f"{where}: the engine's profile allows batches up to "
                              f"{max_shape[0]}, below max_batch_size = {config.max_batch_size}; "
                              "lower max_batch_size or rebuild the engine")
        self.num_classes = int(engine.get_tensor_shape(self._outputs[0])[-1])
        self.embedding_dim = int(engine.get_tensor_shape(self._outputs[1])[-1])

    def run(self, batch: np.ndarray) -> ModelOutputs:
        n = batch.shape[0]
        if n > self._max_batch:
            raise BackendError(f"{self._where}: batch of {n} over the engine's {self._max_batch}")
        batch = np.ascontiguousarray(batch, dtype=np.float32)
        out = {name: np.empty((n, *self._shapes[name]), np.float32) for name in self._outputs}
        cudart = self._cudart
        with self._lock:
            if not self._context.set_input_shape(self._input, batch.shape):
                raise BackendError(f"{self._where}: the engine refused input shape "
                                   f"{list(batch.shape)}")
            for name, pointer in self._device.items():
                self._context.set_tensor_address(name, pointer)
            self._call("cudaMemcpyAsync", self._device[self._input], batch.ctypes.data,
                       batch.nbytes, cudart.cudaMemcpyKind.cudaMemcpyHostToDevice, self._stream)
            if not self._context.execute_async_v3(self._stream):
                raise BackendError(f"{self._where}: TensorRT execution failed")
            for name, host in out.items():
                self._call("cudaMemcpyAsync", host.ctypes.data, self._device[name], host.nbytes,
                           cudart.cudaMemcpyKind.cudaMemcpyDeviceToHost, self._stream)
            self._call("cudaStreamSynchronize", self._stream)
        return ModelOutputs(out[self._outputs[0]], out[self._outputs[1]])

    def close(self) -> None:
        for pointer in self._device.values():
            self._call("cudaFree", pointer)
        self._call("cudaStreamDestroy", self._stream)
        self._device = {}
        del self._context, self._engine, self._runtime

    def _call(self, function: str, *args: object) -> object:
        """cuda-python returns (error, value…); raise on any error, return the value."""
        result = getattr(self._cudart, function)(*args)
        err, *values = result if isinstance(result, tuple) else (result,)
        if err != self._cudart.cudaError_t.cudaSuccess:
            raise BackendError(f"{self._where}: CUDA {function} failed: {err}")
        return values[0] if values else None


def _recorded_tensorrt_version(version: VersionEntry) -> str:
    record = version.path / "export.json"
    if not record.is_file():
        return ""
    try:
        return str(json.loads(record.read_text()).get("tensorrt", {}).get("version", ""))
    except (ValueError, AttributeError):
        return ""
