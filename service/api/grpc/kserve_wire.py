"""KServe v2 ModelInferRequest/ModelInferResponse ↔ the core's ``InferCall``/``InferResult``.

Everything here is about the protobuf wire, checked before anything is converted: the count of
raw buffers, typed contents (UINT8 ranges) or raw ones, one way per request. The checks both
KServe front ends share (version numbers, shapes, image counts, Triton's BYTES format) are in
``api/kserve_protocol.py``; what depends on the model (its input name and dims, its outputs) is
checked by the core (``service/core/tensor_io.py``), for every front end alike.
"""

from __future__ import annotations

import math

import numpy as np

from visionserve.inference import grpc_service_pb2 as kpb

from ...core.messages import InferCall, InferInput, InferResult, RequestedOutput
from ...errors import InvalidInput
from ...logs import printable
from ..kserve_protocol import deserialize_bytes, parse_version, serialize_bytes, tensor_input


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
    field = f"input {printable(tensor.name)!r}"

    def data() -> bytes | memoryview | list[bytes]:  # read once the shape is checked
        if tensor.datatype == "BYTES":
            return deserialize_bytes(raw, where, field, max_images) if raw is not None \
                else list(tensor.contents.bytes_contents)
        return raw if raw is not None else typed_data(tensor, where, field)

    return tensor_input(tensor.name, tensor.datatype, tuple(tensor.shape), data, where,
                        max_images, source)


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
