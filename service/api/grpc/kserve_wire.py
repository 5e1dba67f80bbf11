"""KServe v2 ModelInferRequest/ModelInferResponse ↔ the core's ``InferCall``/``InferResult``.

Everything here is about the wire, and checked before anything is converted: version numbers,
the count of raw buffers, shapes (4 dimensions for FP32/UINT8, ``[N]`` or ``[N, 1]`` for BYTES),
image counts against the limit, Triton's BYTES length-prefixed format, UINT8 ranges. What
depends on the model (its input name and dims, its outputs) is checked by the core
(``service/core/tensor_io.py``), for every front end alike.
"""

from __future__ import annotations

import math
import struct

import numpy as np

from visionserve.inference import grpc_service_pb2 as kpb

from ...core.messages import InferCall, InferInput, InferResult, RequestedOutput
from ...errors import InvalidInput, LimitExceeded, check_image_count
from ...logs import printable


def parse_version(model: str, text: str) -> int:
    """KServe's string version: "" = the newest ready one (0 for the core), else a number >= 1."""
    if not text:
        return 0
    try:
        number = int(text)
    except ValueError:
        raise InvalidInput(f"model {model}: model_version {printable(text)!r} is not a version "
                           "number; leave it empty for the newest") from None
    if number < 1:
        raise InvalidInput(f"model {model}: model_version must be >= 1 (or empty), got {number}")
    return number


def infer_call(req: kpb.ModelInferRequest, max_images: int,
               sources: list[str] | None = None) -> InferCall:
    """``sources`` name where each input's raw bytes came from, for messages (REST: "data" or
    "binary data"); by default ``raw_input_contents[i]`` or ``contents``."""
    where = f"model {req.model_name}" + (f" version {req.model_version}"
                                         if req.model_version else "")
    version = parse_version(req.model_name, req.model_version)
    if req.raw_input_contents and len(req.raw_input_contents) != len(req.inputs):
        raise InvalidInput(f"{where}: {len(req.raw_input_contents)} raw_input_contents for "
                           f"{len(req.inputs)} inputs")
    if req.raw_input_contents:
        for tensor in req.inputs:  # the protocol: one or the other, never both (as Triton)
            if tensor.HasField("contents"):
                raise InvalidInput(f"{where}: input {printable(tensor.name)!r} has typed "
                                   "contents while the request uses raw_input_contents; send "
                                   "every input's data one way, not both")
    inputs = [_input(t, req.raw_input_contents[i] if req.raw_input_contents else None, where,
                     max_images, sources[i] if sources else
                     f"raw_input_contents[{i}]" if req.raw_input_contents else "contents")
              for i, t in enumerate(req.inputs)]
    outputs = []
    for out in req.outputs:
        param = out.parameters.get("classification")
        outputs.append(RequestedOutput(name=out.name, class_count=None if param is None
                                       else param.int64_param))
    return InferCall(model=req.model_name, version=version, inputs=inputs, outputs=outputs,
                     request_id=req.id)


def _input(tensor: kpb.ModelInferRequest.InferInputTensor, raw: bytes | None, where: str,
           max_images: int, source: str) -> InferInput:
    shape = tuple(tensor.shape)
    field = f"input {printable(tensor.name)!r}"
    if tensor.datatype == "BYTES":
        if not (len(shape) == 1 or (len(shape) == 2 and shape[1] == 1)) or shape[0] < 1:
            raise InvalidInput(f"{where}: {field} is BYTES with shape {list(shape)}; expected "
                               "[N] or [N, 1], one encoded image (JPEG/PNG/WebP file bytes) per "
                               "element")
        check_image_count(shape[0], max_images, where)
        elements = deserialize_bytes(raw, where, field, max_images) if raw is not None \
            else list(tensor.contents.bytes_contents)
        return InferInput(name=tensor.name, datatype="BYTES", shape=shape, elements=elements,
                          source=source)
    if tensor.datatype not in ("FP32", "UINT8"):  # the core names what the model takes
        return InferInput(name=tensor.name, datatype=tensor.datatype, shape=shape)
    if len(shape) != 4 or min(shape) < 1:
        raise InvalidInput(f"{where}: {field} has shape {list(shape)}; expected 4 dimensions "
                           "[N, C, H, W] (UINT8 also [N, H, W, C]), each >= 1")
    check_image_count(shape[0], max_images, where)
    data = raw if raw is not None else typed_data(tensor, where, field)
    return InferInput(name=tensor.name, datatype=tensor.datatype, shape=shape, data=data,
                      source=source)


