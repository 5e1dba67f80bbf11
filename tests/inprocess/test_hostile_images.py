"""Real-world image quirks through both public APIs (our Classify and KServe ModelInfer BYTES):
each is decoded like its plain equivalent, or refused with INVALID_ARGUMENT / RESOURCE_EXHAUSTED
and a message that says what to do. Never INTERNAL, never a traceback, never a dead server.

Decisions (docs/security.md): alpha is dropped and palettes expanded (torchvision's loader does
``convert("RGB")``); 16-bit grayscale keeps its top 8 bits; an animated WebP is classified by its
first frame; GIF (animated or not), BMP, TIFF and other formats are refused.
"""

from __future__ import annotations

import io
import re
import struct
import zlib

import grpc
import numpy as np
import pytest
from PIL import Image

from conftest import embeddings, encode, photo
from inprocess.harness import MODELS
from visionserve.service.format.model_format import EMBEDDING, INPUT
from visionserve.service.process.server_config import ServerConfig
from visionserve.v1 import visionserve_pb2 as pb

MODEL = "mobilenet_v3_small"
DIM = MODELS[MODEL][0]  # its embedding's size on the fake engine
LIMIT = ServerConfig().limits.max_image_pixels  # --max-image-pixels' default: the server's


def png_bytes(img: Image.Image, **save: object) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG", **save)
    return buf.getvalue()


def png_file(width: int, height: int, bit_depth: int, color: int, rows: bytes) -> bytes:
    """A PNG written by hand: its header says width x height, its body is ``rows`` deflated."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(
            ">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    header = struct.pack(">IIBBBBB", width, height, bit_depth, color, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header)
            + chunk(b"IDAT", zlib.compress(rows)) + chunk(b"IEND", b""))


def png16(array: np.ndarray) -> bytes:
    """A 16-bit-per-channel PNG (grayscale [H, W] or RGB [H, W, 3])."""
    h, w = array.shape[:2]
    rows = b"".join(b"\0" + array[y].astype(">u2").tobytes() for y in range(h))
    return png_file(w, h, 16, 0 if array.ndim == 2 else 2, rows)


def png_header_only(width: int, height: int) -> bytes:
    """A decompression bomb's shape: a header claiming width x height, a few bytes of body
    (a real bomb's zeros deflate 1000:1; the header is what must stop it)."""
    return png_file(width, height, 8, 2, b"\0" * 64)


class Api:
    """Send one encoded image through one public API (Embed, or ModelInfer asking for the
    embedding output); answers (code, details, the embedding)."""

    def __init__(self, server, kind: str) -> None:
        self.server, self.kind = server, kind

    def send(self, data: bytes) -> tuple[grpc.StatusCode, str, np.ndarray | None]:
        try:
            if self.kind == "embed":
                reply = self.server.stub.Embed(pb.EmbedRequest(
                    model=MODEL, images=[pb.Image(encoded=data)], normalize=False), timeout=60)
                scores = embeddings(reply)[0]
            elif self.kind == "kserve":
                from visionserve.inference import grpc_service_pb2 as kpb
                from visionserve.inference import grpc_service_pb2_grpc as kpb_grpc

                request = kpb.ModelInferRequest(
                    model_name=MODEL, inputs=[kpb.ModelInferRequest.InferInputTensor(
                        name=INPUT, datatype="BYTES", shape=[1])],
                    outputs=[kpb.ModelInferRequest.InferRequestedOutputTensor(name=EMBEDDING)],
                    raw_input_contents=[struct.pack("<I", len(data)) + data])
                reply = kpb_grpc.GRPCInferenceServiceStub(self.server.channel).ModelInfer(
                    request, timeout=60)
                scores = np.frombuffer(reply.raw_output_contents[0], "<f4")
            else:
                pytest.fail(f"unhandled API {self.kind}")
        except grpc.RpcError as err:
            assert "Traceback" not in err.details() and ".py" not in err.details()
            assert not re.search(r"\bat 0x[0-9a-f]+", err.details())  # no object addresses
            return err.code(), err.details(), None
        return grpc.StatusCode.OK, "", scores

    def answer(self, data: bytes) -> np.ndarray:
        code, details, scores = self.send(data)
        assert code == grpc.StatusCode.OK, details
        assert scores is not None and scores.shape == (DIM,)  # one whole embedding, not empty
        return scores

    def refusal(self, data: bytes) -> tuple[grpc.StatusCode, str]:
        code, details, _ = self.send(data)
        assert code in (grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.RESOURCE_EXHAUSTED)
        assert f"model {MODEL} version 1" in details
        return code, details


@pytest.fixture(params=["embed", "kserve"])
def api(request, server) -> Api:
    return Api(server, request.param)


@pytest.fixture(scope="module")
def cat() -> np.ndarray:
    return photo("chelsea")  # 300x451 RGB


def same(a: np.ndarray, b: np.ndarray) -> None:
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5 * np.abs(b).max())


