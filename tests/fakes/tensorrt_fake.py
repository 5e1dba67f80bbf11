"""RECORDING FAKES of the TensorRT 10 Python API and cuda-python's runtime bindings — only the
surface visionserve uses, named as fakes. They let the tests check what our code asks of
TensorRT (profile shapes, precision flags, tensors bound by name, copies, version checks)
on machines without a GPU; they prove nothing about TensorRT itself (docs/gpu.md).

The fake "device" is host memory: cudaMalloc returns the address of a numpy buffer, copies are
memmoves, and the fake engine computes logits = per-image input sums × (1..K) and embedding =
per-image input means × (1..D), so every byte's route can be checked.
"""

from __future__ import annotations

import ctypes
import enum
from types import SimpleNamespace

import numpy as np

from visionserve.service.format.model_format import EMBEDDING, INPUT, LOGITS

__version__ = "10.99.0-fake"
calls: list[tuple] = []


class Logger:
    WARNING = "WARNING"

    def __init__(self, level: str) -> None:
        calls.append(("Logger", level))


class MemoryPoolType(enum.Enum):
    WORKSPACE = 0


class BuilderFlag(enum.Enum):
    FP16 = 0
    INT8 = 1


class TensorIOMode(enum.Enum):
    NONE = 0
    INPUT = 1
    OUTPUT = 2


class DataType(enum.Enum):
    FLOAT = 0
    HALF = 1


class _Blob(bytes):
    def serialize(self) -> bytes:
        return bytes(self)


class Builder:
    platform_has_fast_fp16 = True
    fail_build = False

    def __init__(self, logger: Logger) -> None:
        calls.append(("Builder",))

    def create_network(self, flags: int) -> SimpleNamespace:
        calls.append(("create_network", flags))
        return SimpleNamespace()

    def create_builder_config(self) -> BuilderConfig:
        return BuilderConfig()

    def create_optimization_profile(self) -> Profile:
        return Profile()

    def build_serialized_network(self, network: object, config: BuilderConfig) -> bytes | None:
        calls.append(("build_serialized_network", sorted(f.name for f in config.flags)))
        return None if Builder.fail_build else _Blob(b"FAKE-PLAN")


class BuilderConfig:
    def __init__(self) -> None:
        self.flags: set[BuilderFlag] = set()

    def set_memory_pool_limit(self, pool: MemoryPoolType, size: int) -> None:
        calls.append(("set_memory_pool_limit", pool.name, size))

    def set_flag(self, flag: BuilderFlag) -> None:
        self.flags.add(flag)

    def add_optimization_profile(self, profile: Profile) -> None:
        calls.append(("add_optimization_profile", profile.shapes))

    def create_timing_cache(self, data: bytes) -> _Blob:
        calls.append(("create_timing_cache", bytes(data)))
        return _Blob(b"CACHE:" + bytes(data))

    def set_timing_cache(self, cache: _Blob, ignore_mismatch: bool) -> None:
        self._cache = cache
        calls.append(("set_timing_cache", ignore_mismatch))

    def get_timing_cache(self) -> _Blob:
        return _Blob(self._cache + b"+new")


class Profile:
    def __init__(self) -> None:
        self.shapes: dict[str, tuple] = {}

    def set_shape(self, name: str, min: tuple, opt: tuple, max: tuple) -> None:
        self.shapes[name] = (tuple(min), tuple(opt), tuple(max))


class OnnxParser:
    errors: list[str] = []

    def __init__(self, network: object, logger: Logger) -> None:
        pass

    def parse_from_file(self, path: str) -> bool:
        calls.append(("parse_from_file", path))
        return not OnnxParser.errors

    @property
    def num_errors(self) -> int:
        return len(OnnxParser.errors)

    def get_error(self, i: int) -> str:
        return OnnxParser.errors[i]


# --- runtime ---------------------------------------------------------------------------------

ENGINE = {INPUT: (3, 8, 8), LOGITS: 5, EMBEDDING: 4, "max_batch": 16}


class Runtime:
    def __init__(self, logger: Logger) -> None:
        pass

    def deserialize_cuda_engine(self, plan: bytes) -> Engine | None:
        calls.append(("deserialize_cuda_engine", bytes(plan)))
        return Engine() if plan == b"FAKE-PLAN" else None


