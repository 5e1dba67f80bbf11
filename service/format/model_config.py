"""A model's ``config.toml``: typed, validated, one frozen dataclass per section.

``ModelConfig.from_toml`` is the only parser. Every error names the file and the key, so a bad
config fails that model with a message an operator can act on. The export stage writes these
files through ``ModelConfig.to_toml`` (it writes what the server reads); the keys are documented
in docs/config.md.
"""

from __future__ import annotations

import tomllib
from dataclasses import MISSING, asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

from ..errors import ConfigError
from . import model_format

INTERPOLATIONS = ("nearest", "bilinear", "bicubic", "box", "hamming", "lanczos")
DECODERS = ("exact", "fast")
COLORS = ("RGB", "BGR", "L")
RAW_DTYPES = ("float32", "uint8")
RAW_LAYOUTS = ("CHW", "HWC")
BACKENDS = ("onnxruntime", "openvino", "tensorrt")
OPENVINO_PRECISIONS = ("fp32", "bf16")


@dataclass(frozen=True, kw_only=True)
class InputSpec:
    """What the network takes and how an encoded image becomes that (torchvision semantics)."""

    name: str = model_format.INPUT
    channels: int = 3
    height: int = 224
    width: int = 224
    color: str = "RGB"  # RGB | BGR | L (grayscale, one channel)
    resize: int = 256  # shorter side before the centre crop (torchvision Resize(int)); 0 = none
    interpolation: str = "bilinear"
    mean: tuple[float, ...] = (0.485, 0.456, 0.406)
    std: tuple[float, ...] = (0.229, 0.224, 0.225)
    raw_dtypes: tuple[str, ...] = RAW_DTYPES
    raw_layouts: tuple[str, ...] = RAW_LAYOUTS
    # "exact": full-size decode, bit-identical to torchvision. "fast": the JPEG decoder's DCT
    # scaling (Pillow draft) to the smallest size still >= the resize target, then the same
    # resize; not bit-identical (docs/benchmarks.md measures speed and agreement).
    decoder: str = "exact"

    @property
    def shape(self) -> tuple[int, int, int]:
        return (self.channels, self.height, self.width)

    def forms(self) -> list[tuple[str, tuple[int, ...]]]:
        """Every (datatype, shape) this input accepts on the wire, batch dimension -1, the
        model's own FP32 first: what ModelMetadata and ModelConfig advertise, errors list."""
        c, h, w = self.shape
        forms: list[tuple[str, tuple[int, ...]]] = []
        if "float32" in self.raw_dtypes:
            forms.append(("FP32", (-1, c, h, w)))
        if "uint8" in self.raw_dtypes:
            forms += [("UINT8", shape) for layout, shape in (("HWC", (-1, h, w, c)),
                                                             ("CHW", (-1, c, h, w)))
                      if layout in self.raw_layouts]
        forms.append(("BYTES", (-1,)))  # encoded images; [-1, 1] is accepted too
        return forms

    def describe_forms(self) -> str:
        """``FP32 [-1, 3, 224, 224], UINT8 [-1, 224, 224, 3] or BYTES [-1] (encoded images)``"""
        parts = [f"{dtype} {list(shape)}" for dtype, shape in self.forms()]
        head = ", ".join(parts[:-1])
        return f"{head + ' or ' if head else ''}{parts[-1]} (encoded images)"

    def validate(self, where: str) -> None:
        _check(self.channels in (1, 3), where, "input.channels", "must be 1 or 3", self.channels)
        _check(self.height > 0 and self.width > 0, where, "input.height/width", "must be > 0",
               (self.height, self.width))
        _check(self.color in COLORS, where, "input.color", f"must be one of {COLORS}", self.color)
        _check((self.color == "L") == (self.channels == 1), where, "input.color",
               "must be 'L' exactly when channels = 1", self.color)
        _check(self.resize >= 0, where, "input.resize", "must be >= 0 (0 = no resize)", self.resize)
        _check(self.interpolation in INTERPOLATIONS, where, "input.interpolation",
               f"must be one of {INTERPOLATIONS}", self.interpolation)
        for key, values in (("input.mean", self.mean), ("input.std", self.std)):
            _check(len(values) == self.channels, where, key,
                   f"needs one value per channel ({self.channels})", list(values))
        _check(all(s > 0 for s in self.std), where, "input.std", "must be > 0", list(self.std))
        _check(set(self.raw_dtypes) <= set(RAW_DTYPES), where, "input.raw_dtypes",
               f"must be a subset of {RAW_DTYPES}", list(self.raw_dtypes))
        _check(set(self.raw_layouts) <= set(RAW_LAYOUTS), where, "input.raw_layouts",
               f"must be a subset of {RAW_LAYOUTS}", list(self.raw_layouts))
        _check(self.decoder in DECODERS, where, "input.decoder", f"must be one of {DECODERS}",
               self.decoder)


