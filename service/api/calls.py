"""What every RPC handler shares: deadline, in-flight gauge, request histogram, error mapping."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from typing import TypeVar

import grpc

from ..errors import grpc_status
from ..metrics import UNKNOWN_MODEL, Metrics
from ..registry import ModelRegistry

T = TypeVar("T")


def deadline_of(context: grpc.aio.ServicerContext) -> float | None:
    """The client's deadline as a time.monotonic() instant, or None when it set none."""
    remaining = context.time_remaining()
    return None if remaining is None else time.monotonic() + remaining


class CallHandler:
    def __init__(self, registry: ModelRegistry, metrics: Metrics) -> None:
        self._registry = registry
        self._metrics = metrics

    async def handle(self, method: str, model: str, context: grpc.aio.ServicerContext,
                     work: Callable[[], Awaitable[tuple[T, int]]]) -> T:
        """Run ``work`` (which returns the reply and the version that answered), record the
        outcome, and turn any error into its gRPC status. Never lets a traceback reach the
        client."""
        start = time.perf_counter()
        inflight = self._metrics.inflight.labels(method)
        inflight.inc()
        version = ""
        code = grpc.StatusCode.OK
        message = ""
        try:
            reply, answered = await work()
            version = str(answered) if answered else ""
            return reply
        except asyncio.CancelledError:
            code = grpc.StatusCode.CANCELLED
            raise
        except Exception as exc:  # noqa: BLE001 - mapped to a status right below
            code, message = grpc_status(exc)
        finally:
            inflight.dec()
            label = model if not model or self._registry.is_known(model) else UNKNOWN_MODEL
            self._metrics.request_duration.labels(label, version, method, code.name).observe(
                time.perf_counter() - start)
        await context.abort(code, message)
        raise AssertionError("unreachable: context.abort raises")
