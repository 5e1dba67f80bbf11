"""What every RPC handler shares: request id, deadline, admission, in-flight gauge, request
histogram, access log and error mapping. Admission (``admission``), the access log
(``access_log``), stream fan-out (``streams``) and strict decoding (``strict``) are modules of
their own."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from typing import TypeVar

import grpc

from ..errors import ShuttingDown, error_code
from ..logs import REQUEST_ID, request_id
from ..metrics import UNKNOWN_MODEL, Metrics
from ..models.control import ModelControl
from .access_log import AccessLog
from .admission import Admission
from .grpc.orca import LoadReports
from .grpc.status import GRPC_CODES, grpc_status

T = TypeVar("T")


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
    """Every RPC's accounting: request id, admission, in-flight gauge, request histogram (by
    model, version, method and status code), access log, and the error → status mapping."""

    def __init__(self, control: ModelControl, metrics: Metrics, admission: Admission,
                 access_log: AccessLog, load_reports: LoadReports | None = None) -> None:
        self._control = control
        self._metrics = metrics
        self._admission = admission
        self._access_log = access_log
        self._load_reports = load_reports  # --orca-load-reports: on every unary gRPC reply

    async def run(self, method: str, model: str,
                  work: Callable[[], Awaitable[tuple[T, int]]], client_id: str = "",
                  upload: Callable[[], Awaitable[None]] | None = None) -> T:
        """Run ``work`` (which returns the reply and the version that answered) under a request
        id (``client_id`` or a new one) and record its outcome; exceptions propagate unchanged.
        ``upload`` (an HTTP body's arrival) runs first, before the call counts in flight or
        holds an inference slot: a slow upload holds its connection, never a slot; its refusal
        is counted and logged like any failed call."""
        start = time.perf_counter()
        REQUEST_ID.set(request_id(client_id))
        inflight = None
        version = ""
        code = grpc.StatusCode.OK
        try:
            if upload is not None:
                await upload()
            inflight = self._metrics.inflight.labels(method)
            inflight.inc()
            with self._admission.admitted(method, model):
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
            if inflight is not None:
                inflight.dec()
            elapsed = time.perf_counter() - start
            label = model if not model or self._control.is_known(model) else UNKNOWN_MODEL
            self._metrics.request_duration.labels(label, version, method, code.name).observe(
                elapsed)
            self._access_log.record(method, model, version, code.name, elapsed)

    async def handle(self, method: str, model: str, context: grpc.aio.ServicerContext,
                     work: Callable[[], Awaitable[tuple[T, int]]], client_id: str = "") -> T:
        """``run`` for a unary RPC: an error becomes the call's status (never a traceback).
        The request id is ``client_id`` (the request's own field), else the call's
        ``x-request-id`` metadata, else a new one."""
        if self._load_reports is not None:
            context.set_trailing_metadata(self._load_reports.metadata())
        try:
            return await self.run(method, model, work,
                                  client_id or metadata_request_id(context))
        except Exception as exc:  # noqa: BLE001 - mapped to a status right here
            code, message = grpc_status(exc)
            if isinstance(exc, ShuttingDown):
                await self._admission.hold_refusal(context.time_remaining())
        # set, not abort: abort's exception would hold this call's frames (and so its request,
        # up to 64 MiB) in a reference cycle until the garbage collector happens to run
        context.set_code(code)
        context.set_details(message)
        return None  # type: ignore[return-value]  # gRPC sends no reply for a failed status
