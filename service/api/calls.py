"""What every RPC handler shares: request id, deadline, in-flight gauge, request histogram,
access log, error mapping, and the bidirectional-stream pattern (many requests in flight on one
stream)."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import TypeVar

import grpc

from ..control import ModelControl
from ..errors import InvalidInput, ModelUnavailable, ServerBusy, error_code
from ..lifecycle import Lifecycle
from ..logs import REQUEST_ID, log_field, printable, request_id
from ..metrics import UNKNOWN_MODEL, Metrics
from .status import GRPC_CODES, grpc_status

access_log = logging.getLogger("visionserve.access")
MAX_MODEL_NAME = 256
INFERENCE_METHODS = frozenset({"Classify", "ClassifyStream", "Embed", "ModelInfer",
                               "ModelStreamInfer"})
ACCESS_LOG_LINES_PER_S = 20  # in "errors" mode: a flood of bad requests is summarized

T = TypeVar("T")
Req = TypeVar("Req")


def deadline_of(context: grpc.aio.ServicerContext) -> float | None:
    """The client's deadline as a time.monotonic() instant, or None when it set none."""
    remaining = context.time_remaining()
    return None if remaining is None else time.monotonic() + remaining


def metadata_request_id(context: grpc.aio.ServicerContext) -> str:
    """The ``x-request-id`` metadata of a call (as a mesh or gateway sets it), or ""."""
    for key, value in context.invocation_metadata() or ():
        if key == "x-request-id":
            return value if isinstance(value, str) else value.decode(errors="replace")
    return ""


class CallHandler:
    def __init__(self, control: ModelControl, metrics: Metrics, lifecycle: Lifecycle,
                 access_log_mode: str = "errors", max_inference: int = 0) -> None:
        self._control = control
        self._lifecycle = lifecycle  # admission: new calls are refused from STOPPING on
        self._metrics = metrics
        self._access = access_log_mode
        self._max_inference = max_inference  # 0 = no limit
        self._inference = 0  # inference requests inside run() now
        self._log_budget = float(ACCESS_LOG_LINES_PER_S)
        self._log_refilled = time.monotonic()
        self._log_suppressed = 0
        self._running = 0  # requests inside run() now
        self._drained = asyncio.Event()
        self._last_refused = 0.0  # time.monotonic() of the last call refused while draining

    async def drain(self, timeout_s: float) -> bool:
        """Once the lifecycle is STOPPING (new requests refused UNAVAILABLE): wait up to
        ``timeout_s`` for the running ones to finish; True when none is left."""
        if self._running == 0:
            return True
        try:
            await asyncio.wait_for(self._drained.wait(), timeout_s)
        except TimeoutError:
            return False
        return True

    async def quiet(self, period_s: float, timeout_s: float) -> None:
        """After ``drain``: keep refusing until no call arrived for ``period_s`` (at most
        ``timeout_s``), so that clients still sending get UNAVAILABLE from us rather than a
        CANCELLED from gRPC's own shutdown racing their calls."""
        end = time.monotonic() + timeout_s
        while (now := time.monotonic()) < end:
            wait = min(self._last_refused + period_s, end) - now
            if wait <= 0:
                return
            await asyncio.sleep(wait)

    async def run(self, method: str, model: str,
                  work: Callable[[], Awaitable[tuple[T, int]]], client_id: str = "") -> T:
        """Run ``work`` (which returns the reply and the version that answered) under a request
        id (``client_id`` or a new one) and record its outcome; exceptions propagate unchanged.
        """
        start = time.perf_counter()
        REQUEST_ID.set(request_id(client_id))
        inflight = self._metrics.inflight.labels(method)
        inflight.inc()
        self._running += 1
        counted = method in INFERENCE_METHODS
        self._inference += counted
        version = ""
        code = grpc.StatusCode.OK
        try:
            if not self._lifecycle.admitting:
                self._last_refused = time.monotonic()
                raise ModelUnavailable("the server is shutting down and takes no new requests; "
                                       "retry (another replica, or this one once restarted)")
            if counted and self._max_inference and self._inference > self._max_inference:
                raise ServerBusy(f"server busy: {self._max_inference} inference requests are in "
                                 "progress (its --max-inflight-requests); retry with backoff, "
                                 "or add replicas")
            if len(model) > MAX_MODEL_NAME or not model.isprintable() \
                    or any(c in model for c in "/\\") or model in (".", ".."):
                raise InvalidInput(f"model name {printable(model)!r} ({len(model)} chars) is not "
                                   f"a model name: use at most {MAX_MODEL_NAME} printable "
                                   "characters, no path separators (it names a folder of the "
                                   "repository)")
            reply, answered = await work()
            version = str(answered) if answered else ""
            return reply
        except asyncio.CancelledError:
            code = grpc.StatusCode.CANCELLED
            raise
        except Exception as exc:
            # the status only; grpc_status (which logs unexpected errors) runs once, where the
            # error is turned into the reply
            code = GRPC_CODES[error_code(exc)]
            raise
        finally:
            inflight.dec()
            self._running -= 1
            self._inference -= counted
            if not self._running and not self._lifecycle.admitting:
                self._drained.set()
            elapsed = time.perf_counter() - start
            label = model if not model or self._control.is_known(model) else UNKNOWN_MODEL
            self._metrics.request_duration.labels(label, version, method, code.name).observe(
                elapsed)
            if self._access == "all" or (self._access == "errors"
                                         and code != grpc.StatusCode.OK and self._may_log()):
                access_log.info("%s model=%s version=%s code=%s duration_ms=%.2f%s", method,
                                log_field(model), version or "-", code.name, elapsed * 1000,
                                self._suppressed_note())

    def _may_log(self) -> bool:
        """Token bucket of the "errors" access log: at most ACCESS_LOG_LINES_PER_S lines a
        second, so that a flood of refused requests cannot flood the log (or its CPU)."""
        now = time.monotonic()
        self._log_budget = min(float(ACCESS_LOG_LINES_PER_S), self._log_budget
                               + (now - self._log_refilled) * ACCESS_LOG_LINES_PER_S)
        self._log_refilled = now
        if self._log_budget < 1:
            self._log_suppressed += 1
            return False
        self._log_budget -= 1
        return True

    def _suppressed_note(self) -> str:
        if not self._log_suppressed:
            return ""
        note = f" (+{self._log_suppressed} failed requests not logged: rate limit)"
        self._log_suppressed = 0
        return note

    async def handle(self, method: str, model: str, context: grpc.aio.ServicerContext,
                     work: Callable[[], Awaitable[tuple[T, int]]], client_id: str = "") -> T:
        """``run`` for a unary RPC: an error becomes the call's status (never a traceback).
        The request id is ``client_id`` (the request's own field), else the call's
        ``x-request-id`` metadata, else a new one."""
        try:
            return await self.run(method, model, work,
                                  client_id or metadata_request_id(context))
        except Exception as exc:  # noqa: BLE001 - mapped to a status right here
            code, message = grpc_status(exc)
        await context.abort(code, message)
        raise AssertionError("unreachable: context.abort raises")


