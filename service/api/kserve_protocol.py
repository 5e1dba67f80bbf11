"""What both KServe v2 front ends (gRPC and HTTP/REST) share and neither owns: the protocol's
version strings, extensions and repository-index states, the checks of an input tensor's shape
and image count, and Triton's BYTES format. No protobuf: each front end turns its own wire into
these typed inputs (the HTTP API imports this, never the gRPC servicers)."""

from __future__ import annotations

import struct
from collections.abc import Callable

from ..core.messages import InferInput
from ..errors import InvalidInput, LimitExceeded, check_image_count
from ..logs import printable
from ..states import VersionState

EXTENSIONS = ["classification", "model_configuration", "model_repository", "statistics"]
# Triton's RepositoryIndex strings for our version states
INDEX_STATES = {VersionState.READY: "READY", VersionState.LOADING: "LOADING",
                VersionState.FAILED: "UNAVAILABLE", VersionState.DRAINING: "UNLOADING",
                VersionState.UNLOADED: "UNAVAILABLE", None: ""}  # None: a folder not loaded
# counts either wire may carry, checked before anything is converted (gRPC: on the wire
# format, before protobuf parses; REST: on the parsed JSON, before numpy or protobuf)
MAX_TENSORS = 16  # KServe inputs, outputs, raw_input_contents (our models take one input)
MAX_PARAMETERS = 64  # entries of a KServe parameters map
MAX_DIMS = 8  # entries of a shape


def parse_version(model: str, text: str) -> int:
    """KServe's string version: "" = the newest ready one (0 for the core), else a number >= 1."""
    if not text:
        return 0
    if not (text.isascii() and text.isdigit() and len(text) <= 18):  # int() takes "１", " 1"
        raise InvalidInput(f"model {model}: model_version {printable(text)!r} is not a version "
                           "number (ASCII digits); leave it empty for the newest")
    number = int(text)
    if number < 1:
        raise InvalidInput(f"model {model}: model_version must be >= 1 (or empty), got {number}")
    return number


def tensor_input(name: str, datatype: str, shape: tuple[int, ...],
                 data: Callable[[], bytes | memoryview | list[bytes]], where: str,
                 max_images: int, source: str) -> InferInput:
    """One input tensor as the core takes it, its shape and image count checked before
    ``data()`` is read (the FP32/UINT8 bytes, or the BYTES elements). A datatype the server
    does not read passes through: the core names what the model takes."""
    field = f"input {printable(name)!r}"
    if datatype == "BYTES":
        if not (len(shape) == 1 or (len(shape) == 2 and shape[1] == 1)) or shape[0] < 1:
            raise InvalidInput(f"{where}: {field} is BYTES with shape {list(shape)}; expected "
                               "[N] or [N, 1], one encoded image (JPEG/PNG/WebP file bytes) per "
                               "element")
        check_image_count(shape[0], max_images, where)
        return InferInput(name=name, datatype="BYTES", shape=shape,
                          elements=data(), source=source)  # type: ignore[arg-type]
    if datatype not in ("FP32", "UINT8"):
        return InferInput(name=name, datatype=datatype, shape=shape)
    if len(shape) != 4 or min(shape) < 1:
        raise InvalidInput(f"{where}: {field} has shape {list(shape)}; expected 4 dimensions "
                           "[N, C, H, W] (UINT8 also [N, H, W, C]), each >= 1")
    check_image_count(shape[0], max_images, where)
    return InferInput(name=name, datatype=datatype, shape=shape, data=data(),  # type: ignore[arg-type]
                      source=source)


def check_element_count(count: int, where: str, field: str, max_elements: int) -> None:
    if count > max_elements:
        raise LimitExceeded(f"{where}: {field}: more than {max_elements} BYTES elements, "
                            "over the images-per-request limit; split the request")


def deserialize_bytes(raw: bytes | memoryview, where: str, field: str,
                      max_elements: int) -> list[bytes]:
    """Triton's BYTES wire format: each element a 4-byte little-endian length, then the bytes."""
    out, offset, view = [], 0, memoryview(raw)
    while offset < len(raw):
        check_element_count(len(out) + 1, where, field, max_elements)
        if offset + 4 > len(raw):
            raise InvalidInput(f"{where}: {field}: truncated BYTES element length at byte "
                               f"{offset}")
        (size,) = struct.unpack_from("<I", raw, offset)
        offset += 4
        if offset + size > len(raw):
            raise InvalidInput(f"{where}: {field}: BYTES element of {size} bytes runs past the "
                               f"end of the buffer ({len(raw)} bytes)")
        out.append(bytes(view[offset:offset + size]))
        offset += size
    return out


def serialize_bytes(elements: list[bytes]) -> bytes:
    return b"".join(struct.pack("<I", len(e)) + e for e in elements)
