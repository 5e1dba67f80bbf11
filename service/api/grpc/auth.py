"""The bearer token on the gRPC port: an interceptor that asks the shared ``TokenCheck``
(``api/auth.py``) before any handler runs; a refused request's body is never deserialized."""

from __future__ import annotations

from collections.abc import Awaitable, Callable

import grpc

from ..auth import TokenCheck
from ..methods import access_class


class BearerTokenInterceptor(grpc.aio.ServerInterceptor):
    """Refuses, with UNAUTHENTICATED, every call of a protected class whose ``authorization``
    metadata is not ``Bearer <token>``. The refused request's body is never deserialized."""

    def __init__(self, check: TokenCheck,
                 on_refused: Callable[[str, str, str], None] | None = None) -> None:
        self._check = check  # shared with the HTTP API; its token rotates in place
        self._on_refused = on_refused  # (method, status code name, reason): counted, logged

    async def intercept_service(
            self, continuation: Callable[[grpc.HandlerCallDetails],
                                         Awaitable[grpc.RpcMethodHandler]],
            details: grpc.HandlerCallDetails) -> grpc.RpcMethodHandler:
        cls = access_class(details.method)
        if self._check.is_open(cls):
            return await continuation(details)
        presented = next((v for k, v in details.invocation_metadata or ()
                          if k == "authorization"), None)
        if presented is not None and self._check.valid(presented):
            return await continuation(details)
        handler = await continuation(details)
        if handler is None:  # unknown method: let gRPC answer UNIMPLEMENTED
            return handler
        reason = "no authorization metadata" if presented is None else "the token is not valid"
        if self._on_refused is not None:
            self._on_refused(details.method.rsplit("/", 1)[-1], "UNAUTHENTICATED",
                             "unauthenticated")
        return _refusal(handler, f"{details.method.rsplit('/', 1)[-1]} needs a bearer token "
                                 f"({cls} calls are protected on this server): {reason}; send "
                                 "metadata 'authorization: Bearer <token>'")


def _refusal(handler: grpc.RpcMethodHandler, message: str) -> grpc.RpcMethodHandler:
    async def abort(_request_or_stream: object, context: grpc.aio.ServicerContext) -> None:
        await context.abort(grpc.StatusCode.UNAUTHENTICATED, message)

    # no deserializer: an unauthenticated payload is never parsed
    if handler.unary_unary:
        return grpc.unary_unary_rpc_method_handler(abort)
    if handler.unary_stream:
        return grpc.unary_stream_rpc_method_handler(abort)
    if handler.stream_unary:
        return grpc.stream_unary_rpc_method_handler(abort)
    return grpc.stream_stream_rpc_method_handler(abort)
