"""The golden set every export writes into the version it publishes (``<N>/golden/``), which
the server runs through its own path before the version serves (``service/models/golden.py``
reads it; the format is documented there and in docs/lifecycle.md).

What it holds: three real photos as encoded files (bundled in ``golden_images/``: a JPEG under
twice the resize target, a JPEG above it, where ``decoder = "fast"`` decodes at a reduced DCT
scale, and a PNG), a seeded uint8 HWC image and a seeded float32 CHW tensor; for each, FP32
PyTorch's logits and embedding, the photos' once per decoder. The photos' reference tensors come
from ``torchvision.transforms`` (Resize, CenterCrop, ToTensor, Normalize on a PIL image), not
from the server's preprocessing, so a drift of either shows. Also recorded: the labels (a copy and
their sha256) and the ``[input]`` values the numbers depend on.

The tolerance is the precision's parity tolerance (FP32 3e-3, FP16 3e-2, BF16 1.5e-2 of the
output's scale), and export refuses to publish a version that misses its own golden set on the
engine it is configured for. INT8 has no tolerance against PyTorch (with random weights it
differs by up to its whole logit scale): its expected outputs are the version's own on that
engine at export, held to ``INT8_TOLERANCE``: so an INT8 set is engine-specific (ONNX Runtime and
OpenVINO differ by 0.33–0.50 of the scale on the same random-weight ResNet-50 QDQ file:
``python -m visionserve.bench.openvino_load``).
"""

from __future__ import annotations

import io
import json
import math
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch import nn

from visionserve.service.engine.backends import Backend
from visionserve.service.engine.preprocess import scaled_decode_size
from visionserve.service.format.model_config import DECODERS, InputSpec
from visionserve.service.models.golden import (
    FORMAT,
    GOLDEN_DIR,
    MANIFEST,
    labels_sha256,
    preprocessing_record,
    rel_diff,
)

from .errors import ExportError, ExportErrorCode
from .precision import TOLERANCES

PHOTOS = ("chelsea.jpg", "astronaut.jpg", "coffee.png")  # scikit-image's data: CC0 / NASA PD
# INT8 is held to its own outputs at export: other INT8 kernels round differently (ONNX
# Runtime's unfused QDQ path: 2.3e-2 of the scale on ResNet-18, its thread counts: 0)
INT8_TOLERANCE = 0.1
# a case is kept when PyTorch's batch-1 and batched results agree to this (a quarter of FP32's
# tolerance: what is left is the engine's)
REPRODUCIBLE = 7.5e-4
# ... and when inputs moved by this much of themselves (about 8 float32 ulps) move them less
PERTURBATION = 1e-6


class GoldenError(ExportError):
    code = ExportErrorCode.PARITY

    """The exported version misses its own golden set; nothing was published."""


@dataclass(frozen=True)
class _Case:
    name: str
    input_file: str
    decoder: str  # "" for tensors
    tensor: torch.Tensor  # what the network takes, [C, H, W]


def photo_bytes(name: str) -> bytes:
    return resources.files("visionserve.export").joinpath("golden_images", name).read_bytes()


def reference_tensor(data: bytes, spec: InputSpec, decoder: str) -> torch.Tensor:
    """An encoded image as torchvision's eval transform makes it (``decoder = "fast"``: after the
    JPEG decoder's DCT scaling to the size the server decodes at)."""
    from torchvision import transforms
    from torchvision.transforms import InterpolationMode

    img = Image.open(io.BytesIO(data))
    if decoder == "fast" and img.format == "JPEG":
        mode = img.mode if img.mode in ("L", "RGB") else None
        img.draft(mode, scaled_decode_size(img.size, spec))
    img = img.convert("L" if spec.color == "L" else "RGB")
    steps: list[object] = []
    if spec.resize:
        steps.append(transforms.Resize(spec.resize,
                                       interpolation=InterpolationMode[spec.interpolation.upper()]))
    steps += [transforms.CenterCrop((spec.height, spec.width)), transforms.ToTensor()]
    tensor = transforms.Compose(steps)(img)
    if spec.color == "BGR":
        tensor = tensor.flip(0)
    return transforms.Normalize(spec.mean, spec.std)(tensor)


