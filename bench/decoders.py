"""The preprocessing bench: JPEG decode + resize + centre crop + normalize, per decoder.

For each decoder and photo size: images/s per core (process CPU time, one thread) and agreement
with the reference — visionserve's default path, which a test holds bit-identical to
torchvision's eval transform — as top-1 / top-5 agreement of the model's predictions and the
mean absolute difference of the input tensors. Photos are real (scikit-image's and matplotlib's
sample photos, plus crops of them) resized to each size and saved as JPEG (quality 90).

Decoders (a missing library is reported and skipped):
- ``pillow`` — the reference: full decode, antialiased resize (torchvision's arithmetic)
- ``pillow-draft`` — Pillow with ``draft()``: the JPEG decoder's DCT scaling to the smallest
  size still ≥ the resize target, then the same resize (what ``decoder = "fast"`` does)
- ``pillow-reduce`` — full decode, then ``resize(reducing_gap=2)`` (box-reduce first)
- ``simplejpeg`` — libjpeg-turbo with DCT scaling (``min_width/min_height``), then Pillow resize
- ``opencv`` — ``cv2.imdecode`` with ``IMREAD_REDUCED_COLOR_k``, ``cv2.resize(INTER_AREA)``
"""

from __future__ import annotations

import io
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from visionserve.service import install_hint
from visionserve.service.engine.preprocess import (
    EncodedImage,
    Preprocessor,
    RawTensor,
    resize_crop,
    resize_size,
    scaled_decode_size,
)
from visionserve.service.format.model_config import InputSpec
from visionserve.service.limits import ServerLimits

Decoder = Callable[[bytes, InputSpec], np.ndarray]  # → uint8 HWC crop


def sample_photos() -> list[np.ndarray]:
    """Real photos shipped inside installed wheels (no download): RGB uint8 arrays."""
    photos: list[np.ndarray] = []
    try:
        import skimage.data as data

        for name in ("astronaut", "chelsea", "coffee", "rocket", "retina",
                     "hubble_deep_field", "immunohistochemistry"):
            photos.append(np.asarray(getattr(data, name)())[..., :3])
    except ImportError:
        pass
    try:
        import matplotlib.cbook as cbook

        with cbook.get_sample_data("grace_hopper.jpg") as f:
            photos.append(np.asarray(Image.open(f).convert("RGB")))
    except (ImportError, OSError, ValueError):
        pass
    if not photos:
        raise SystemExit("no sample photos: install scikit-image or matplotlib "
                         f"({install_hint('bench')})")
    return photos


def photo_set(size: tuple[int, int], variants: int = 4) -> list[bytes]:
    """Each sample photo and ``variants - 1`` crops of it, resized to ``size``, as JPEG q90."""
    out = []
    for photo in sample_photos():
        h, w = photo.shape[:2]
        for v in range(variants):
            f = 1.0 - 0.15 * v  # full frame, then tighter centre crops
            ch, cw = int(h * f), int(w * f)
            top, left = (h - ch) // 2, (w - cw) // 2
            img = Image.fromarray(np.ascontiguousarray(photo[top:top + ch, left:left + cw]))
            buf = io.BytesIO()
            img.resize(size, Image.Resampling.BICUBIC).save(buf, "JPEG", quality=90)
            out.append(buf.getvalue())
    return out


def _pillow_draft(data: bytes, spec: InputSpec) -> np.ndarray:
    img = Image.open(io.BytesIO(data))
    img.draft("RGB", scaled_decode_size(img.size, spec))
    return np.asarray(resize_crop(img.convert("RGB"), spec))


def _pillow_reduce(data: bytes, spec: InputSpec) -> np.ndarray:
    img = Image.open(io.BytesIO(data)).convert("RGB")
    if spec.resize < min(img.size):
        img = img.resize(resize_size(img.size, spec), Image.Resampling.BILINEAR,
                         reducing_gap=2.0)
    return np.asarray(resize_crop(img, spec))


def _simplejpeg(data: bytes, spec: InputSpec) -> np.ndarray:
    import simplejpeg

    w, h = simplejpeg.decode_jpeg_header(data)[1::-1]  # (height, width, ...) → w, h
    mw, mh = scaled_decode_size((w, h), spec)
    pixels = simplejpeg.decode_jpeg(data, colorspace="RGB", min_width=mw, min_height=mh)
    return np.asarray(resize_crop(Image.fromarray(pixels), spec))