@dataclass(frozen=True, kw_only=True)
class OutputSpec:
    """Names of the model's two outputs (one forward pass computes both)."""

    logits: str = model_format.LOGITS
    embedding: str = model_format.EMBEDDING


@dataclass(frozen=True, kw_only=True)
class BatchingConfig:
    """Dynamic batching of one model version (DESIGN §5).

    ``max_queue_delay_ms`` only lets an *idle* instance wait for more work, up to the largest
    preferred batch size; with 0 (the default) a lone request never waits for company.
    ``max_queue_size`` counts images, not requests.
    """

    max_queue_delay_ms: float = 0.0
    preferred_batch_sizes: tuple[int, ...] = ()
    max_queue_size: int = 1024
    default_timeout_ms: float = 0.0  # applied when the client sets no deadline; 0 = none
    # refuse at once (RESOURCE_EXHAUSTED) a request whose deadline the queue ahead of it cannot
    # meet at the recent compute rate, instead of letting it time out in the queue
    reject_unreachable_deadlines: bool = True

    def validate(self, where: str, max_batch_size: int) -> None:
        _check(self.max_queue_delay_ms >= 0, where, "batching.max_queue_delay_ms", "must be >= 0",
               self.max_queue_delay_ms)
        _check(all(0 < b <= max_batch_size for b in self.preferred_batch_sizes), where,
               "batching.preferred_batch_sizes",
               f"must lie in 1..max_batch_size ({max_batch_size})",
               list(self.preferred_batch_sizes))
        _check(self.max_queue_size >= max_batch_size, where, "batching.max_queue_size",
               f"must be >= max_batch_size ({max_batch_size})", self.max_queue_size)
        _check(self.default_timeout_ms >= 0, where, "batching.default_timeout_ms", "must be >= 0",
               self.default_timeout_ms)


@dataclass(frozen=True, kw_only=True)
class OnnxRuntimeConfig:
    """ONNX Runtime session options. 0 threads = one per core of this machine."""

    providers: tuple[str, ...] = ("CPUExecutionProvider",)
    intra_op_threads: int = 0
    inter_op_threads: int = 1
    graph_optimization: str = "all"  # disable | basic | extended | all
    # ORT's worker threads busy-wait between ops by default; in a server that shares its cores
    # with gRPC and preprocessing threads, spinning steals the time they need.
    allow_spinning: bool = False


@dataclass(frozen=True, kw_only=True)
class OpenVinoConfig:
    """OpenVINO's CPU plugin (``backend = "openvino"``; docs/config.md).

    ``precision`` is the inference precision of the float layers, always passed explicitly:
    OpenVINO's own default is BF16 wherever the CPU has it, which would silently break FP32
    parity. ``streams`` are OpenVINO's CPU streams, each running one batch at a time with
    ``threads / streams`` threads; 0 = one per instance (``instance_count``). 0 threads = one per
    core of this machine."""

    precision: str = "fp32"  # fp32 | bf16 (needs a CPU with AVX512_BF16 or AMX)
    threads: int = 0
    streams: int = 0
    # pinning threads to cores helps a machine that runs nothing else; a server shares its
    # cores with gRPC, decoding and preprocessing threads
    cpu_pinning: bool = False

    def validate(self, where: str, instance_count: int) -> None:
        _check(self.precision in OPENVINO_PRECISIONS, where, "openvino.precision",
               f"must be one of {OPENVINO_PRECISIONS}", self.precision)
        _check(self.threads >= 0, where, "openvino.threads", "must be >= 0 (0 = one per core)",
               self.threads)
        # the batcher runs instance_count batches at once: a stream more would never compute
        _check(0 <= self.streams <= instance_count, where, "openvino.streams",
               f"must lie in 0..instance_count ({instance_count}; 0 = one per instance): only "
               "instance_count batches run at once, so raise instance_count instead",
               self.streams)
        _check(not self.threads or self.threads >= (self.streams or instance_count), where,
               "openvino.threads", "must be 0 or at least one per stream", self.threads)


