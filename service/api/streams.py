"""Stream fan-out: many requests in flight on one bidirectional stream, answered as each ends.

At most ``max_in_flight`` messages of one stream are being answered or waiting to be sent at
once: at the bound the server stops reading the stream, and HTTP/2 flow control then holds the
client back. A client that sends and never reads costs at most that many replies of memory."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import TypeVar

T = TypeVar("T")
Req = TypeVar("Req")


async def answer_stream(requests: AsyncIterator[Req], answer: Callable[[Req], Awaitable[T]],
                        max_in_flight: int) -> AsyncIterator[T]:
    """Answer each request of a bidirectional stream as soon as it is done (so they batch
    together), in completion order; ``answer`` turns its own errors into a reply. Ends when the
    client has half-closed and every answer was sent."""
    replies: asyncio.Queue[T | None] = asyncio.Queue()
    tasks: set[asyncio.Task[None]] = set()
    slots = asyncio.Semaphore(max_in_flight)  # taken before a read, freed once its reply is sent

    async def one(request: Req) -> None:
        await replies.put(await answer(request))

    async def read() -> None:
        try:
            iterator = aiter(requests)
            while True:
                await slots.acquire()
                try:
                    request = await anext(iterator)
                except StopAsyncIteration:
                    break
                task = asyncio.create_task(one(request))
                tasks.add(task)
                task.add_done_callback(tasks.discard)
            await asyncio.gather(*list(tasks))
        finally:
            await replies.put(None)

    reader = asyncio.create_task(read())
    try:
        while (reply := await replies.get()) is not None:
            yield reply  # resumes once gRPC has taken the reply (flow control permitting)
            slots.release()
        await reader  # surfaces a failure of the request stream itself
    finally:
        reader.cancel()
        for task in list(tasks):
            task.cancel()
