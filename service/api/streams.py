"""Stream fan-out: many requests in flight on one bidirectional stream, answered as each ends."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import TypeVar

T = TypeVar("T")
Req = TypeVar("Req")


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
