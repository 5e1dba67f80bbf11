"""Images → the model's input tensor, exactly as torchvision's eval transform would make it.

For an encoded image: decode (Pillow) → EXIF orientation → colour mode → ``Resize(resize)`` →
``CenterCrop(height, width)`` → ``ToTensor`` → ``Normalize(mean, std)``, with torchvision's own
size arithmetic and Pillow's resampling, so the result is bit-identical to
``torchvision.transforms`` on a PIL image (a test holds it to that). Normalization uses the same
float32 operations as ToTensor + Normalize, vectorized over the image.

Two steps: ``prepare`` (per image, when the request arrives) validates raw tensors — zero-copy
views of the request's bytes, cheap enough for the event loop — or decodes an encoded image to
uint8 pixels: ``open`` reads and checks its header, ``decode`` its pixels (blocking CPU work that
releases the GIL in Pillow: the decode pool, ``decode_pool``, runs both).
``assemble`` (per batch, in the batcher's thread) writes every image into the batch, normalizing
uint8 pixels on the way: no per-image thread hop for raw tensors, one pass over the pixels.
"""

from __future__ import annotations

import io
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from ..errors import InvalidInput, LimitExceeded, VisionServeError
from ..format.model_config import InputSpec
from ..limits import ServerLimits
from ..logs import printable

_RESAMPLE = {
    "nearest": Image.Resampling.NEAREST,
    "bilinear": Image.Resampling.BILINEAR,
    "bicubic": Image.Resampling.BICUBIC,
    "box": Image.Resampling.BOX,
    "hamming": Image.Resampling.HAMMING,
    "lanczos": Image.Resampling.LANCZOS,
}
# Our own limit (ServerLimits.max_image_pixels, checked from the header before any pixel is
# allocated, with a message naming the request's field) works beside Pillow's own guard, which
# stays on: Image.open refuses a header that declares over twice Image.MAX_IMAGE_PIXELS
# (~179 MP), and our flag may not exceed Image.MAX_IMAGE_PIXELS (ServerLimits), so ours always
# speaks first up to there.
ACCEPTED_FORMATS = ("JPEG", "MPO", "PNG", "WEBP")  # MPO: JPEGs from phone cameras
Image.init()  # registers every plugin; ``formats`` picks the ones that may run
# the parsers to run (an MPO file is opened by the JPEG parser, which has no MPO entry of its own)
_OPEN_FORMATS = tuple(f for f in ACCEPTED_FORMATS if f in Image.OPEN)
# Only the accepted formats' parsers ever see client bytes (``Image.open(formats=…)``): Pillow
# would otherwise try each of its ~40 plugins' header parsers (EPS, PSD, FITS, ICNS…) in turn.
# What a refused file is, for the message only, from its first bytes:
_REFUSED_MAGIC = (
    (b"GIF87a", "GIF"), (b"GIF89a", "GIF"), (b"BM", "BMP"), (b"II*\x00", "TIFF"),
    (b"MM\x00*", "TIFF"), (b"8BPS", "PSD"), (b"%!PS", "EPS"), (b"\xc5\xd0\xd3\xc6", "EPS"),
    (b"SIMPLE  =", "FITS"), (b"icns", "ICNS"), (b"\x00\x00\x01\x00", "ICO"),
    (b"\x00\x00\x00\x0cjP", "JPEG 2000"), (b"\xff\x4f\xff\x51", "JPEG 2000"), (b"DDS ", "DDS"),
    (b"qoif", "QOI"))


@dataclass(frozen=True, slots=True)
class EncodedImage:
    """A JPEG/PNG/WebP file's bytes."""

    data: bytes


@dataclass(frozen=True, slots=True)
class RawTensor:
    """One image as raw little-endian bytes. ``layout`` is "CHW", "HWC" or "" (infer)."""

    shape: tuple[int, ...]
    dtype: str  # "float32" | "uint8"
    data: bytes | memoryview  # a view avoids copying one image out of a batch's buffer
    layout: str = ""


ImageInput = EncodedImage | RawTensor


@dataclass(frozen=True, slots=True)
class OpenedImage:
    """An encoded image whose header was read and checked; no pixel decoded yet."""

    index: int  # in the request, for messages
    image: Image.Image

    @property
    def pixels(self) -> int:
        width, height = self.image.size
        return width * height


