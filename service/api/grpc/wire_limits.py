"""Counts checked on the wire, before protobuf parses a request.

gRPC deserializes a request on the event-loop thread before any handler runs, and a repeated
field costs an object per entry: 64 MiB of empty ``images`` entries is 33 million objects. So
the strict deserializer (``strict``) first walks the request's wire format with the schema of
its type here: each repeated field (nested ones included) may hold at most its limit, each
message at most as many fields as its limits allow plus a margin, and the walk stops at the
first field over a limit, so its cost is bounded by the limits, not by the message size. Only
length prefixes are read; what the walk cannot read (truncated or invalid wire data) is left to
the protobuf parser, which refuses it.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from google.protobuf.descriptor import Descriptor

from visionserve.inference import grpc_service_pb2 as kpb
from visionserve.v1 import visionserve_pb2 as pb

from ...errors import ErrorCode
from ...limits import ServerLimits
from ...logs import printable
from ..kserve_protocol import MAX_DIMS, MAX_PARAMETERS, MAX_TENSORS

SINGULAR_MARGIN = 64  # fields beyond the repeated ones a message may carry (singular, unknown)


@dataclass(frozen=True)
class Rule:
    name: str  # the field's name, for the message
    limit: int  # occurrences (entries of a repeated field)
    code: ErrorCode = ErrorCode.INVALID_ARGUMENT
    nested: Schema | None = None  # walk each occurrence with this schema
    packed: bool = False  # a packed varint field: one occurrence holds many elements


@dataclass(frozen=True)
class Schema:
    rules: dict[int, Rule] = field(default_factory=dict)
    model_field: int = 0  # the string field naming the model, for the message (0: none)

    @property
    def max_fields(self) -> int:
        return sum(r.limit for r in self.rules.values()) + SINGULAR_MARGIN


@dataclass(frozen=True)
class Refusal:
    code: ErrorCode
    message: str


def _number(descriptor: Descriptor, name: str) -> int:
    return descriptor.fields_by_name[name].number


def _schema(descriptor: Descriptor, model: str = "", **rules: Rule) -> Schema:
    return Schema({_number(descriptor, name): rule for name, rule in rules.items()},
                  _number(descriptor, model) if model else 0)


def schemas(limits: ServerLimits) -> dict[str, Schema]:
    """The schema of every request type with a repeated field, by full message name."""
    images = limits.max_images_per_request
    too_many = ErrorCode.RESOURCE_EXHAUSTED
    tensor = _schema(pb.Tensor.DESCRIPTOR, shape=Rule("shape", MAX_DIMS, packed=True))
    image = _schema(pb.Image.DESCRIPTOR, tensor=Rule("tensor", 1, nested=tensor))
    vision = {
        "images": Rule("images", images, too_many, nested=image),
    }
    infer = kpb.ModelInferRequest
    params = Rule("parameters", MAX_PARAMETERS)
    contents = _schema(kpb.InferTensorContents.DESCRIPTOR,
                       bytes_contents=Rule("contents.bytes_contents", images, too_many))
    input_tensor = _schema(infer.InferInputTensor.DESCRIPTOR,
                           shape=Rule("shape", MAX_DIMS, packed=True), parameters=params,
                           contents=Rule("contents", 1, nested=contents))
    output = _schema(infer.InferRequestedOutputTensor.DESCRIPTOR, parameters=params)
    return {
        pb.ClassifyRequest.DESCRIPTOR.full_name: _schema(pb.ClassifyRequest.DESCRIPTOR, "model",
                                                         **vision),
        pb.EmbedRequest.DESCRIPTOR.full_name: _schema(pb.EmbedRequest.DESCRIPTOR, "model",
                                                      **vision),
        infer.DESCRIPTOR.full_name: _schema(
            infer.DESCRIPTOR, "model_name", parameters=params,
            inputs=Rule("inputs", MAX_TENSORS, nested=input_tensor),
            outputs=Rule("outputs", MAX_TENSORS, nested=output),
            raw_input_contents=Rule("raw_input_contents", MAX_TENSORS)),
    }


def check(data: bytes, schema: Schema, rpc: str) -> Refusal | None:
    """The first count over a limit in ``data`` (a serialized request), or None."""
    view = memoryview(data)
    try:
        return _walk(view, 0, len(view), schema, rpc, [""])
    except _Unreadable:
        return None  # the protobuf parser refuses it, with its own message


class _Unreadable(Exception):
    pass


def _varint(view: memoryview, pos: int, end: int) -> tuple[int, int]:
    result = shift = 0
    while True:
        if pos >= end or shift > 63:
            raise _Unreadable
        byte = view[pos]
        pos += 1
        result |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return result, pos
        shift += 7


def _walk(view: memoryview, pos: int, end: int, schema: Schema, rpc: str,
          model: list[str]) -> Refusal | None:
    counts: dict[int, int] = {}
    fields = 0
    while pos < end:
        key, pos = _varint(view, pos, end)
        number, wire_type = key >> 3, key & 7
        fields += 1
        if fields > schema.max_fields:
            return _refuse(ErrorCode.INVALID_ARGUMENT, rpc, model[0],
                           f"more than {schema.max_fields} fields in one message; this is not "
                           "a request our clients send")
        if wire_type == 0:
            _, pos = _varint(view, pos, end)
            length = 0
        elif wire_type == 1:
            length = 8
        elif wire_type == 5:
            length = 4
        elif wire_type == 2:
            length, pos = _varint(view, pos, end)
        else:
            raise _Unreadable  # groups (proto2) or garbage
        if pos + length > end:
            raise _Unreadable
        if number == schema.model_field and wire_type == 2 and not model[0]:
            model[0] = bytes(view[pos:pos + min(length, 256)]).decode("utf-8", "replace")
        rule = schema.rules.get(number)
        if rule is not None:
            counts[number] = counts.get(number, 0) + 1
            # a packed field holds its elements in one length-delimited occurrence: a varint
            # is 1 to 10 bytes, so more than 10 bytes per allowed element is over the limit
            if counts[number] > rule.limit or (rule.packed and wire_type == 2
                                               and length > rule.limit * 10):
                return _refuse(rule.code, rpc, model[0],
                               f"{rule.name}: more than {rule.limit} entries in one request; "
                               + ("split the request (the server's --max-images-per-request)"
                                  if rule.code is ErrorCode.RESOURCE_EXHAUSTED
                                  else "send at most that many"))
            if rule.nested is not None and wire_type == 2:
                refusal = _walk(view, pos, pos + length, rule.nested, rpc, model)
                if refusal is not None:
                    return refusal
        pos += length
    return None


def _refuse(code: ErrorCode, rpc: str, model: str, what: str) -> Refusal:
    where = f"model {printable(model)}" if model else rpc
    return Refusal(code, f"{where}: {what} (refused before parsing the {rpc} request)")