def differ(a: np.ndarray, b: np.ndarray) -> bool:
    return bool(np.abs(a - b).max() > 1e-2 * np.abs(b).max())


def test_cmyk_and_grayscale_jpegs_decode_like_their_rgb_pixels(api, cat):
    cmyk_jpeg = io.BytesIO()
    Image.fromarray(cat).convert("CMYK").save(cmyk_jpeg, "JPEG", quality=95)
    decoded = Image.open(io.BytesIO(cmyk_jpeg.getvalue())).convert("RGB")
    same(api.answer(cmyk_jpeg.getvalue()), api.answer(png_bytes(decoded)))

    gray = encode(cat[..., 1], "JPEG")
    decoded = Image.open(io.BytesIO(gray)).convert("RGB")
    same(api.answer(gray), api.answer(png_bytes(decoded)))


def test_progressive_jpeg_reads_like_the_baseline_one(api, cat):
    baseline = api.answer(encode(cat, "JPEG", quality=90))
    progressive = api.answer(encode(cat, "JPEG", quality=90, progressive=True))
    np.testing.assert_allclose(progressive, baseline, rtol=0, atol=1e-2 * np.abs(baseline).max())


def test_exif_orientation_is_applied(api, cat):
    upright = api.answer(png_bytes(Image.fromarray(cat)))
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 CW to display": the stored pixels are turned the other way
    stored = Image.fromarray(cat).transpose(Image.Transpose.ROTATE_90)
    same(api.answer(png_bytes(stored, exif=exif.tobytes())), upright)
    assert differ(api.answer(png_bytes(stored)), upright)


def test_sixteen_bit_pngs_keep_their_top_eight_bits(api, cat):
    gray = cat[..., 0]
    eight_bit = api.answer(png_bytes(Image.fromarray(gray)))
    same(api.answer(png16(gray.astype(np.uint16) * 257)), eight_bit)
    same(api.answer(png16(cat.astype(np.uint16) * 257)), api.answer(png_bytes(
        Image.fromarray(cat))))


def test_alpha_and_palette_transparency_are_dropped_as_torchvision_does(api, cat):
    rgb = api.answer(png_bytes(Image.fromarray(cat)))
    alpha = np.dstack([cat, np.linspace(0, 255, cat.shape[1], dtype=np.uint8)[None].repeat(
        cat.shape[0], 0)])
    same(api.answer(png_bytes(Image.fromarray(alpha, "RGBA"))), rgb)
    palette = Image.fromarray(cat).quantize(64)
    expected = api.answer(png_bytes(palette.convert("RGB")))
    same(api.answer(png_bytes(palette, transparency=0)), expected)


def test_animated_webp_is_classified_by_its_first_frame_and_gif_is_refused(api, cat):
    first, second = Image.fromarray(cat), Image.fromarray(photo("coffee"))
    animated = io.BytesIO()
    first.save(animated, "WEBP", save_all=True, append_images=[second.resize(first.size)],
               lossless=True)
    still = io.BytesIO()
    first.save(still, "WEBP", lossless=True)
    same(api.answer(animated.getvalue()), api.answer(still.getvalue()))

    gif = io.BytesIO()
    first.save(gif, "GIF", save_all=True, append_images=[second.resize(first.size)])
    code, details = api.refusal(gif.getvalue())
    assert code == grpc.StatusCode.INVALID_ARGUMENT
    assert "is a GIF image; send JPEG, PNG or WebP" in details


@pytest.mark.parametrize("size", [(1, 1), (1, 3), (4000, 100), (33, 1)])
def test_tiny_and_elongated_images_are_classified(api, size):
    pixels = np.random.default_rng(0).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    scores = api.answer(png_bytes(Image.fromarray(pixels)))
    assert np.isfinite(scores).all()