class Preprocessor:
    """Turns one model version's inputs into float32 CHW arrays. Thread-safe (no mutable state)."""

    def __init__(self, model: str, version: int, spec: InputSpec, limits: ServerLimits) -> None:
        self._where = f"model {model} version {version}"
        self._spec = spec
        self._limits = limits
        self._mean = np.array(spec.mean, dtype=np.float32)[:, None, None]  # [C, 1, 1]
        self._std = np.array(spec.std, dtype=np.float32)[:, None, None]

    @property
    def spec(self) -> InputSpec:
        return self._spec

    def prepare(self, index: int, image: ImageInput) -> np.ndarray:
        """One image → the model's CHW input, or its uint8 CHW pixels (often a zero-copy view of
        the request's bytes) still to be normalized: :meth:`assemble` does that while it builds
        the batch, in the batcher's thread. Raw tensors only validate here (cheap: run inline);
        encoded images decode (run in the preprocessing pool)."""
        if isinstance(image, EncodedImage):
            return self.decode(self.open(index, image.data))
        return self._raw(index, image)

    def assemble(self, items: list[np.ndarray]) -> np.ndarray:
        """Prepared images → one float32 [N, C, H, W] batch: float32 items copied, uint8 items
        normalized straight into their slot with ToTensor + Normalize's own float32 operations
        (x / 255 - mean) / std, so the result is bit-identical to torchvision's."""
        batch = np.empty((len(items), *self._spec.shape), dtype=np.float32)
        for i, item in enumerate(items):
            if item.dtype == np.uint8:
                slot = batch[i]
                np.divide(item, np.float32(255), out=slot, dtype=np.float32)
                np.subtract(slot, self._mean, out=slot)
                np.divide(slot, self._std, out=slot)
            else:
                batch[i] = item
        return batch

    def tensor(self, index: int, image: ImageInput) -> np.ndarray:
        """One image → normalized float32 [C, H, W] (prepare + assemble, for tools and tests)."""
        return self.assemble([self.prepare(index, image)])[0]

    def open(self, index: int, data: bytes) -> OpenedImage:
        """Read an encoded image's header only: its byte size, format and pixel count are
        checked here, before a pixel is decoded (and its pixels count against the request's
        budget, ``decode_pool``)."""
        field = f"images[{index}]"
        if len(data) > self._limits.max_encoded_image_bytes:
            raise LimitExceeded(f"{self._where}: {field} is {len(data)} bytes, over the "
                                f"{self._limits.max_encoded_image_bytes}-byte limit for an "
                                "encoded image; re-encode it smaller")
        refused = next((name for magic, name in _REFUSED_MAGIC if data.startswith(magic)), "")
        if refused:
            raise InvalidInput(f"{self._where}: {field} is a {refused} image; send JPEG, PNG "
                               "or WebP")
        with self._undecodable(field):
            img = Image.open(io.BytesIO(data), formats=_OPEN_FORMATS)  # the header only
            self._check_size(field, img.size)
        return OpenedImage(index, img)

    def decode(self, opened: OpenedImage) -> np.ndarray:
        """An opened image → its uint8 CHW pixels, resized and cropped (blocking CPU work)."""
        spec, img = self._spec, opened.image
        with self._undecodable(f"images[{opened.index}]"):
            if spec.decoder == "fast" and img.format in ("JPEG", "MPO"):
                img.draft(img.mode if img.mode in ("L", "RGB") else None,
                          scaled_decode_size(img.size, spec))
            img.load()  # an animated WebP/MPO: its first frame
            img = ImageOps.exif_transpose(img)
            img = _to_mode(img, "L" if spec.color == "L" else "RGB")
        img = resize_crop(img, spec)
        pixels = np.asarray(img)
        if spec.color == "BGR":
            pixels = pixels[..., ::-1]
        return _chw(pixels, "HWC")

    @contextmanager
    def _undecodable(self, field: str) -> Iterator[None]:
        """Any failure of Pillow on untrusted bytes, as the client's error."""
        try:
            yield
        except VisionServeError:
            raise
        except Image.DecompressionBombError:
            raise InvalidInput(
                f"{self._where}: {field}'s header declares more than "
                f"{2 * (Image.MAX_IMAGE_PIXELS or 0)} pixels, over the limit of "
                f"{self._limits.max_image_pixels}; downscale it before sending") from None
        except MemoryError:
            raise LimitExceeded(f"{self._where}: {field} needs more memory to decode than the "
                                "server has free; send a smaller image") from None
        except Exception as exc:  # noqa: BLE001 - any failure on untrusted bytes: undecodable
            reason = "not a recognised image format" if isinstance(exc, UnidentifiedImageError) \
                else printable(str(exc), 200) or type(exc).__name__
            raise InvalidInput(f"{self._where}: {field} could not be decoded as an image "
                               f"({reason}); send the unmodified bytes of a JPEG, PNG or WebP "
                               "file") from None

    def _check_size(self, field: str, size: tuple[int, int]) -> None:
        """Refuse, from the header alone, images whose pixels (or whose resized pixels: an
        extreme aspect ratio) would exceed the limit: nothing is allocated for them."""
        limit, (width, height) = self._limits.max_image_pixels, size
        if width * height > limit:
            raise InvalidInput(
                f"{self._where}: {field} is {width}x{height} = {width * height} pixels, over "
                f"the limit of {limit}; downscale it before sending")
        spec = self._spec
        rw, rh = resize_size(size, spec) if spec.resize else size
        pw, ph = max(rw, spec.width), max(rh, spec.height)  # torchvision pads a small side
        if pw * ph > limit:
            raise InvalidInput(
                f"{self._where}: {field} is {width}x{height}, an aspect ratio too extreme to "
                f"resize: fitted to the model's {spec.width}x{spec.height} input (resize "
                f"{spec.resize or 'none'}, then padding) it becomes {pw}x{ph} pixels, over the "
                f"limit of {limit}; crop it closer to square before sending")

    def _raw(self, index: int, t: RawTensor) -> np.ndarray:
        spec, field = self._spec, f"images[{index}].tensor"
        chw, hwc = spec.shape, (spec.height, spec.width, spec.channels)
        if t.dtype not in spec.raw_dtypes:
            raise InvalidInput(f"{self._where}: {field}.dtype {t.dtype or 'unspecified'} is not "
                               f"accepted; this model takes {list(spec.raw_dtypes)}")
        if t.dtype == "float32":
            allowed = {"CHW": chw}
        else:
            allowed = {k: v for k, v in (("CHW", chw), ("HWC", hwc)) if k in spec.raw_layouts}
        if t.layout:
            if t.layout not in allowed:
                raise InvalidInput(f"{self._where}: {field}.layout {t.layout} is not accepted "
                                   f"for {t.dtype}; use {list(allowed)}")
            layout = t.layout if tuple(t.shape) == allowed[t.layout] else ""
        else:
            layout = next((k for k, v in allowed.items() if tuple(t.shape) == v), "")
        if not layout:
            expected = " or ".join(f"{list(v)} ({k})" for k, v in allowed.items())
            raise InvalidInput(f"{self._where}: {field} has shape {list(t.shape)}, expected "
                               f"{expected} for {t.dtype}; resize/crop to "
                               f"{spec.height}x{spec.width} first or send the encoded image")
        itemsize = 4 if t.dtype == "float32" else 1
        expected_bytes = int(np.prod(t.shape)) * itemsize
        if len(t.data) != expected_bytes:
            raise InvalidInput(f"{self._where}: {field}.data is {len(t.data)} bytes, but shape "
                               f"{list(t.shape)} of {t.dtype} needs {expected_bytes}")
        if t.dtype == "float32":
            return np.frombuffer(t.data, dtype="<f4").reshape(chw)
        pixels = np.frombuffer(t.data, dtype=np.uint8).reshape(t.shape)
        return _chw(pixels, layout)


