"""KServe v2 tensors ↔ the core's types: ModelInfer inputs → images, outputs → wire tensors.

Inputs: FP32 ``[N, C, H, W]`` (normalized), UINT8 ``[N, H, W, C]`` or ``[N, C, H, W]`` (pixels,
normalized on the server) and BYTES ``[N]`` / ``[N, 1]`` whose elements are encoded images;
each from ``raw_input_contents`` or typed ``contents``. A batch's raw buffer is viewed, never
copied, per image. Outputs go back as ``raw_output_contents``; the ``classification``
parameter on a requested output returns Triton's ``"value:index:label"`` BYTES.
"""

from __future__ import annotations

import math
import struct

import numpy as np

from visionserve.inference import grpc_service_pb2 as kpb

from ..backends.base import ModelOutputs
from ..errors import InvalidInput, LimitExceeded, check_image_count
from ..preprocess import EncodedImage, ImageInput, RawTensor
from ..registry import ServedVersion


def images_from_infer_request(req: kpb.ModelInferRequest, served: ServedVersion,
                              max_images: int) -> list[ImageInput]:
    spec, where = served.config.input, served.where
    names = [t.name for t in req.inputs]
    if len(req.inputs) != 1:
        raise InvalidInput(f"{where}: expected exactly one input {spec.name!r}, got {names}")
    tensor = req.inputs[0]
    if tensor.name != spec.name:
        raise InvalidInput(f"{where}: unknown input {tensor.name!r}; the model's input is "
                           f"{spec.name!r}")
    if req.raw_input_contents and len(req.raw_input_contents) != len(req.inputs):
        raise InvalidInput(f"{where}: {len(req.raw_input_contents)} raw_input_contents for "
                           f"{len(req.inputs)} inputs")
    raw = req.raw_input_contents[0] if req.raw_input_contents else None
    shape = list(tensor.shape)
    field = f"input {tensor.name!r}"
    if tensor.datatype == "BYTES":
        return _encoded_images(field, where, shape, raw, tensor, max_images)
    if tensor.datatype not in ("FP32", "UINT8"):
        raise InvalidInput(f"{where}: {field} has datatype {tensor.datatype}; this model takes "
                           f"FP32 [-1, {spec.channels}, {spec.height}, {spec.width}], UINT8 "
                           f"[-1, {spec.height}, {spec.width}, {spec.channels}] or BYTES "
                           "(encoded images)")
    if len(shape) != 4 or min(shape) < 1:
        raise InvalidInput(f"{where}: {field} has shape {shape}; expected 4 dimensions "
                           f"[N, {spec.channels}, {spec.height}, {spec.width}], each >= 1")
    n = shape[0]
    check_image_count(n, max_images, where)
    per_image = math.prod(shape[1:])  # Python ints: no overflow on absurd shapes
    if tensor.datatype == "FP32":
        itemsize, dtype = 4, "float32"
        data = raw if raw is not None else \
            np.asarray(tensor.contents.fp32_contents, dtype="<f4").tobytes()
    else:
        itemsize, dtype = 1, "uint8"
        values = tensor.contents.uint_contents
        if raw is None and values and max(values) > 255:
            raise InvalidInput(f"{where}: {field} contents.uint_contents holds {max(values)}; "
                               "UINT8 values must lie in 0..255")
        data = raw if raw is not None else np.asarray(values, dtype=np.uint8).tobytes()
    expected = n * per_image * itemsize
    if len(data) != expected:
        source = "raw_input_contents[0]" if raw is not None else "contents"
        raise InvalidInput(f"{where}: {field} {source} holds {len(data)} bytes, but shape "
                           f"{shape} of {tensor.datatype} needs {expected}")
    view = memoryview(data)
    step = per_image * itemsize
    return [RawTensor(tuple(shape[1:]), dtype, view[i * step:(i + 1) * step])
            for i in range(n)]


def _encoded_images(field: str, where: str, shape: list[int], raw: bytes | None,
                    tensor: kpb.ModelInferRequest.InferInputTensor,
                    max_images: int) -> list[ImageInput]:
    if not (len(shape) == 1 or (len(shape) == 2 and shape[1] == 1)) or shape[0] < 1:
        raise InvalidInput(f"{where}: {field} is BYTES with shape {shape}; expected [N] or "
                           "[N, 1], one encoded image (JPEG/PNG/WebP file bytes) per element")
    check_image_count(shape[0], max_images, where)
    elements = deserialize_bytes(raw, where, field, max_images) if raw is not None \
        else list(tensor.contents.bytes_contents)
    if len(elements) != shape[0]:
        raise InvalidInput(f"{where}: {field} has {len(elements)} elements but shape {shape}")
    return [EncodedImage(e) for e in elements]


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


def infer_response(req: kpb.ModelInferRequest, served: ServedVersion,
                   outputs: ModelOutputs) -> kpb.ModelInferResponse:
    names = {served.config.output.logits: outputs.logits,
             served.config.output.embedding: outputs.embedding}
    requested = list(req.outputs) or [
        kpb.ModelInferRequest.InferRequestedOutputTensor(name=n) for n in names]
    reply = kpb.ModelInferResponse(model_name=served.name, model_version=str(served.version),
                                   id=req.id)
    for out in requested:
        if out.name not in names:
            raise InvalidInput(f"{served.where}: unknown output {out.name!r}; outputs are "
                               f"{sorted(names)}")
        array = names[out.name]
        param = out.parameters.get("classification")
        if param is not None:
            k = param.int64_param
            if k < 1:
                raise InvalidInput(f"{served.where}: output {out.name!r}: classification "
                                   f"class_count must be >= 1, got {k}")
            strings = classification_strings(array, min(k, array.shape[1]), served.labels)
            reply.outputs.add(name=out.name, datatype="BYTES",
                              shape=[array.shape[0], min(k, array.shape[1])])
            reply.raw_output_contents.append(serialize_bytes(strings))
        else:
            reply.outputs.add(name=out.name, datatype="FP32", shape=list(array.shape))
            reply.raw_output_contents.append(np.ascontiguousarray(array, "<f4").tobytes())
    return reply


def classification_strings(array: np.ndarray, k: int, labels: tuple[str, ...]) -> list[bytes]:
    """Triton's classification extension: per row, the k largest raw values (no softmax) as
    ``"value:index[:label]"``, value printed like C++ ``std::to_string`` (6 decimals)."""
    out: list[bytes] = []
    for row in array:
        best = np.argsort(-row, kind="stable")[:k]
        for i in best:
            text = f"{float(row[i]):f}:{int(i)}"
            if int(i) < len(labels):
                text += f":{labels[int(i)]}"
            out.append(text.encode())
    return out