@dataclass(frozen=True, kw_only=True)
class VersionPolicy:
    """Which versions on disk are served: the newest ``latest``, a ``specific`` list, or ``all``."""

    latest: int = 1
    specific: tuple[int, ...] = ()
    all: bool = False

    def select(self, versions: list[int]) -> list[int]:
        """Versions to serve, newest first."""
        ordered = sorted(versions, reverse=True)
        if self.all:
            return ordered
        if self.specific:
            return [v for v in ordered if v in self.specific]
        return ordered[: self.latest]


@dataclass(frozen=True, kw_only=True)
class ModelConfig:
    """Everything the server needs to know about one model, from ``<model>/config.toml``."""

    backend: str = "onnxruntime"
    max_batch_size: int = 32
    instance_count: int = 1
    input: InputSpec = field(default_factory=InputSpec)
    output: OutputSpec = field(default_factory=OutputSpec)
    batching: BatchingConfig = field(default_factory=BatchingConfig)
    onnxruntime: OnnxRuntimeConfig = field(default_factory=OnnxRuntimeConfig)
    openvino: OpenVinoConfig = field(default_factory=OpenVinoConfig)
    version_policy: VersionPolicy = field(default_factory=VersionPolicy)
    warmup_batch_sizes: tuple[int, ...] = (1,)
    description: str = ""

    @classmethod
    def from_toml(cls, path: Path) -> ModelConfig:
        where = str(path)
        try:
            raw = tomllib.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise ConfigError(f"{where}: missing; every model folder needs a config.toml "
                              "(see docs/config.md)") from None
        except UnicodeDecodeError:
            raise ConfigError(f"{where}: not UTF-8 text; TOML files are UTF-8") from None
        except OSError as exc:
            raise ConfigError(f"{where}: cannot be read ({exc.strerror or exc}); it must be a "
                              "readable file") from None
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"{where}: not valid TOML: {exc}") from None
        return cls.from_dict(raw, where)

    @classmethod
    def from_dict(cls, raw: dict[str, Any], where: str) -> ModelConfig:
        sections = {
            "input": InputSpec,
            "output": OutputSpec,
            "batching": BatchingConfig,
            "onnxruntime": OnnxRuntimeConfig,
            "openvino": OpenVinoConfig,
            "version_policy": VersionPolicy,
        }
        top: dict[str, Any] = {}
        for key, value in raw.items():
            if key in sections:
                if not isinstance(value, dict):
                    raise ConfigError(f"{where}: [{key}] must be a table")
                top[key] = _build(sections[key], value, where, prefix=f"{key}.")
            elif key == "warmup":
                if not isinstance(value, dict):
                    raise ConfigError(f"{where}: [warmup] must be a table, got {value!r}")
                warmup = _build(_Warmup, value, where, "warmup.")
                top["warmup_batch_sizes"] = list(warmup.batch_sizes)
            else:
                top[key] = value
        config = _build(cls, top, where, prefix="")
        config.validate(where)
        return config

    def validate(self, where: str) -> None:
        _check(self.backend in BACKENDS, where, "backend", f"must be one of {BACKENDS}",
               self.backend)
        _check(self.max_batch_size >= 1, where, "max_batch_size", "must be >= 1",
               self.max_batch_size)
        _check(self.instance_count >= 1, where, "instance_count", "must be >= 1",
               self.instance_count)
        _check(all(0 < b <= self.max_batch_size for b in self.warmup_batch_sizes), where,
               "warmup.batch_sizes", f"must lie in 1..max_batch_size ({self.max_batch_size})",
               list(self.warmup_batch_sizes))
        _check(self.version_policy.latest >= 1, where, "version_policy.latest", "must be >= 1",
               self.version_policy.latest)
        self.input.validate(where)
        self.batching.validate(where, self.max_batch_size)
        self.openvino.validate(where, self.instance_count)

    def to_toml(self) -> str:
        """Serialize (used by the export stage when it creates a model folder)."""
        data = asdict(self)
        # each engine's section only where it is the model's: an [openvino] table under an
        # ONNX Runtime model would read as if it applied
        for backend in ("onnxruntime", "openvino"):
            if self.backend != backend and getattr(self, backend) == type(getattr(self, backend))():
                del data[backend]
        data["warmup"] = {"batch_sizes": list(data.pop("warmup_batch_sizes"))}
        lines = ["# visionserve model config; keys are documented in docs/config.md"]
        scalars = {k: v for k, v in data.items() if not isinstance(v, dict)}
        for key, value in scalars.items():
            lines.append(f"{key} = {_toml_value(value)}")
        for key, value in data.items():
            if isinstance(value, dict):
                lines.append(f"\n[{key}]")
                lines.extend(f"{k} = {_toml_value(v)}" for k, v in value.items())
        return "\n".join(lines) + "\n"