def typed_data(tensor: kpb.ModelInferRequest.InferInputTensor, where: str,
               field: str) -> memoryview:
    """An FP32/UINT8 tensor's typed ``contents`` as raw little-endian bytes, at memory speed.

    A repeated field read value by value costs a Python object per value (16 M floats: 1.3 s
    on the event loop). Its count is known without reading it, so it is checked first; then the
    field is serialized again (one copy) and its packed payload read with numpy: FP32 values are
    the payload itself, UINT8 values are varints of one or two bytes (0..255)."""
    name = "fp32_contents" if tensor.datatype == "FP32" else "uint_contents"
    contents = tensor.contents
    for other, _ in contents.ListFields():
        if other.name != name:
            raise InvalidInput(f"{where}: {field} is {tensor.datatype}: its values belong in "
                               f"contents.{name}, not contents.{other.name}")
    count, expected = len(getattr(contents, name)), math.prod(tensor.shape)
    if count != expected:
        raise InvalidInput(f"{where}: {field} contents.{name} holds {count} values, but shape "
                           f"{list(tensor.shape)} needs {expected}")
    payload = _packed_payload(contents.SerializeToString())
    if name == "fp32_contents":
        return payload
    values = _small_varints(payload, count)
    if values is None:
        raise InvalidInput(f"{where}: {field} contents.uint_contents holds a value above 255; "
                           "UINT8 values must lie in 0..255")
    return memoryview(values)


def _packed_payload(message: bytes) -> memoryview:
    """The payload of a serialized message holding one packed repeated field (or nothing)."""
    view, pos = memoryview(message), 0
    if not message:
        return view
    for _ in range(2):  # the field's key, then its length
        while view[pos] & 0x80:
            pos += 1
        pos += 1
    return view[pos:]


_CHUNK = 4 * 1024 * 1024  # varint bytes decoded at once: bounds the temporaries


def _small_varints(payload: memoryview, count: int) -> np.ndarray | None:
    """``count`` packed varints as uint8, or None when one of them is above 255."""
    b = np.frombuffer(payload, dtype=np.uint8)
    if len(b) == count:  # every value in one byte
        return b
    out = np.empty(count, dtype=np.uint8)
    filled = pos = 0
    while pos < len(b):
        end = min(pos + _CHUNK, len(b))
        while end < len(b) and b[end - 1] >= 0x80:  # never split a varint
            end += 1
        values = _chunk_varints(b[pos:end])
        if values is None or filled + len(values) > count:
            return None
        out[filled:filled + len(values)] = values
        filled, pos = filled + len(values), end
    return out if filled == count else None


def _chunk_varints(b: np.ndarray) -> np.ndarray | None:
    """Whole varints of 1 or 2 bytes: a value below 128 is one byte; 128..255 is two, the first
    of which is the value itself and the second 1. None for anything else."""
    more = b >= 0x80  # a second byte follows
    if more[-1]:
        return None
    second = np.zeros(len(b), dtype=bool)
    second[1:] = more[:-1]
    if (b[second] != 1).any():  # a longer varint: above 255
        return None
    return b[~second]


def deserialize_bytes(raw: bytes, where: str, field: str, max_elements: int) -> list[bytes]:
    """Triton's BYTES wire format: each element a 4-byte little-endian length, then the bytes."""
    out, offset, view = [], 0, memoryview(raw)
    while offset < len(raw):
        if len(out) == max_elements:
            raise LimitExceeded(f"{where}: {field}: more than {max_elements} BYTES elements, "
                                "over the images-per-request limit; split the request")
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


def infer_reply(result: InferResult) -> kpb.ModelInferResponse:
    reply = kpb.ModelInferResponse(model_name=result.model, model_version=str(result.version),
                                   id=result.request_id)
    for out in result.outputs:
        reply.outputs.add(name=out.name, datatype=out.datatype, shape=list(out.shape))
        if out.datatype == "BYTES":
            reply.raw_output_contents.append(serialize_bytes(out.elements or []))
        else:
            reply.raw_output_contents.append(np.ascontiguousarray(out.array, "<f4").tobytes())
    return reply