def test_an_aspect_ratio_too_extreme_to_resize_is_refused_before_decoding(api):
    code, details = api.refusal(png_bytes(Image.new("RGB", (20000, 1))))
    assert code == grpc.StatusCode.INVALID_ARGUMENT
    assert "images[0] is 20000x1, an aspect ratio too extreme to resize" in details
    assert f"it becomes 5120000x256 pixels, over the limit of {LIMIT}" in details
    assert "crop it closer to square" in details


def test_pillows_own_guard_stays_on_and_the_flag_cannot_exceed_it(tmp_path):
    import subprocess
    import sys

    from conftest import run_cli

    check = ("import visionserve.service.process.server; from PIL import Image; "
             "print(Image.MAX_IMAGE_PIXELS)")
    out = subprocess.run([sys.executable, "-c", check], capture_output=True, text=True)
    assert out.stdout.strip() == str(Image.MAX_IMAGE_PIXELS) != "None"
    refused = run_cli("serve", "--repo", str(tmp_path), "--max-image-pixels",
                      str(Image.MAX_IMAGE_PIXELS + 1))
    assert refused.returncode == 2 and "--max-image-pixels" in refused.stderr
    assert "decompression-bomb guard" in refused.stderr


def test_a_large_photo_is_decoded(api, cat):
    big = np.asarray(Image.fromarray(cat).resize((6000, 4000)))  # 24 megapixels
    scores = api.answer(encode(big, "JPEG", quality=85))
    assert np.isfinite(scores).all()


@pytest.mark.parametrize("width,height", [(100_000, 100_000), (40_000, 1_001), (65_535, 65_535),
                                          (12_000, 12_000)])
def test_decompression_bombs_are_refused_from_the_header(api, width, height):
    """Ours speaks up to twice Pillow's guard (which stays on: importing the server does not
    switch it off), Pillow's own check beyond, both as INVALID_ARGUMENT naming our limit."""
    code, details = api.refusal(png_header_only(width, height))
    assert code == grpc.StatusCode.INVALID_ARGUMENT
    if width * height > 2 * Image.MAX_IMAGE_PIXELS:
        assert f"images[0]'s header declares more than {2 * Image.MAX_IMAGE_PIXELS} pixels, " \
               f"over the limit of {LIMIT}" in details
    else:
        assert f"images[0] is {width}x{height} = {width * height} pixels, over the limit" \
            in details


def test_a_jpeg_whose_header_claims_a_huge_size_is_refused(api, cat):
    jpeg = bytearray(encode(cat, "JPEG"))
    sof = jpeg.index(b"\xff\xc0")  # baseline start-of-frame: length, precision, height, width
    jpeg[sof + 5:sof + 9] = struct.pack(">HH", 60000, 60000)
    code, details = api.refusal(bytes(jpeg))
    assert "header declares more than" in details and f"over the limit of {LIMIT}" in details


def _tiff(cat: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(cat).save(buf, "TIFF")
    return buf.getvalue()


def _bmp(cat: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(cat).save(buf, "BMP")
    return buf.getvalue()


@pytest.mark.parametrize("name,make,expected", [
    ("zero bytes", lambda cat: b"", "could not be decoded"),
    ("truncated JPEG", lambda cat: encode(cat, "JPEG")[:2000], "could not be decoded"),
    ("JPEG magic only", lambda cat: b"\xff\xd8\xff", "could not be decoded"),
    ("text", lambda cat: b"hello, I am not an image\n" * 10, "not a recognised image format"),
    ("PDF", lambda cat: b"%PDF-1.7\n%\xe2\xe3\xcf\xd3\n1 0 obj\n<<>>\nendobj\n",
     "not a recognised"),
    ("SVG", lambda cat: b'<svg xmlns="http://www.w3.org/2000/svg" width="9" height="9"/>',
     "not a recognised image format"),
    ("random bytes", lambda cat: np.random.default_rng(1).bytes(5000), "could not be decoded"),
    ("TIFF", _tiff, "is a TIFF image; send JPEG, PNG or WebP"),
    ("BMP", _bmp, "is a BMP image; send JPEG, PNG or WebP"),
    ("PNG with a broken CRC", lambda cat: png_bytes(Image.fromarray(cat))[:40] + b"\0\0\0\0"
     + png_bytes(Image.fromarray(cat))[44:], "could not be decoded"),
])
def test_broken_files_and_non_images_are_invalid_argument(api, cat, name, make, expected):
    code, details = api.refusal(make(cat))
    assert code == grpc.StatusCode.INVALID_ARGUMENT, (name, details)
    assert expected in details, (name, details)
    assert "images[0]" in details and "send" in details