@dataclass(frozen=True, kw_only=True)
class _Warmup:
    batch_sizes: tuple[int, ...] = (1,)


def _build(cls: type, values: dict[str, Any], where: str, prefix: str) -> Any:
    known = {f.name: f for f in fields(cls)}
    unknown = sorted(set(values) - set(known))
    if unknown:
        raise ConfigError(f"{where}: unknown key {prefix}{unknown[0]} "
                          f"(known keys: {', '.join(prefix + k for k in known)})")
    kwargs: dict[str, Any] = {}
    for key, value in values.items():
        default = getattr(cls(), key) if not _is_nested(known[key]) else None
        if isinstance(default, tuple):
            if not isinstance(value, list):
                raise ConfigError(f"{where}: {prefix}{key} must be a list, got {value!r}")
            value = tuple(value)
            item = _ITEM_TYPES[str(known[key].type)]
            if not all(isinstance(v, item) and not isinstance(v, bool) or
                       (item is float and isinstance(v, int) and not isinstance(v, bool))
                       for v in value):
                raise ConfigError(f"{where}: {prefix}{key} must be a list of "
                                  f"{item.__name__}, got {list(value)!r}")
        elif isinstance(default, bool):
            if not isinstance(value, bool):
                raise ConfigError(f"{where}: {prefix}{key} must be true or false, got {value!r}")
        elif isinstance(default, float):
            if isinstance(value, bool) or not isinstance(value, int | float):
                raise ConfigError(f"{where}: {prefix}{key} must be a number, got {value!r}")
            value = float(value)
        elif isinstance(default, int | str) and not isinstance(value, type(default)):
            raise ConfigError(f"{where}: {prefix}{key} must be {type(default).__name__}, "
                              f"got {value!r}")
        kwargs[key] = value
    return cls(**kwargs)


# the element type of every tuple field, by its annotation (a string: postponed annotations)
_ITEM_TYPES: dict[str, type] = {"tuple[int, ...]": int, "tuple[str, ...]": str,
                                "tuple[float, ...]": float}


def _is_nested(f: Any) -> bool:
    """Sections ([input], [batching]…) are the only fields built by a default factory."""
    return f.default_factory is not MISSING


def _check(ok: bool, where: str, key: str, rule: str, got: Any) -> None:
    if not ok:
        raise ConfigError(f"{where}: {key} {rule}, got {got!r}")


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'
    if isinstance(value, list | tuple):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    return repr(value)