class Engine:
    names = [INPUT, LOGITS, EMBEDDING]

    @property
    def num_io_tensors(self) -> int:
        return len(self.names)

    def get_tensor_name(self, i: int) -> str:
        return self.names[i]

    def get_tensor_mode(self, name: str) -> TensorIOMode:
        return TensorIOMode.INPUT if name == INPUT else TensorIOMode.OUTPUT

    def get_tensor_dtype(self, name: str) -> DataType:
        return DataType.FLOAT

    def get_tensor_shape(self, name: str) -> tuple:
        return {INPUT: (-1, *ENGINE[INPUT]), LOGITS: (-1, ENGINE[LOGITS]),
                EMBEDDING: (-1, ENGINE[EMBEDDING])}[name]

    def get_tensor_profile_shape(self, name: str, profile: int) -> tuple:
        c = ENGINE[INPUT]
        return ((1, *c), (ENGINE["max_batch"] // 2, *c), (ENGINE["max_batch"], *c))

    def create_execution_context(self) -> Context:
        return Context()


class Context:
    def __init__(self) -> None:
        self.shape: tuple = ()
        self.addresses: dict[str, int] = {}

    def set_input_shape(self, name: str, shape: tuple) -> bool:
        calls.append(("set_input_shape", name, tuple(shape)))
        self.shape = tuple(shape)
        return shape[0] <= ENGINE["max_batch"]

    def set_tensor_address(self, name: str, address: int) -> None:
        calls.append(("set_tensor_address", name))
        self.addresses[name] = address

    def execute_async_v3(self, stream: int) -> bool:
        calls.append(("execute_async_v3", stream))
        n = self.shape[0]
        x = _view(self.addresses[INPUT], (n, int(np.prod(self.shape[1:]))))
        k, d = ENGINE[LOGITS], ENGINE[EMBEDDING]
        _view(self.addresses[LOGITS], (n, k))[:] = x.sum(1, keepdims=True) * np.arange(1, k + 1)
        _view(self.addresses[EMBEDDING], (n, d))[:] = \
            x.mean(1, keepdims=True) * np.arange(1, d + 1)
        return True


def _view(address: int, shape: tuple) -> np.ndarray:
    return np.ctypeslib.as_array((ctypes.c_float * int(np.prod(shape))).from_address(address)
                                 ).reshape(shape)


class cudart:
    """Fake of cuda.bindings.runtime: (error, value) tuples, host memory as the device."""

    class cudaError_t(enum.Enum):
        cudaSuccess = 0
        cudaErrorMemoryAllocation = 2

    class cudaMemcpyKind(enum.Enum):
        cudaMemcpyHostToDevice = 1
        cudaMemcpyDeviceToHost = 2

    buffers: dict[int, np.ndarray] = {}
    freed: list[int] = []

    @classmethod
    def cudaMalloc(cls, size: int) -> tuple:
        buf = np.zeros(size, np.uint8)
        cls.buffers[buf.ctypes.data] = buf
        calls.append(("cudaMalloc", size))
        return cls.cudaError_t.cudaSuccess, buf.ctypes.data

    @classmethod
    def cudaFree(cls, pointer: int) -> tuple:
        cls.freed.append(pointer)
        return (cls.cudaError_t.cudaSuccess,)

    @classmethod
    def cudaMemcpyAsync(cls, dst: int, src: int, size: int, kind: object,
                        stream: int) -> tuple:
        calls.append(("cudaMemcpyAsync", kind.name, size))
        ctypes.memmove(dst, src, size)
        return (cls.cudaError_t.cudaSuccess,)

    @classmethod
    def cudaStreamCreate(cls) -> tuple:
        return cls.cudaError_t.cudaSuccess, 7

    @classmethod
    def cudaStreamSynchronize(cls, stream: int) -> tuple:
        calls.append(("cudaStreamSynchronize", stream))
        return (cls.cudaError_t.cudaSuccess,)

    @classmethod
    def cudaStreamDestroy(cls, stream: int) -> tuple:
        return (cls.cudaError_t.cudaSuccess,)
