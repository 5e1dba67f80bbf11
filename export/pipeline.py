"""``visionserve export``: build → (load weights) → ONNX → parity → atomic publish."""

from __future__ import annotations

import json
import logging
import platform
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch

from visionserve.service import install_hint
from visionserve.service.engine.backends.openvino import cpu_capabilities
from visionserve.service.errors import ConfigError
from visionserve.service.format.manifest import write_manifest
from visionserve.service.format.model_config import ModelConfig, OpenVinoConfig
from visionserve.service.format.model_format import (
    CONFIG_FILE,
    EMBEDDING,
    INPUT,
    LABELS_FILE,
    LOGITS,
    MODEL_FILES,
)

from . import architectures
from .architectures import Architecture
from .build import Built, build_model
from .engines import describe, open_engine
from .errors import ExportError, ExportErrorCode, UsageError
from .golden import write_golden
from .onnx_export import OPSET, export_onnx
from .parity import ParityReport, check_parity, top_k_agreement
from .precision import (
    TOLERANCES,
    calibration_images,
    to_fp16,
    to_int8,
)
from .publish import (
    PublishError,
    ensure_model_files,
    next_version,
    publish,
    staging,
    triton_config,
)

log = logging.getLogger(__name__)


class ParityError(ExportError):
    code = ExportErrorCode.PARITY

    """The exported model does not compute what PyTorch computes; nothing was published."""

    def __init__(self, message: str, report: ParityReport | None) -> None:
        super().__init__(message)
        self.report = report


@dataclass(frozen=True, kw_only=True)
class ExportRequest:
    arch: str
    repo: Path
    name: str | None = None
    version: int | None = None
    weights: Path | None = None
    seed: int = 0
    random_weights: bool = False  # seeded random init even where the registry has weights
    num_classes: int | None = None
    labels_file: Path | None = None
    precision: str = "fp32"  # fp32 | fp16 | bf16 | int8
    format: str = "onnx"  # onnx | tensorrt (an engine built from the FP32 ONNX model)
    # the engine of the model folder's config: onnxruntime | openvino; None = onnxruntime,
    # or openvino for bf16
    backend: str | None = None
    calibration: Path | None = None  # int8: a folder of images; None = seeded noise


@dataclass(frozen=True, kw_only=True)
class ExportResult:
    name: str
    version: int
    path: Path
    parity: ParityReport
    seconds: float


STEPS = ("build", "export", "parity", "publish")
EXTERNAL_DATA_BYTES = 1_800_000_000  # ONNX's protobuf limit is 2 GB: larger weights go beside


def export_model(req: ExportRequest, on_step=lambda step: None) -> ExportResult:
    """Export one architecture into ``req.repo``; ``on_step(name)`` reports progress: build,
    export (and the precision's conversion), parity (and the golden set), publish."""
    start = time.perf_counter()
    peak_measured = _reset_peak_rss()
    arch = architectures.get(req.arch)
    name = req.name or arch.name
    model_dir = req.repo / name
    # refuses a combination no engine serves; an existing folder's own config is what serves
    config = _check_folder(model_dir, _default_config(arch, req))
    labels = _labels(arch, req)
    on_step("build")
    built = build_model(arch, len(labels), req.weights, req.random_weights, req.seed)
    # what the ONNX file is checked on: the engine its config names (TensorRT: its FP32 source
    # file on ONNX Runtime first, then the engine itself)
    check_config = replace(config, backend="onnxruntime") if req.format == "tensorrt" \
        else config
    version = req.version or next_version(model_dir)
    with staging(model_dir, version) as staged:
        tmp = staged.version_dir
        on_step("export")
        exporter, precision_record, parity_inputs = _export_onnx(built, arch, req, tmp, name,
                                                                 version, check_config)
        on_step("parity")
        report, golden_record = _check(built, arch, req, tmp, name, version, check_config,
                                       labels, parity_inputs)
        precision_record["engine"] = describe(check_config)
        tensorrt_record = _build_tensorrt(built.wrapped, tmp, arch, req, name, version) \
            if req.format == "tensorrt" else None
        on_step("publish")
        embedding_dim = int(built.wrapped.head.in_features) \
            if hasattr(built.wrapped.head, "in_features") else -1
        (tmp / LABELS_FILE).write_text("\n".join(labels) + "\n", encoding="utf-8")
        seconds = time.perf_counter() - start
        provenance = _provenance(
            arch, req, built, config, len(labels), embedding_dim, exporter=exporter,
            precision=precision_record, tensorrt=tensorrt_record, parity=report.to_dict(),
            golden=golden_record, seconds=seconds,
            peak_rss=_peak_rss_bytes() if peak_measured else None,
            onnx_bytes=sum(p.stat().st_size for p in tmp.iterdir()
                           if p.name.startswith("model.onnx")))
        (tmp / "export.json").write_text(json.dumps(provenance, indent=2) + "\n",
                                         encoding="utf-8")
        write_manifest(tmp)  # last: every other file of the version, with its sha256
        ensure_model_files(staged.model_dir, config, labels,
                           triton_config(name, config, len(labels), embedding_dim))
        path = publish(staged)
    log.info("published %s version %d at %s in %.1f s", name, version, path, seconds)
    return ExportResult(name=name, version=version, path=path, parity=report, seconds=seconds)


