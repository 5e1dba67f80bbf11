"""``visionserve export``: build → (load weights) → ONNX → parity → atomic publish."""

from __future__ import annotations

import json
import logging
import platform
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from visionserve.service.config import ModelConfig
from visionserve.service.repository import LABELS_FILE, MODEL_FILES

from . import architectures
from .architectures import Architecture, WithEmbedding, reinit_dead_head
from .onnx_export import OPSET, export_onnx
from .parity import ParityReport, check_parity
from .publish import ensure_model_files, next_version, publish, staging, triton_config
from .weights import load_weights

log = logging.getLogger(__name__)


class ParityError(Exception):
    """The exported model does not compute what PyTorch computes; nothing was published."""

    def __init__(self, message: str, report: ParityReport) -> None:
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
    num_classes: int | None = None
    labels_file: Path | None = None


@dataclass(frozen=True, kw_only=True)
class ExportResult:
    name: str
    version: int
    path: Path
    parity: ParityReport
    seconds: float


STEPS = ("build", "export", "parity", "publish")
EXTERNAL_DATA_BYTES = 1_800_000_000  # ONNX's protobuf limit is 2 GB: larger weights go beside


def export_model(req: ExportRequest, on_step=lambda step: None) -> ExportResult:  # noqa: ANN001
    """Export one architecture into ``req.repo``; ``on_step(name)`` reports progress."""
    start = time.perf_counter()
    arch = architectures.get(req.arch)
    name = req.name or arch.name
    model_dir = req.repo / name
    labels = _labels(arch, req)
    num_classes = len(labels)

    on_step("build")
    torch.manual_seed(req.seed)
    model = arch.build(num_classes)
    weights_sha = load_weights(model, req.weights) if req.weights else None
    wrapped = WithEmbedding(model, arch.head_path(model)).eval()
    head_reinitialised = not req.weights and reinit_dead_head(wrapped.head)
    shape = arch.input.shape
    param_bytes = sum(p.numel() * p.element_size() for p in wrapped.parameters())

    version = req.version or next_version(model_dir)
    with staging(model_dir, version) as tmp:
        on_step("export")
        sample = torch.randn((2, *shape), generator=torch.Generator().manual_seed(req.seed))
        exporter = export_onnx(wrapped, sample, tmp / MODEL_FILES["onnxruntime"],
                               arch.max_batch_size, external_data=param_bytes > EXTERNAL_DATA_BYTES)
        on_step("parity")
        report = check_parity(wrapped, tmp / MODEL_FILES["onnxruntime"], shape, seed=req.seed)
        if not report.passed:
            raise ParityError(f"{name} version {version}: parity check failed: {report.reason}; "
                              "nothing was published", report)
        on_step("publish")
        embedding_dim = int(wrapped.head.in_features) if hasattr(wrapped.head, "in_features") \
            else -1
        files = [p for p in tmp.iterdir() if p.name.startswith("model.onnx")]
        (tmp / LABELS_FILE).write_text("\n".join(labels) + "\n", encoding="utf-8")
        seconds = time.perf_counter() - start
        provenance = {
            "architecture": arch.name,
            "family": arch.family,
            "num_classes": num_classes,
            "embedding_dim": embedding_dim,
            "input_shape": list(shape),
            "input": asdict(arch.input),
            "outputs": {"logits": [-1, num_classes], "embedding": [-1, embedding_dim]},
            "parameters": sum(p.numel() for p in wrapped.parameters()),
            "head_reinitialised": head_reinitialised,
            "weights": str(req.weights) if req.weights else None,
            "weights_sha256": weights_sha,
            "seed": None if req.weights else req.seed,
            "exporter": exporter,
            "opset": OPSET,
            "precision": "fp32",
            "versions": {"torch": torch.__version__, "onnx": _version("onnx"),
                         "onnxruntime": _version("onnxruntime"),
                         "python": platform.python_version()},
            "parity": report.to_dict(),
            "export_seconds": round(seconds, 2),
            "onnx_bytes": sum(p.stat().st_size for p in files),
            "exported_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        }
        (tmp / "export.json").write_text(json.dumps(provenance, indent=2) + "\n",
                                         encoding="utf-8")
        config = _default_config(arch)
        ensure_model_files(model_dir, config, labels,
                           triton_config(name, config, num_classes, embedding_dim))
        path = publish(tmp, model_dir, version)
    log.info("published %s version %d at %s in %.1f s", name, version, path, seconds)
    return ExportResult(name=name, version=version, path=path, parity=report, seconds=seconds)


def _labels(arch: Architecture, req: ExportRequest) -> list[str]:
    if req.labels_file:
        labels = [line.strip() for line in req.labels_file.read_text().splitlines()
                  if line.strip()]
        if req.num_classes and req.num_classes != len(labels):
            raise SystemExit(f"--labels {req.labels_file} has {len(labels)} lines but "
                             f"--num-classes is {req.num_classes}")
        return labels
    return architectures.default_labels(arch, req.num_classes or arch.num_classes)


def _default_config(arch: Architecture) -> ModelConfig:
    return ModelConfig(max_batch_size=arch.max_batch_size, input=arch.input,
                       description=f"{arch.name} ({arch.family}), exported by visionserve")


def _version(module: str) -> str:
    import importlib

    return str(getattr(importlib.import_module(module), "__version__", "unknown"))