def _opencv(data: bytes, spec: InputSpec) -> np.ndarray:
    import cv2

    cv2.setNumThreads(1)
    header = Image.open(io.BytesIO(data))
    w, h = header.size
    factor = 1
    for f in (8, 4, 2):
        if min(w, h) // f >= spec.resize:
            factor = f
            break
    flags = {1: cv2.IMREAD_COLOR, 2: cv2.IMREAD_REDUCED_COLOR_2, 4: cv2.IMREAD_REDUCED_COLOR_4,
             8: cv2.IMREAD_REDUCED_COLOR_8}[factor]
    bgr = cv2.imdecode(np.frombuffer(data, np.uint8), flags)
    size = resize_size((bgr.shape[1], bgr.shape[0]), spec)
    bgr = cv2.resize(bgr, size, interpolation=cv2.INTER_AREA)
    top = int(round((size[1] - spec.height) / 2.0))
    left = int(round((size[0] - spec.width) / 2.0))
    return np.ascontiguousarray(bgr[top:top + spec.height, left:left + spec.width, ::-1])


CANDIDATES: dict[str, Decoder] = {
    "pillow-draft": _pillow_draft, "pillow-reduce": _pillow_reduce,
    "simplejpeg": _simplejpeg, "opencv": _opencv,
}


def run_decode_bench(model_file: Path | None, spec: InputSpec,
                     sizes: list[tuple[int, int]], seconds: float = 2.0,
                     progress: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Every decoder × size: images/s per core and agreement with the reference."""
    reference = Preprocessor("bench", 0, spec, ServerLimits())
    session = _session(model_file) if model_file else None
    results: dict[str, Any] = {"sizes": {}}
    for width, height in sizes:
        photos = photo_set((width, height))
        ref = np.stack([reference.tensor(0, EncodedImage(p)) for p in photos])
        ref_pred = _predict(session, spec, ref)
        rows: dict[str, Any] = {}

        def exact(data: bytes) -> np.ndarray:
            return reference.tensor(0, EncodedImage(data))

        def via(decode: Decoder) -> Callable[[bytes], np.ndarray]:
            def run(data: bytes) -> np.ndarray:
                crop = decode(data, spec)
                return reference.tensor(0, RawTensor(crop.shape, "uint8", crop.tobytes(), "HWC"))
            return run

        for name, fn in [("pillow", exact), *((n, via(d)) for n, d in CANDIDATES.items())]:
            if progress:
                progress(f"{name} {width}x{height}")
            try:
                tensors = np.stack([fn(p) for p in photos])
            except ImportError as exc:
                rows[name] = {"skipped": f"not installed ({exc.name})"}
                continue
            row: dict[str, Any] = {"images_per_s_per_core": _throughput(fn, photos, seconds),
                                   "mean_abs_diff": float(np.abs(tensors - ref).mean())}
            if session is not None:
                pred = _predict(session, spec, tensors)
                row["top1_agreement"] = float(np.mean(pred[:, 0] == ref_pred[:, 0]))
                row["top5_agreement"] = float(np.mean(
                    [r[0] in p for r, p in zip(ref_pred, pred, strict=True)]))
            rows[name] = row
        results["sizes"][f"{width}x{height}"] = {"photos": len(photos), "decoders": rows}
    return results


def _throughput(fn: Callable[[bytes], np.ndarray], photos: list[bytes], seconds: float) -> float:
    done, cpu0 = 0, time.process_time()
    while (cpu := time.process_time() - cpu0) < seconds:
        fn(photos[done % len(photos)])
        done += 1
    return done / cpu


def _session(model_file: Path) -> Any:
    import onnxruntime as ort

    return ort.InferenceSession(str(model_file), providers=["CPUExecutionProvider"])


def _predict(session: Any, spec: InputSpec, tensors: np.ndarray) -> np.ndarray:
    if session is None:
        return np.zeros((len(tensors), 5), dtype=np.int64)
    logits = np.concatenate([session.run(None, {spec.name: tensors[i:i + 8]})[0]
                             for i in range(0, len(tensors), 8)])
    return np.argsort(-logits, axis=1)[:, :5]


def markdown(results: dict[str, Any], command: str) -> str:
    lines = ["```bash", command, "```", "",
             "| photo size | decoder | images/s per core | top-1 agreement | top-5 agreement | "
             "mean abs diff |", "|---|---|---:|---:|---:|---:|"]
    for size, block in results["sizes"].items():
        for name, row in block["decoders"].items():
            if "skipped" in row:
                lines.append(f"| {size} | {name} | {row['skipped']} | | | |")
                continue
            lines.append(f"| {size} | {name} | {row['images_per_s_per_core']:.0f} | "
                         f"{row.get('top1_agreement', float('nan')):.3f} | "
                         f"{row.get('top5_agreement', float('nan')):.3f} | "
                         f"{row['mean_abs_diff']:.4f} |")
    return "\n".join(lines) + "\n"
