"""What every RPC handler shares: deadline, in-flight gauge, request histogram, error mapping,
and the bidirectional-stream pattern (many requests in flight on one stream)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import TypeVar

import grpc

from ..errors import VisionServeError, grpc_status
from ..metrics import UNKNOWN_MODEL, Metrics
from ..registry import ModelRegistry

T = TypeVar("T")
Req = TypeVar("Req")


def deadline_of(context: grpc.aio.ServicerContext) -> float | None:
    """The client's deadline as a time.monotonic() instant, or None when it set none."""
    remaining = context.time_remaining()
    return None if remaining is None else time.monotonic() + remaining


class CallHandler:
    def __init__(self, registry: ModelRegistry, metrics: Metrics) -> None:
        self._registry = registry
        self._metrics = metrics

    async def run(self, method: str, model: str,
                  work: Callable[[], Awaitable[tuple[T, int]]]) -> T:
        """Run ``work`` (which returns the reply and the version that answered) and record its
        outcome; exceptions propagate unchanged."""
        start = time.perf_counter()
        inflight = self._metrics.inflight.labels(method)
        inflight.inc()
        version = ""
        code = grpc.StatusCode.OK
        try:
            reply, answered = await work()
            version = str(answered) if answered else ""
            return reply
        except asyncio.CancelledError:
            code = grpc.StatusCode.CANCELLED
            raise
        except Exception as exc:
            # the status only; grpc_status (which logs unexpected errors) runs once, where the
            # error is turned into the reply
            code = exc.code if isinstance(exc, VisionServeError) else grpc.StatusCode.INTERNAL
            raise
        finally:
            inflight.dec()
            label = model if not model or self._registry.is_known(model) else UNKNOWN_MODEL
            self._metrics.request_duration.labels(label, version, method, code.name).observe(
                time.perf_counter() - start)

    async def handle(self, method: str, model: str, context: grpc.aio.ServicerContext,
                     work: Callable[[], Awaitable[tuple[T, int]]]) -> T:
        """``run`` for a unary RPC: an error becomes the call's status (never a traceback)."""
        try:
            return await self.run(method, model, work)
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
