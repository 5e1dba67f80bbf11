"""``visionserve bench-int8``: how far INT8 moves a model with real weights, on real photos.

The photos shipped in scikit-image's and matplotlib's wheels are split in two disjoint sets:
seeded crops and flips of the first calibrate the INT8 export (written as JPEGs and passed to
``--calibration`` as a user would), seeded crops and flips of the second (≥ 100 inputs) are
classified by the FP32 and the INT8 model (in-process ONNX Runtime, the server's own
preprocessing of the JPEG bytes), and their top-1 / top-5 agreement is reported.
"""

from __future__ import annotations

import argparse
import io
import json
import shlex
import sys
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

PHOTOS = ("chelsea", "coffee", "astronaut", "rocket", "camera", "grace_hopper", "colorwheel",
          "hubble_deep_field", "retina", "coins", "moon", "brick", "grass", "gravel", "page",
          "immunohistochemistry", "cell", "clock", "horse", "logo")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default="efficientnet_lite0",
                   help="architecture with default (real) weights to quantize")
    p.add_argument("--variants", type=int, default=12,
                   help="seeded crops/flips per photo (evaluation: half the photos)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", type=Path, help="write the figures as JSON")


def photos() -> list[tuple[str, np.ndarray]]:
    import skimage.data
    from matplotlib import cbook
    from PIL import Image

    out = []
    for name in PHOTOS:
        if name == "grace_hopper":
            with cbook.get_sample_data("grace_hopper.jpg") as f:
                out.append((name, np.asarray(Image.open(f).convert("RGB"))))
            continue
        pixels = np.asarray(getattr(skimage.data, name)())
        if pixels.dtype != np.uint8:
            pixels = (pixels * 255).astype(np.uint8) if pixels.max() <= 1 else \
                pixels.astype(np.uint8)
        out.append((name, np.asarray(Image.fromarray(pixels).convert("RGB"))))
    return out


def variants(pixels: np.ndarray, count: int, rng: np.random.Generator) -> list[bytes]:
    """JPEGs of seeded crops (30–100 % of the area, aspect 3/4–4/3), half of them mirrored."""
    from PIL import Image

    h, w = pixels.shape[:2]
    out = []
    for i in range(count):
        area, aspect = rng.uniform(0.3, 1.0) * h * w, np.exp(rng.uniform(np.log(3 / 4),
                                                                         np.log(4 / 3)))
        ch = min(h, int(round(np.sqrt(area / aspect))))
        cw = min(w, int(round(np.sqrt(area * aspect))))
        top, left = rng.integers(0, h - ch + 1), rng.integers(0, w - cw + 1)
        crop = pixels[top:top + ch, left:left + cw]
        if i % 2:
            crop = crop[:, ::-1]
        buf = io.BytesIO()
        Image.fromarray(np.ascontiguousarray(crop)).save(buf, format="JPEG", quality=90)
        out.append(buf.getvalue())
    return out


def run_int8(args: argparse.Namespace) -> int:
    import onnxruntime as ort
    from rich.console import Console
    from rich.progress import Progress

    from visionserve.export.pipeline import ExportRequest, export_model
    from visionserve.export.precision import TOLERANCES, calibration_images, to_int8
    from visionserve.service.engine.preprocess import Preprocessor
    from visionserve.service.format.model_config import ModelConfig
    from visionserve.service.format.model_format import CONFIG_FILE
    from visionserve.service.limits import ServerLimits

    console = Console(stderr=True)
    rng = np.random.default_rng(args.seed)
    named = photos()
    calibration_photos, evaluation_photos = named[0::2], named[1::2]
    with tempfile.TemporaryDirectory(prefix="visionserve-int8-") as tmp:
        root = Path(tmp)
        calibration = root / "calibration"
        calibration.mkdir()
        for name, pixels in calibration_photos:
            for i, jpeg in enumerate(variants(pixels, 4, rng)):
                (calibration / f"{name}-{i}.jpg").write_bytes(jpeg)
        evaluation = [jpeg for _, pixels in evaluation_photos
                      for jpeg in variants(pixels, args.variants, rng)]
        with Progress(console=console) as progress:
            task = progress.add_task("export fp32, quantize", total=2)
            fp32 = export_model(ExportRequest(arch=args.model, repo=root / "repo",
                                              seed=args.seed)).path / "model.onnx"
            progress.advance(task)
            config = ModelConfig.from_toml(root / "repo" / args.model / CONFIG_FILE)
            # the export's own quantization, on the export's own calibration inputs, without
            # its publish gate (which would refuse a model this measures as too far off)
            batches, _ = calibration_images(config.input, calibration, 10_000, args.seed)
            kept_float = to_int8(fp32, root / "int8.onnx", batches)
            progress.advance(task)
            prep = Preprocessor(args.model, 1, config.input, ServerLimits())
            sessions = {p: ort.InferenceSession(str(f), providers=["CPUExecutionProvider"])
                        for p, f in (("fp32", fp32), ("int8", root / "int8.onnx"))}
            top = _top5(progress, sessions, prep, evaluation)
        calibration_count = len(list(calibration.iterdir()))
    top1, top5, in_top5 = _agreement(top["fp32"], top["int8"])
    record = {
        "command": "visionserve " + shlex.join(sys.argv[1:]),
        "model": args.model, "calibration_images": calibration_count,
        "calibration_photos": [n for n, _ in calibration_photos],
        "evaluation_inputs": len(evaluation),
        "evaluation_photos": [n for n, _ in evaluation_photos],
        "top1_agreement": top1, "top5_set_agreement": top5, "fp32_top1_in_int8_top5": in_top5,
        "kept_float": kept_float,
        "export_gate_min_top1": TOLERANCES["int8"].min_top1_agreement,
    }
    sys.stdout.write(f"{args.model}: INT8 vs FP32 on {len(evaluation)} crops/flips of "
          f"{len(evaluation_photos)} photos (calibrated on {calibration_count} crops/flips of "
          f"{len(calibration_photos)} others): top-1 agreement {top1:.3f}, top-5 set agreement "
          f"{top5:.3f}, FP32 top-1 within INT8 top-5 {in_top5:.3f}; the export gate asks top-1 "
          f"≥ {TOLERANCES['int8'].min_top1_agreement} on its held-out calibration images")
    if args.json:
        args.json.write_text(json.dumps(record, indent=2) + "\n")
    return 0


def _agreement(fp32: list[np.ndarray], int8: list[np.ndarray]) -> tuple[float, float, float]:
    """Top-1 agreement, top-5 set agreement, and FP32's top-1 within INT8's top-5."""
    pairs = list(zip(fp32, int8, strict=True))
    return (float(np.mean([a[0] == b[0] for a, b in pairs])),
            float(np.mean([set(a) == set(b) for a, b in pairs])),
            float(np.mean([a[0] in b for a, b in pairs])))


def _top5(progress: Any, sessions: dict[str, Any], prep: Any,
          evaluation: list[bytes]) -> dict[str, list[np.ndarray]]:
    """Each session's top-5 classes of each evaluation JPEG, through the server's
    preprocessing."""
    from visionserve.service.engine.preprocess import EncodedImage
    from visionserve.service.format.model_format import INPUT, LOGITS

    task = progress.add_task("classify", total=len(evaluation))
    top: dict[str, list[np.ndarray]] = {p: [] for p in sessions}
    for i, jpeg in enumerate(evaluation):
        x = prep.tensor(i, EncodedImage(jpeg))[None]
        for p, session in sessions.items():
            top[p].append(np.argsort(-session.run([LOGITS], {INPUT: x})[0][0])[:5])
        progress.advance(task)
    return top