def _onnx_precision(req: ExportRequest) -> str:
    """The file's own precision: bf16 is OpenVINO's compute precision on the FP32 file."""
    return "fp32" if req.format == "tensorrt" or req.precision == "bf16" else req.precision


def _export_onnx(built: Built, arch: Architecture, req: ExportRequest, tmp: Path, name: str,
                 version: int, check_config: ModelConfig
                 ) -> tuple[str, dict[str, object], list[torch.Tensor] | None]:
    """``model.onnx`` in ``tmp``, in the file's precision (FP16 converted, INT8 quantized on
    calibration images and its top-k agreement measured on held-out ones). Returns the
    exporter used, the precision record and the inputs parity must use (INT8: held out)."""
    wrapped, shape = built.wrapped, arch.input.shape
    onnx_precision = _onnx_precision(req)
    param_bytes = sum(p.numel() * p.element_size() for p in wrapped.parameters())
    sample = torch.randn((2, *shape), generator=torch.Generator().manual_seed(req.seed))
    model_path = tmp / MODEL_FILES["onnxruntime"]
    fp32_path = model_path if onnx_precision == "fp32" else tmp / "fp32.onnx"
    exporter = export_onnx(wrapped, sample, fp32_path, arch.max_batch_size,
                           external_data=param_bytes > EXTERNAL_DATA_BYTES)
    precision_record: dict[str, object] = {"batchnorm_recalibrated": built.bn_recalibrated}
    parity_inputs = None
    if onnx_precision == "fp16":
        to_fp16(fp32_path, model_path)
    elif onnx_precision == "int8":
        batches, source = calibration_images(arch.input, req.calibration, 48, req.seed)
        calibrate, held_out = batches[: max(1, len(batches) * 2 // 3)], \
            batches[max(1, len(batches) * 2 // 3):]
        kept_float = to_int8(fp32_path, model_path, calibrate)
        parity_inputs = held_out or calibrate
        with open_engine(name, version, check_config, model_path) as engine:
            top1, top5 = top_k_agreement(wrapped, engine, parity_inputs)
        precision_record.update(calibration=source, calibration_inputs=len(calibrate),
                                held_out_inputs=len(held_out), held_out_top1=top1,
                                held_out_top5=top5, kept_float=kept_float)
    for leftover in tmp.glob("fp32.onnx*"):
        leftover.unlink()
    return exporter, precision_record, parity_inputs


def _check(built: Built, arch: Architecture, req: ExportRequest, tmp: Path, name: str,
           version: int, check_config: ModelConfig, labels: list[str],
           parity_inputs: list[torch.Tensor] | None) -> tuple[ParityReport, dict[str, object]]:
    """Parity against PyTorch on the engine that will serve the file (a failure publishes
    nothing), then the golden set written from the same engine."""
    checked_precision = "bf16" if req.precision == "bf16" else _onnx_precision(req)
    engine_name = describe(check_config)
    model_path = tmp / MODEL_FILES["onnxruntime"]
    with open_engine(name, version, check_config, model_path) as engine:
        report = check_parity(built.wrapped, engine, arch.input.shape, seed=req.seed,
                              tolerance=TOLERANCES[checked_precision], inputs=parity_inputs)
        if not report.passed:
            raise ParityError(f"{name} ({arch.name}) version {version}: parity check "
                              f"failed ({checked_precision} on {engine_name}): "
                              f"{report.reason}; nothing was published", report)
        # TensorRT: the engine is built in req.precision from this checked FP32 file
        golden_precision = req.precision if req.format == "tensorrt" else checked_precision
        golden_record = write_golden(tmp, built.wrapped, arch.input, labels, req.seed,
                                     golden_precision, engine, engine_name)
    if golden_record["dropped"]:
        log.warning("%s version %d: golden cases left out, FP32 PyTorch does not reproduce "
                    "itself on them (ill-conditioned weights): %s; %d kept", name, version,
                    ", ".join(golden_record["dropped"]), golden_record["cases"])
    return report, golden_record


def _provenance(arch: Architecture, req: ExportRequest, built: Built, config: ModelConfig,
                num_classes: int, embedding_dim: int, *, exporter: str,
                precision: dict[str, object], tensorrt: dict[str, object] | None,
                parity: dict[str, object], golden: dict[str, object], seconds: float,
                peak_rss: int | None, onnx_bytes: int) -> dict[str, object]:
    """``export.json``: where the version came from and how it was checked."""
    return {
        "architecture": arch.name,
        "family": arch.family,
        "num_classes": num_classes,
        "embedding_dim": embedding_dim,
        "input_shape": list(arch.input.shape),
        "input": asdict(arch.input),
        "outputs": {LOGITS: [-1, num_classes], EMBEDDING: [-1, embedding_dim]},
        "parameters": sum(p.numel() for p in built.wrapped.parameters()),
        "head_reinitialised": built.head_reinitialised,
        "weights": str(req.weights) if req.weights else None,
        "weights_sha256": built.weights_record.get("sha256"),
        "weights_source": built.weights_record,
        "seed": None if req.weights else req.seed,  # of the init, or of the training
        "exporter": exporter,
        "opset": OPSET,
        "precision": req.precision,
        "precision_details": precision,
        "format": req.format,
        "tensorrt": tensorrt,
        "backend": config.backend,
        "engine": describe(config if req.format != "tensorrt"
                           else replace(config, backend="onnxruntime")),
        "versions": {"torch": torch.__version__, "onnx": _version("onnx"),
                     "onnxruntime": _version("onnxruntime"),
                     **({"openvino": _version("openvino")}
                        if config.backend == "openvino" else {}),
                     "python": platform.python_version()},
        "parity": parity,
        "golden": golden,
        "export_seconds": round(seconds, 2),
        # this process's peak resident memory during the export (None: not measurable)
        "export_peak_rss_bytes": peak_rss,
        "onnx_bytes": onnx_bytes,
        "exported_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }


def _labels(arch: Architecture, req: ExportRequest) -> list[str]:
    if req.labels_file:
        labels = [line.strip() for line in req.labels_file.read_text().splitlines()
                  if line.strip()]
        if req.num_classes and req.num_classes != len(labels):
            raise UsageError(f"--labels {req.labels_file} has {len(labels)} lines but "
                             f"--num-classes is {req.num_classes}")
        return labels
    return architectures.default_labels(arch, req.num_classes or arch.num_classes)


def _default_config(arch: Architecture, req: ExportRequest) -> ModelConfig:
    """The config.toml a new model folder gets: the engine and precision the export is for."""
    backend = req.backend or ("openvino" if req.precision == "bf16" else "onnxruntime")
    if req.format == "tensorrt":
        if req.precision not in ("fp32", "fp16"):
            raise UsageError(f"--format tensorrt with --precision {req.precision}: TensorRT "
                             "engines are built in fp32 or fp16 here (INT8 needs a TensorRT "
                             "calibrator, which is not supported)")
        if req.backend:
            raise UsageError("--format tensorrt names its engine itself: leave --backend out")
        backend = "tensorrt"
    elif req.precision == "bf16" and backend != "openvino":
        raise UsageError("--precision bf16 is OpenVINO's (its BF16 inference precision on the "
                         "FP32 file): use --backend openvino, or leave --backend out")
    elif req.precision == "fp16" and backend == "openvino":
        raise UsageError("--precision fp16 with --backend openvino: OpenVINO's CPU plugin "
                         "computes FP16 weights in FP32 or BF16; export fp32 or bf16 for it "
                         "(fp16 is for GPU providers of ONNX Runtime and TensorRT)")
    if backend == "openvino" and not cpu_capabilities():
        implied = "" if req.backend else " (implied by --precision bf16)"
        raise UsageError(f"--backend openvino{implied}: the export is checked on OpenVINO, "
                         f"which is not installed here: {install_hint('openvino')} (make setup "
                         "installs it)")
    if req.precision == "bf16" and "BF16" not in cpu_capabilities():
        raise UsageError(f"--precision bf16 is checked on OpenVINO's BF16 engine, and this CPU "
                         f"does not compute BF16 natively (OpenVINO: {cpu_capabilities()}; "
                         "AVX512_BF16 or AMX is needed: Intel Sapphire Rapids or later, AMD Zen "
                         "4 or later): export it on such a machine, or export fp32/int8 here")
    openvino = OpenVinoConfig(precision="bf16" if req.precision == "bf16" else "fp32")
    return ModelConfig(backend=backend, max_batch_size=arch.max_batch_size, input=arch.input,
                       openvino=openvino,
                       description=f"{arch.name} ({arch.family}), exported by visionserve")


def _check_folder(model_dir: Path, config: ModelConfig) -> ModelConfig:
    """The config the version will serve with: the folder's own when it exists (the operator's
    providers, threads, streams), else ``config``. One model name per engine and OpenVINO
    precision: a version must serve on what it was checked on (an INT8 golden set is the
    engine's own outputs). Refusals fail this model only (``--all`` goes on)."""
    path = model_dir / CONFIG_FILE
    if not path.exists():
        return config
    try:
        existing = ModelConfig.from_toml(path)
    except ConfigError as exc:
        raise PublishError(f"{exc}; fix it or export under another --name") from None
    theirs, ours = describe(existing), describe(config)
    if existing.backend != config.backend or (
            config.backend == "openvino"
            and existing.openvino.precision != config.openvino.precision):
        raise PublishError(f"{model_dir.name} is served by {theirs} ({path}); this export is "
                           f"for {ours}: export it under another --name (one model name per "
                           "engine and OpenVINO precision), or match --backend/--precision to "
                           "the folder")
    return existing


def _build_tensorrt(wrapped: torch.nn.Module, tmp: Path, arch: Architecture, req: ExportRequest,
                    name: str, version: int) -> dict[str, object]:
    """Build model.plan from the checked FP32 ONNX model, then hold the engine itself to
    PyTorch through the server's TensorRT backend (on the GPU this runs on)."""
    import numpy as np

    from visionserve.service.engine.backends.tensorrt import TensorRTBackend
    from visionserve.service.format.repository import VersionEntry

    from .tensorrt_build import build_engine

    fp16 = req.precision == "fp16"
    record = build_engine(tmp / MODEL_FILES["onnxruntime"], tmp / MODEL_FILES["tensorrt"],
                          input_name=INPUT, input_shape=arch.input.shape,
                          max_batch_size=arch.max_batch_size, fp16=fp16)
    backend = TensorRTBackend(name, _default_config(arch, req), VersionEntry(
        version=version, path=tmp, model_file=tmp / MODEL_FILES["tensorrt"], labels=()))
    tolerance = TOLERANCES["fp16" if fp16 else "fp32"]
    gen = torch.Generator().manual_seed(req.seed)
    worst = 0.0
    try:
        for n in (1, 4):
            x = torch.randn((n, *arch.input.shape), generator=gen)
            with torch.no_grad():
                ref = wrapped(x)[0].numpy()
            got = backend.run(x.numpy()).logits
            worst = max(worst, float(np.abs(ref - got).max() / (np.abs(ref).max() or 1.0)))
    finally:
        backend.close()
    if worst > tolerance.max_rel_diff:
        raise ParityError(f"{name} version {version}: the TensorRT engine differs from PyTorch "
                          f"by {worst:.2e} (relative), over {tolerance.max_rel_diff:.0e}; "
                          "nothing was published", None)
    record["logits_max_rel_diff"] = worst
    return record


def _reset_peak_rss() -> bool:
    """Start this process's peak-RSS counter (VmHWM) afresh, so that each export of an
    ``--all`` run records its own peak; False where Linux's clear_refs is not writable."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        return False
    return _peak_rss_bytes() is not None


def _peak_rss_bytes() -> int | None:
    try:
        status = Path("/proc/self/status").read_text()
    except OSError:
        return None
    for line in status.splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    return None


def _version(module: str) -> str:
    import importlib

    return str(getattr(importlib.import_module(module), "__version__", "unknown"))