def _cases(spec: InputSpec, seed: int) -> tuple[list[_Case], dict[str, bytes | np.ndarray]]:
    cases, files = [], {}
    for photo in PHOTOS:
        files[photo] = data = photo_bytes(photo)
        stem = photo.rsplit(".", 1)[0]
        for decoder in DECODERS:
            cases.append(_Case(f"{stem} ({decoder})", photo, decoder,
                               reference_tensor(data, spec, decoder)))
    rng = np.random.default_rng(seed)
    pixels = rng.integers(0, 256, (spec.height, spec.width, spec.channels), dtype=np.uint8)
    files["noise-uint8.npy"] = pixels
    mean = torch.tensor(spec.mean)[:, None, None]
    std = torch.tensor(spec.std)[:, None, None]
    as_float = torch.from_numpy(pixels).permute(2, 0, 1).float().div(255)
    cases.append(_Case("noise uint8 HWC", "noise-uint8.npy", "", (as_float - mean) / std))
    noise = rng.standard_normal(spec.shape, dtype=np.float32)
    files["noise-float32.npy"] = noise
    cases.append(_Case("noise float32 CHW", "noise-float32.npy", "", torch.from_numpy(noise)))
    return cases, files


def write_golden(version_dir: Path, model: nn.Module, spec: InputSpec, labels: list[str],
                 seed: int, precision: str, engine: Backend,
                 engine_name: str) -> dict[str, object]:
    """Write ``version_dir/golden/``; return what export.json records of it. Raises GoldenError
    when the exported model on ``engine`` (the one it will serve on, ``engine_name``) misses
    the set (FP32/FP16/BF16)."""
    cases, files = _cases(spec, seed)
    cases, reference, dropped = _reproducible(model, cases, seed)
    files = {name: content for name, content in files.items()
             if any(c.input_file == name for c in cases)}
    batch = torch.stack([c.tensor for c in cases])
    got = _engine_outputs(engine, batch.numpy())
    measured = max(rel_diff(r[i], e[i]) for r, e in zip(reference, got, strict=True)
                   for i in range(len(cases)))
    if math.isinf(TOLERANCES[precision].max_rel_diff):
        # INT8 differs from PyTorch by up to its whole scale on near-tie (random) networks: a
        # check against PyTorch would pass anything. It holds the version to its own outputs.
        expected, tolerance = got, INT8_TOLERANCE
        why = (f"{precision}: against this version's own outputs on {engine_name} at "
               f"export, which differ from FP32 PyTorch by {measured:.1e}; ONNX Runtime's "
               "unfused INT8 path differs from its fused kernels by 2.3e-2 (ResNet-18)")
        source = f"this version on {engine_name}, at export"
    else:
        expected, tolerance = reference, TOLERANCES[precision].max_rel_diff
        why = f"{precision} parity tolerance"
        source = f"FP32 PyTorch {torch.__version__}"
        if measured > tolerance:
            raise GoldenError(f"the exported model on {engine_name} differs from PyTorch on its "
                              f"golden set by {measured:.1e} of the output's scale, over the "
                              f"{precision} tolerance {tolerance:.2g}; nothing was published")
    folder = version_dir / GOLDEN_DIR
    entries = _write_cases(folder, files, labels, cases, expected)
    manifest = {
        "format": FORMAT,
        "expected_from": source,
        "tolerance": {"max_rel_diff": tolerance, "why": why},
        "engine_vs_pytorch_at_export": measured,
        "labels_sha256": labels_sha256(labels),
        "labels": "labels.txt",
        "preprocessing": preprocessing_record(spec),
        "cases": entries,
        "dropped": dropped,
    }
    (folder / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n", encoding="utf-8")
    return {"cases": len(entries), "dropped": [d["name"] for d in dropped],
            "expected_from": source, "max_rel_diff": tolerance, "engine_vs_pytorch": measured}


def _write_cases(folder: Path, files: dict[str, bytes | np.ndarray], labels: list[str],
                 cases: list[_Case], expected: Any) -> list[dict[str, object]]:
    """The set's input files, labels and expected outputs in ``folder``; its manifest
    entries."""
    folder.mkdir()
    for name, content in files.items():
        if isinstance(content, bytes):
            (folder / name).write_bytes(content)
        else:
            np.save(folder / name, content, allow_pickle=False)
    (folder / "labels.txt").write_text("\n".join(labels) + "\n", encoding="utf-8")
    entries = []
    for i, case in enumerate(cases):
        stem = case.name.replace(" ", "-").replace("(", "").replace(")", "")
        entry: dict[str, object] = {"name": case.name, "input": case.input_file}
        if case.decoder:
            entry["decoder"] = case.decoder
        for output, values in zip(("logits", "embedding"), expected, strict=True):
            np.save(folder / f"{stem}.{output}.npy", values[i], allow_pickle=False)
            entry[output] = f"{stem}.{output}.npy"
        entries.append(entry)
    return entries


def _reproducible(model: nn.Module, cases: list[_Case], seed: int
                  ) -> tuple[list[_Case], tuple[np.ndarray, np.ndarray], list[dict[str, object]]]:
    """The cases on which FP32 PyTorch's outputs are reproducible within ``REPRODUCIBLE``, with
    their batch-1 outputs; and the others, with how far PyTorch moved. Two tests, both on PyTorch
    alone: batch 1 against one batch of all cases (another summation order), and the inputs
    moved by ``PERTURBATION`` of themselves (a few float32 ulps: what any engine's rounding
    differs by). No engine can be held closer to a reference than the reference is to itself:
    random weights with BatchNorm re-estimated on Gaussian noise are ill-conditioned on some real
    inputs (EfficientNet-B1: logits of 2500 on the astronaut, 0.4 on noise; PyTorch's own
    batch-1 and batch-8 results 3.7e-2 apart), and chaotic on others (EfficientNet-B5 on the
    uint8 noise image: logits of 1.1e6, where inputs moved by 1e-7 move its outputs by 2e-4 of
    their scale and by 1e-6 by 0.45; ONNX Runtime was 0.45 off there). Real weights keep every
    case."""
    batch = torch.stack([c.tensor for c in cases])
    noise = torch.randn(batch.shape, generator=torch.Generator().manual_seed(seed + 2))
    with torch.no_grad():
        together = [t.numpy() for t in model(batch)]
        moved_inputs = [t.numpy() for t in model(batch * (1 + PERTURBATION * noise))]
        alone = [model(batch[i:i + 1]) for i in range(len(cases))]
    kept, rows, dropped = [], [], []
    for i, case in enumerate(cases):
        single = [t.numpy()[0] for t in alone[i]]
        batched = max(rel_diff(together[k][i], single[k]) for k in range(2))
        perturbed = max(rel_diff(together[k][i], moved_inputs[k][i]) for k in range(2))
        if max(batched, perturbed) <= REPRODUCIBLE:
            kept.append(case)
            rows.append(single)
        else:
            dropped.append({"name": case.name, "pytorch_batch_1_vs_batch_n": batched,
                            f"pytorch_inputs_moved_by_{PERTURBATION:.0e}": perturbed})
    if not kept:
        raise GoldenError(f"FP32 PyTorch does not reproduce its own outputs on any golden input "
                          f"(batch 1 against batch {len(cases)}, or inputs moved by "
                          f"{PERTURBATION:.0e} of themselves, differ by more than "
                          f"{REPRODUCIBLE:.0e}): the weights are too ill-conditioned to check; "
                          "nothing was published")
    return kept, (np.stack([r[0] for r in rows]), np.stack([r[1] for r in rows])), dropped


def _engine_outputs(engine: Backend, batch: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The exported model's outputs on the set, case by case (batch 1, as the server checks)."""
    rows = [engine.run(batch[i:i + 1]) for i in range(batch.shape[0])]
    return (np.concatenate([r.logits for r in rows]),
            np.concatenate([r.embedding for r in rows]))
