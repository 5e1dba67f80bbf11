"""Strict decoding: a request whose repeated fields exceed their limits is refused before protobuf
parses it (``wire_limits``), and a request body that is not valid protobuf is answered
INVALID_ARGUMENT naming its message type, never gRPC's UNKNOWN with a Python class name."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable

import grpc

from .status import GRPC_CODES
from .wire_limits import Schema, check


class _Undecodable:
    """What a request body that is not valid protobuf deserializes to (see ``add_servicer``)."""

    __slots__ = ("code", "error", "reason")

    def __init__(self, error: str, code: grpc.StatusCode = grpc.StatusCode.INVALID_ARGUMENT,
                 reason: str = "undecodable") -> None:
        self.error = error
        self.code = code
        self.reason = reason  # for the refusal count: undecodable | wire_limit


Refused = Callable[[str, str, str], None]  # (method, status code name, reason)


def _ignore(method: str, code: grpc.StatusCode, reason: str) -> None:
    pass


def add_servicer(add_to_server: Callable[[object, object], None], servicer: object,
                 server: grpc.aio.Server, schemas: dict[str, Schema],
                 on_refused: Refused = _ignore) -> None:
    """``add_XServicer_to_server(servicer, server)`` (generated code), except that a request
    body which is not valid protobuf is answered INVALID_ARGUMENT naming the message type,
    rather than gRPC's UNKNOWN "Unexpected <class ...DecodeError>". No interceptor: the cost is
    one try per deserialization and one isinstance per call. A request type with a schema in
    ``schemas`` (by full message name) is checked against it first. Each refusal is reported
    to ``on_refused`` (counted and logged: no handler runs for it)."""

    class Capture:
        def add_generic_rpc_handlers(self, handlers: object) -> None:
            pass  # the same handlers arrive below, by name

        def add_registered_method_handlers(self, service: str,
                                           handlers: dict[str, grpc.RpcMethodHandler]) -> None:
            wrapped = {name: _strict(service, name, h, schemas, on_refused)
                       for name, h in handlers.items()}
            server.add_generic_rpc_handlers(
                (grpc.method_handlers_generic_handler(service, wrapped),))
            server.add_registered_method_handlers(service, wrapped)

    add_to_server(servicer, Capture())


def _strict(service: str, name: str, handler: grpc.RpcMethodHandler,
            schemas: dict[str, Schema], on_refused: Refused) -> grpc.RpcMethodHandler:
    parse = handler.request_deserializer
    message = f"the request body of {service}/{name} is not a valid protobuf message"
    request_type = getattr(parse, "__self__", None)  # the generated class's FromString
    descriptor = getattr(request_type, "DESCRIPTOR", None)
    schema = schemas.get(descriptor.full_name) if descriptor is not None else None

    def deserialize(data: bytes) -> object:
        if schema is not None and (refusal := check(data, schema, name)) is not None:
            return _Undecodable(refusal.message, GRPC_CODES[refusal.code], "wire_limit")
        try:
            return parse(data)
        except Exception as exc:  # noqa: BLE001 - DecodeError and friends
            return _Undecodable(f"{message} ({type(exc).__name__}); send a serialized "
                                "request of the type in its .proto (use generated stubs)")

    async def refuse(context: grpc.aio.ServicerContext, request: _Undecodable) -> None:
        on_refused(name, request.code.name, request.reason)
        await context.abort(request.code, request.error)

    if handler.unary_unary:
        inner = handler.unary_unary

        async def unary(request: object, context: grpc.aio.ServicerContext) -> object:
            if isinstance(request, _Undecodable):
                await refuse(context, request)
            return await inner(request, context)

        return grpc.unary_unary_rpc_method_handler(unary, deserialize,
                                                   handler.response_serializer)
    if handler.stream_stream:
        inner_stream = handler.stream_stream

        async def checked(requests: AsyncIterator[object],
                          context: grpc.aio.ServicerContext) -> AsyncIterator[object]:
            async for request in requests:
                if isinstance(request, _Undecodable):
                    await refuse(context, request)
                yield request

        async def stream(requests: AsyncIterator[object],
                         context: grpc.aio.ServicerContext) -> AsyncIterator[object]:
            async for reply in inner_stream(checked(requests, context), context):
                yield reply

        return grpc.stream_stream_rpc_method_handler(stream, deserialize,
                                                     handler.response_serializer)
    return handler  # no other kinds in our services
