"""Named tensors (KServe v2 / Open Inference Protocol) ↔ the core's images and outputs.

Inputs: FP32 ``[N, C, H, W]`` (normalized), UINT8 ``[N, H, W, C]`` or ``[N, C, H, W]`` (pixels,
normalized on the server) and BYTES ``[N]`` / ``[N, 1]`` whose elements are encoded images. A
batch's buffer is viewed, never copied, per image. Outputs are the model's ``logits`` and
``embedding`` (FP32), or, for an output requested with a class count, Triton's classification
extension: ``"value:index:label"`` strings. Requested outputs are checked before any work. No
wire format here: the front ends convert their messages to and from ``InferCall``/``InferResult``.
"""

from __future__ import annotations

import math

import numpy as np

from ..engine.backends.base import ModelOutputs
from ..engine.preprocess import EncodedImage, ImageInput, RawTensor
from ..errors import InvalidInput
from ..logs import printable
from ..models.loader import ServedVersion
from .messages import InferCall, OutputTensor, RequestedOutput


def images_from_inputs(call: InferCall, served: ServedVersion) -> list[ImageInput]:
    spec, where = served.config.input, served.where
    names = [t.name for t in call.inputs]
    if len(call.inputs) != 1:
        raise InvalidInput(f"{where}: expected exactly one input {spec.name!r}, got "
                           f"{len(names)}: {printable(', '.join(names[:8]))}")
    tensor = call.inputs[0]
    if tensor.name != spec.name:
        raise InvalidInput(f"{where}: unknown input {printable(tensor.name)!r}; the model's "
                           f"input is {spec.name!r}")
    shape = list(tensor.shape)
    field = f"input {printable(tensor.name)!r}"
    if tensor.datatype == "BYTES":
        elements = tensor.elements or []
        if len(elements) != shape[0]:
            raise InvalidInput(f"{where}: {field} has {len(elements)} elements but shape "
                               f"{shape}")
        return [EncodedImage(e) for e in elements]
    if tensor.datatype not in ("FP32", "UINT8"):
        raise InvalidInput(f"{where}: {field} has datatype {tensor.datatype}; this model takes "
                           f"{spec.describe_forms()}")
    n = shape[0]  # its count was checked at the boundary, before any conversion
    per_image = math.prod(shape[1:])  # Python ints: no overflow on absurd shapes
    itemsize, dtype = (4, "float32") if tensor.datatype == "FP32" else (1, "uint8")
    data = tensor.data if tensor.data is not None else b""
    expected = n * per_image * itemsize
    if len(data) != expected:
        raise InvalidInput(f"{where}: {field} {tensor.source} holds {len(data)} bytes, but shape "
                           f"{shape} of {tensor.datatype} needs {expected}")
    view = memoryview(data)
    step = per_image * itemsize
    return [RawTensor(tuple(shape[1:]), dtype, view[i * step:(i + 1) * step])
            for i in range(n)]


def check_requested_outputs(call: InferCall, served: ServedVersion) -> list[RequestedOutput]:
    """The outputs to answer (all of them, raw, when none is named), refused before any work
    when a name is unknown or named twice (each output is answered once: a reply never grows
    with the request's list), or a class count is not positive."""
    names = (served.config.output.logits, served.config.output.embedding)
    requested = call.outputs or [RequestedOutput(name=n) for n in names]
    if len(requested) > len(names):
        raise InvalidInput(f"{served.where}: {len(requested)} outputs requested; the model has "
                           f"{len(names)} ({', '.join(names)}): name each at most once")
    seen: set[str] = set()
    for out in requested:
        if out.name not in names:
            raise InvalidInput(f"{served.where}: unknown output {printable(out.name)!r}; "
                               f"outputs are {sorted(names)}")
        if out.name in seen:
            raise InvalidInput(f"{served.where}: output {out.name!r} is requested twice; name "
                               "each output at most once")
        seen.add(out.name)
        if out.class_count is not None and out.class_count < 1:
            raise InvalidInput(f"{served.where}: output {out.name!r}: classification "
                               f"class_count must be >= 1, got {out.class_count}")
    return requested


def output_tensors(requested: list[RequestedOutput], served: ServedVersion,
                   outputs: ModelOutputs) -> list[OutputTensor]:
    arrays = {served.config.output.logits: outputs.logits,
              served.config.output.embedding: outputs.embedding}
    result = []
    for out in requested:
        array = arrays[out.name]
        if out.class_count is not None:
            k = min(out.class_count, array.shape[1])
            result.append(OutputTensor(name=out.name, datatype="BYTES", shape=(array.shape[0], k),
                                       elements=classification_strings(array, k, served.labels)))
        else:
            result.append(OutputTensor(name=out.name, datatype="FP32", shape=array.shape,
                                       array=array))
    return result


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
