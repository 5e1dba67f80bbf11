"""KServe v2 REST bodies (JSON, and Triton's binary tensor data extension) ↔ the typed calls.

A JSON infer request becomes the typed ``InferCall`` directly (JSON ``data`` as raw
little-endian bytes or BYTES elements, binary tensor data as they are), through the checks both
KServe front ends share (``api/kserve_protocol.py``: shapes, image counts, Triton's BYTES
format): one set of checks and messages, so a REST and a gRPC ModelInfer of the same tensors
are one call to the core.

Binary tensor data (``Inference-Header-Content-Length``): the body is the JSON header followed by
the inputs that declare ``parameters.binary_data_size``, in the order of ``inputs``; outputs with
``parameters.binary_data`` (or all, with the request's ``binary_data_output``) follow the JSON
reply the same way. JSON cannot carry non-finite numbers: a NaN or ±Inf output value is written
as ``null``, and that output's ``parameters`` say ``"non_finite": true``; request the output as
binary data to get the values themselves.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

from ...core.messages import ClassifyResult, EmbedResult, InferCall, InferResult, RequestedOutput
from ...errors import InvalidInput
from ...logs import printable
from ...models.statistics import Duration
from ...models.views import IndexEntry, ModelMetadata, TensorSpec, VersionStats
from ..kserve_protocol import (
    INDEX_STATES,
    MAX_DIMS,
    MAX_PARAMETERS,
    MAX_TENSORS,
    check_element_count,
    deserialize_bytes,
    parse_version,
    serialize_bytes,
    tensor_input,
)

_NUMERIC = {"FP32": "<f4", "UINT8": "u1"}
MAX_DIM = 2**31 - 1


@dataclass(frozen=True)
class RestInfer:
    call: InferCall
    binary_outputs: set[str]  # names to send as binary data ("*": every output)
    timeout_us: int  # Triton's ``timeout`` request parameter; 0 = none


def utf8(text: str, where: str) -> bytes:
    """``text`` as UTF-8; a JSON string holding a lone surrogate (``"\\ud800"``) is refused."""
    try:
        return text.encode("utf-8")
    except UnicodeEncodeError:
        raise InvalidInput(f"{where}: holds an unpaired surrogate escape (\\ud800-\\udfff); "
                           "send valid Unicode") from None


_KINDS = {str: "a string", int: "an integer", dict: "an object", list: "an array"}


def _field(obj: dict[str, Any], key: str, kind: type, where: str, required: bool = True,
           default: Any = None) -> Any:
    if key not in obj:
        if required:
            raise InvalidInput(f"{where}: field {key!r} is missing")
        return default
    value = obj[key]
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise InvalidInput(f"{where}: field {key!r} must be {_KINDS[kind]}, got "
                           f"{type(value).__name__} {printable(json.dumps(value)[:60])}")
    if kind is str:
        utf8(value, f"{where}: field {key!r}")
    return value


def _parameters(obj: dict[str, Any], where: str) -> dict[str, Any]:
    params = _field(obj, "parameters", dict, where, required=False, default={})
    _at_most(len(params), MAX_PARAMETERS, f"{where}: parameters")
    return params


def _at_most(count: int, limit: int, what: str) -> None:
    """The counts the gRPC wire enforces, before anything is converted."""
    if count > limit:
        raise InvalidInput(f"{what}: more than {limit} entries in one request; this is not a "
                           "request our clients send")


Pending = tuple[str, str, tuple[int, ...], Callable[[], Any], str]  # name, type, shape, data


def infer_request(header: Any, binary: memoryview, model: str, version: str,
                  max_images: int) -> RestInfer:
    """A v2 inference request (its JSON header and the binary data after it) as a typed call:
    the JSON is checked first (inputs, outputs, parameters), then the version, then each
    tensor's shape and image count (``kserve_protocol``), in the gRPC front end's order."""
    where = f"model {model}" + (f" version {version}" if version else "")
    if not isinstance(header, dict):
        raise InvalidInput(f"{where}: the request body must be a JSON object with an "
                           f"\"inputs\" array, got {type(header).__name__}")
    inputs = _field(header, "inputs", list, where)
    requested = _field(header, "outputs", list, where, required=False, default=[])
    _at_most(len(inputs), MAX_TENSORS, f"{where}: inputs")
    _at_most(len(requested), MAX_TENSORS, f"{where}: outputs")
    request_id = _field(header, "id", str, where, required=False, default="")
    params = _parameters(header, where)
    pending = _inputs(inputs, binary, where, max_images)
    binary_outputs = {"*"} if params.get("binary_data_output") is True else set()
    outputs = _outputs(requested, where, binary_outputs)
    timeout = params.get("timeout", 0)
    if isinstance(timeout, bool) or not isinstance(timeout, int) or not 0 <= timeout < 2**63:
        raise InvalidInput(f"{where}: parameters.timeout must be an integer in 0..2^63-1 "
                           "(microseconds; 0 = none)")
    version_number = parse_version(model, version)
    call = InferCall(model=model, version=version_number, outputs=outputs, request_id=request_id,
                     inputs=[tensor_input(name, datatype, shape, data, where, max_images, source)
                             for name, datatype, shape, data, source in pending])
    return RestInfer(call=call, binary_outputs=binary_outputs, timeout_us=timeout)


def _inputs(inputs: list[Any], binary: memoryview, where: str, max_images: int) -> list[Pending]:
    """Each input's JSON checked, its values taken from ``data`` or from the binary data after
    the header (``binary_data_size``, in the order of ``inputs``, adding up to all of it)."""
    pending: list[Pending] = []
    offset = 0
    for i, tensor in enumerate(inputs):
        at = f"{where}: inputs[{i}]"
        if not isinstance(tensor, dict):
            raise InvalidInput(f"{at} must be an object with name, shape, datatype and data")
        name = _field(tensor, "name", str, at)
        shape = _field(tensor, "shape", list, at)
        if len(shape) > MAX_DIMS or not all(
                isinstance(d, int) and not isinstance(d, bool) and 0 <= d <= MAX_DIM
                for d in shape):
            raise InvalidInput(f"{at} ({printable(name)!r}): shape must be an array of at most "
                               f"{MAX_DIMS} integers in 0..{MAX_DIM}, got "
                               f"{printable(json.dumps(shape)[:60])}")
        datatype = _field(tensor, "datatype", str, at)
        size = _parameters(tensor, at).get("binary_data_size")
        if size is None:
            if "data" not in tensor:
                raise InvalidInput(f"{at} ({printable(name)!r}): field 'data' is missing (or "
                                   "give parameters.binary_data_size and send the values as "
                                   "binary data after the JSON header)")
            values = _json_data(tensor["data"], datatype, shape, at, name, max_images)
            pending.append((name, datatype, tuple(shape), lambda values=values: values, "data"))
            continue
        if isinstance(size, bool) or not isinstance(size, int) or size < 0:
            raise InvalidInput(f"{at} ({printable(name)!r}): parameters.binary_data_size "
                               "must be an integer >= 0")
        if "data" in tensor:
            raise InvalidInput(f"{at} ({printable(name)!r}) has both \"data\" and "
                               "binary_data_size; send its values one way")
        if offset + size > len(binary):
            raise InvalidInput(f"{at} ({printable(name)!r}): binary_data_size {size} runs "
                               f"past the binary data after the JSON header ({len(binary)} "
                               f"bytes, {offset} used by the inputs before it)")
        raw = binary[offset:offset + size]  # a view of the body: no copy
        offset += size
        field = f"input {printable(name)!r}"
        pending.append((name, datatype, tuple(shape), (
            lambda raw=raw, field=field: deserialize_bytes(raw, where, field, max_images))
            if datatype == "BYTES" else (lambda raw=raw: raw), "binary data"))
    if offset != len(binary):
        raise InvalidInput(f"{where}: {len(binary)} bytes of binary data follow the JSON header, "
                           f"but the inputs' binary_data_size add up to {offset}; check "
                           "Inference-Header-Content-Length and the sizes")
    return pending


def _outputs(requested: list[Any], where: str, binary_outputs: set[str]) -> list[RequestedOutput]:
    """The outputs asked for (each with its ``classification`` count), and in
    ``binary_outputs`` those asked as binary data."""
    outputs = []
    for i, out in enumerate(requested):
        at = f"{where}: outputs[{i}]"
        if not isinstance(out, dict):
            raise InvalidInput(f"{at} must be an object with a name")
        name = _field(out, "name", str, at)
        out_params = _parameters(out, at)
        count = out_params.get("classification")
        if count is not None:
            if isinstance(count, bool) or not isinstance(count, int) or \
                    not 0 <= count <= MAX_DIM:
                raise InvalidInput(f"{at} ({printable(name)!r}): parameters.classification "
                                   f"must be an integer in 0..{MAX_DIM} (the number of classes)")
        outputs.append(RequestedOutput(name=name, class_count=count))
        if out_params.get("binary_data") is True:
            binary_outputs.add(name)
    return outputs


def _json_data(data: Any, datatype: str, shape: list[int], at: str,
               name: str, max_images: int) -> bytes | list[bytes]:
    """JSON ``data`` (flat or nested, row-major): the bytes a binary client would send, or the
    BYTES elements (counted before any is converted)."""
    field = f"{at} ({printable(name)!r}) data"
    if datatype == "BYTES":
        items = _flat(data)
        check_element_count(len(items), at, f"input {printable(name)!r}", max_images)
        if not all(isinstance(x, str) for x in items):
            raise InvalidInput(f"{field}: BYTES values in JSON are strings; send image files "
                               "as binary data (binary_data_size) or POST them to "
                               "/v2/models/<model>/classify")
        return [utf8(x, field) for x in items]
    if datatype not in _NUMERIC:  # the core names what the model takes
        return b""
    try:
        values = np.asarray(data)
    except ValueError:  # ragged nesting
        raise InvalidInput(f"{field}: nested arrays of unequal lengths; send a flat array "
                           "in row-major order or equal-length nesting") from None
    if values.dtype.kind not in "iuf" or values.dtype == np.bool_:
        raise InvalidInput(f"{field}: {datatype} values must be numbers, got "
                           f"{'booleans' if values.dtype == np.bool_ else 'strings or objects'}")
    if datatype == "UINT8" and values.size and (
            values.dtype.kind == "f" or values.min() < 0 or values.max() > 255):
        raise InvalidInput(f"{field}: UINT8 values must be integers in 0..255")
    if values.size != math.prod(shape):
        raise InvalidInput(f"{field} holds {values.size} values, but shape {shape} needs "
                           f"{math.prod(shape)}")
    with np.errstate(over="ignore"):
        converted = np.ascontiguousarray(values.reshape(-1), _NUMERIC[datatype])
    if datatype == "FP32" and not np.isfinite(converted).all():
        raise InvalidInput(f"{field}: FP32 values must be finite numbers within float32's "
                           "range (±3.4e38)")
    return converted.tobytes()


def _flat(data: Any) -> list[Any]:
    if not isinstance(data, list):
        return [data]
    out: list[Any] = []
    stack = [iter(data)]
    while stack:
        for item in stack[-1]:
            if isinstance(item, list):
                stack.append(iter(item))
                break
            out.append(item)
        else:
            stack.pop()
    return out


def infer_response(result: InferResult, binary_outputs: set[str]) -> tuple[dict[str, Any],
                                                                            list[bytes]]:
    """The JSON reply and the binary buffers that follow it (in output order)."""
    outputs, buffers = [], []
    for out in result.outputs:
        entry: dict[str, Any] = {"name": out.name, "datatype": out.datatype,
                                 "shape": list(out.shape)}
        if "*" in binary_outputs or out.name in binary_outputs:
            data = serialize_bytes(out.elements or []) if out.datatype == "BYTES" \
                else np.ascontiguousarray(out.array, "<f4").tobytes()
            entry["parameters"] = {"binary_data_size": len(data)}
            buffers.append(data)
        elif out.datatype == "BYTES":
            entry["data"] = [e.decode("utf-8", errors="replace") for e in out.elements or []]
        else:
            values, finite = json_floats(out.array)
            entry["data"] = values
            if not finite:
                entry["parameters"] = {"non_finite": True}
        outputs.append(entry)
    return {"model_name": result.model, "model_version": str(result.version),
            "id": result.request_id, "outputs": outputs}, buffers


def json_floats(array: np.ndarray | None) -> tuple[list[Any], bool]:
    """float32 values as JSON numbers (each the exact float32, as a shortest-repr double),
    flat in row-major order; non-finite ones as None. Returns (values, all finite)."""
    flat = np.asarray(array, np.float32).reshape(-1)
    values = flat.astype(np.float64).tolist()
    if np.isfinite(flat).all():
        return values, True
    return [v if math.isfinite(v) else None for v in values], False


def classify_response(result: ClassifyResult) -> dict[str, Any]:
    """The gRPC ClassifyResponse's fields, as JSON."""
    results = []
    finite = True
    for row in result.results:
        classes = []
        for c in row:
            score = float(np.float32(c.score))
            if not math.isfinite(score):
                finite, score = False, None  # type: ignore[assignment]
            classes.append({"index": c.index, "label": c.label, "score": score})
        results.append({"classes": classes})
    reply: dict[str, Any] = {"model": result.model, "version": result.version,
                             "request_id": result.request_id, "results": results}
    if not finite:
        reply["non_finite"] = True
    return reply