async def answer_stream(requests: AsyncIterator[Req],
                        answer: Callable[[Req], Awaitable[T]]) -> AsyncIterator[T]:
    """Answer each request of a bidirectional stream as soon as it is done (so they batch
    together), in completion order; ``answer`` turns its own errors into a reply. Ends when the
    client has half-closed and every answer was sent."""
    replies: asyncio.Queue[T | None] = asyncio.Queue()
    tasks: set[asyncio.Task[None]] = set()

    async def one(request: Req) -> None:
        await replies.put(await answer(request))

    async def read() -> None:
        try:
            async for request in requests:
                task = asyncio.create_task(one(request))
                tasks.add(task)
                task.add_done_callback(tasks.discard)
            await asyncio.gather(*list(tasks))
        finally:
            await replies.put(None)

    reader = asyncio.create_task(read())
    try:
        while (reply := await replies.get()) is not None:
            yield reply
        await reader  # surfaces a failure of the request stream itself
    finally:
        reader.cancel()
        for task in list(tasks):
            task.cancel()


class _Undecodable:
    """What a request body that is not valid protobuf deserializes to (see ``add_servicer``)."""

    __slots__ = ("error",)

    def __init__(self, error: str) -> None:
        self.error = error


def add_servicer(add_to_server: Callable[[object, object], None], servicer: object,
                 server: grpc.aio.Server) -> None:
    """``add_XServicer_to_server(servicer, server)`` (generated code), except that a request
    body which is not valid protobuf is answered INVALID_ARGUMENT naming the message type,
    rather than gRPC's UNKNOWN "Unexpected <class ...DecodeError>". No interceptor: the cost is
    one try per deserialization and one isinstance per call."""

    class Capture:
        def add_generic_rpc_handlers(self, handlers: object) -> None:
            pass  # the same handlers arrive below, by name

        def add_registered_method_handlers(self, service: str,
                                           handlers: dict[str, grpc.RpcMethodHandler]) -> None:
            wrapped = {name: _strict(service, name, h) for name, h in handlers.items()}
            server.add_generic_rpc_handlers(
                (grpc.method_handlers_generic_handler(service, wrapped),))
            server.add_registered_method_handlers(service, wrapped)

    add_to_server(servicer, Capture())


def _strict(service: str, name: str, handler: grpc.RpcMethodHandler) -> grpc.RpcMethodHandler:
    parse = handler.request_deserializer
    message = f"the request body of {service}/{name} is not a valid protobuf message"

    def deserialize(data: bytes) -> object:
        try:
            return parse(data)
        except Exception as exc:  # noqa: BLE001 - DecodeError and friends
            return _Undecodable(f"{message} ({type(exc).__name__}); send a serialized "
                                "request of the type in its .proto (use generated stubs)")

    async def refuse(context: grpc.aio.ServicerContext, request: object) -> None:
        await context.abort(grpc.StatusCode.INVALID_ARGUMENT, request.error)  # type: ignore[attr-defined]

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