def _to_mode(img: Image.Image, mode: str) -> Image.Image:
    """Pillow's ``convert`` (what torchvision's loader does: alpha dropped, palette expanded,
    CMYK converted), except 16-bit grayscale, which ``convert`` would clip to white: its top 8
    bits are kept instead."""
    if img.mode in ("I;16", "I;16L", "I;16B", "I;16N", "I"):
        wide = np.clip(np.asarray(img).astype(np.int64), 0, 65535)
        img = Image.fromarray((wide >> 8).astype(np.uint8), "L")
    return img if img.mode == mode else img.convert(mode)


def _chw(pixels: np.ndarray, layout: str) -> np.ndarray:
    """uint8 HWC / CHW / HW pixels → a CHW view (no copy)."""
    if pixels.ndim == 2:
        return pixels[None]
    return pixels.transpose(2, 0, 1) if layout == "HWC" else pixels


def scaled_decode_size(size: tuple[int, int], spec: InputSpec) -> tuple[int, int]:
    """The smallest decode size whose shorter side still reaches the resize target (or the crop
    when there is no resize): what a DCT-scaling JPEG decoder may shrink ``size`` to."""
    w, h = size
    target = spec.resize or max(spec.height, spec.width)
    scale = min(1.0, target / min(w, h))
    return max(1, int(np.ceil(w * scale))), max(1, int(np.ceil(h * scale)))


def resize_size(size: tuple[int, int], spec: InputSpec) -> tuple[int, int]:
    """torchvision ``Resize(spec.resize)``'s output (width, height) for an image of ``size``."""
    w, h = size
    short, long = (w, h) if w <= h else (h, w)
    new_short, new_long = spec.resize, int(spec.resize * long / short)
    return (new_short, new_long) if w <= h else (new_long, new_short)


def resize_crop(img: Image.Image, spec: InputSpec) -> Image.Image:
    """torchvision ``Resize(spec.resize)`` then ``CenterCrop((height, width))`` on a PIL image,
    with torchvision's own size arithmetic (and its zero padding when the crop is larger)."""
    if spec.resize:
        size = resize_size(img.size, spec)
        if size != img.size:
            img = img.resize(size, _RESAMPLE[spec.interpolation])
    w, h = img.size
    cw, ch = spec.width, spec.height
    if cw > w or ch > h:  # torchvision pads with zeros, then crops
        padded = Image.new(img.mode, (max(w, cw), max(h, ch)))
        padded.paste(img, ((cw - w) // 2 if cw > w else 0, (ch - h) // 2 if ch > h else 0))
        img = padded
        w, h = img.size
    if (w, h) == (cw, ch):
        return img
    top = int(round((h - ch) / 2.0))
    left = int(round((w - cw) / 2.0))
    return img.crop((left, top, left + cw, top + ch))