def embed_response(result: EmbedResult, values: bool = True) -> dict[str, Any]:
    """The gRPC EmbedResponse's fields, as JSON: embeddings as one array per image (left out
    when not ``values``: they travel as binary data)."""
    e = np.asarray(result.embeddings, np.float32)
    reply: dict[str, Any] = {"model": result.model, "version": result.version,
                             "request_id": result.request_id, "shape": list(e.shape)}
    if not values:
        return reply
    flat, finite = json_floats(e)
    dim = e.shape[1] if e.ndim == 2 else 0
    reply["embeddings"] = [flat[i * dim:(i + 1) * dim] for i in range(e.shape[0])]
    if not finite:
        reply["non_finite"] = True
    return reply


def metadata_json(view: ModelMetadata) -> dict[str, Any]:
    """KServe's model metadata reply, keys in the protocol's order."""
    def tensors(specs: tuple[TensorSpec, ...]) -> list[dict[str, Any]]:
        return [{"name": t.name, "datatype": t.datatype, "shape": list(t.shape)} for t in specs]

    reply = {"name": view.name, "versions": [str(v) for v in view.versions],
             "platform": view.platform, "inputs": tensors(view.inputs),
             "outputs": tensors(view.outputs)}
    if view.weights:  # an extension: where the answering version's weights came from
        reply["parameters"] = {"weights": view.weights}
    return reply


def statistics_json(view: VersionStats) -> dict[str, Any]:
    """Triton's ModelStatistics as its REST API writes it (counts and nanoseconds)."""
    s = view.stats

    def d(x: Duration) -> dict[str, int]:
        return {"count": x.count, "ns": x.ns}

    return {"name": view.name, "version": str(view.version),
            "last_inference": s.last_inference_ms, "inference_count": s.inference_count,
            "execution_count": s.execution_count,
            "inference_stats": {"success": d(s.success), "fail": d(s.fail), "queue": d(s.queue),
                                "compute_input": d(s.compute_input),
                                "compute_infer": d(s.compute_infer),
                                "compute_output": d(s.compute_output)},
            "batch_stats": [{"batch_size": size, "compute_infer": d(dur)}
                            for size, dur in sorted(s.batches.items())]}


def index_json(entry: IndexEntry) -> dict[str, str]:
    return {"name": entry.name, "version": str(entry.version) if entry.version else "",
            "state": INDEX_STATES[entry.state], "reason": entry.reason}
