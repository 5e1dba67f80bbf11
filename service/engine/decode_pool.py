"""The decode pool: the threads that turn encoded images into pixels, with bounded work.

Decoding costs CPU in proportion to an image's pixels (about 115 MP/s per core here for a
JPEG: a 40 MP image is a third of a second), and a request's images are each within the
per-image limits however many of them there are. So, counted in decoded pixels:

- **per request** (``--max-request-pixels``): every image's header is read first (in the pool:
  headers are cheap but untrusted) and a request whose images add up to more is refused
  RESOURCE_EXHAUSTED before any of them decodes;
- **server-wide** (``--max-decode-queue-pixels``): the pixels admitted for decoding and not yet
  decoded; a request that would take the queue over it is refused RESOURCE_EXHAUSTED at once
  (retry with backoff) instead of waiting behind an unbounded queue.

A request decodes on at most as many threads as the pool has, taking its images in order; before
each image the worker checks the request's deadline and whether the request was abandoned (its
client cancelled, or another of its images failed), so a dead request stops costing CPU after
the image in progress.
"""

from __future__ import annotations

import asyncio
import contextvars
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import TypeVar

import numpy as np
from prometheus_client import Gauge

from ..errors import DeadlineExceeded, LimitExceeded, QueueFull
from ..limits import ServerLimits
from .preprocess import OpenedImage, Preprocessor

T = TypeVar("T")
R = TypeVar("R")


class DecodePool:
    def __init__(self, threads: int, limits: ServerLimits, queued_gauge: Gauge | None = None
                 ) -> None:
        self._threads = threads
        self._executor = ThreadPoolExecutor(max_workers=threads, thread_name_prefix="decode")
        self._max_request = limits.max_request_pixels
        self._max_queued = limits.max_decode_queue_pixels
        self._queued = 0  # pixels admitted and not yet decoded (changed on the loop only)
        self._gauge = queued_gauge

    async def decode(self, prep: Preprocessor, images: Sequence[tuple[int, bytes]],
                     where: str, deadline: float | None) -> list[np.ndarray]:
        """``(index in the request, encoded bytes)`` → each image's uint8 CHW pixels, in order."""
        chunks = [images[i::self._threads] for i in range(min(self._threads, len(images)))]
        opened = sorted((o for chunk in await self._map(
            lambda chunk: [prep.open(i, data) for i, data in chunk], chunks, where, deadline)
            for o in chunk), key=lambda o: o.index)
        pixels = sum(o.pixels for o in opened)
        if pixels > self._max_request:
            raise LimitExceeded(
                f"{where}: the request's {len(opened)} images decode to {pixels} pixels, over "
                f"the per-request budget of {self._max_request} (the server's "
                "--max-request-pixels); split the request or downscale its images")
        if self._queued + pixels > self._max_queued:
            raise QueueFull(
                f"{where}: the server is decoding {self._queued} pixels of other requests' "
                f"images, and this request's {pixels} would exceed its decode queue of "
                f"{self._max_queued} (--max-decode-queue-pixels); retry with backoff, or add "
                "replicas")
        left = [pixels]

        def decoded(image: OpenedImage) -> None:
            left[0] -= image.pixels
            self._add(-image.pixels)

        self._add(pixels)
        try:
            return await self._map(prep.decode, opened, where, deadline, decoded)
        finally:
            self._add(-left[0])  # the images never decoded (the request failed or ended)

    def shutdown(self) -> None:
        self._executor.shutdown(wait=True, cancel_futures=True)

    def _add(self, pixels: int) -> None:
        self._queued += pixels
        if self._gauge is not None:
            self._gauge.set(self._queued)

    async def _map(self, fn: Callable[[T], R], items: Sequence[T], where: str,
                   deadline: float | None, done: Callable[[T], None] | None = None) -> list[R]:
        """``fn`` over ``items`` on at most ``threads`` workers; the first failure stops the
        others before their next item and is raised."""
        loop = asyncio.get_running_loop()
        results: list[R | None] = [None] * len(items)
        next_item, failure = 0, None

        async def worker() -> None:
            nonlocal next_item, failure
            while failure is None and next_item < len(items):
                k, next_item = next_item, next_item + 1
                if deadline is not None and time.monotonic() >= deadline:
                    failure = DeadlineExceeded(
                        f"{where}: the request's deadline passed while its images were being "
                        f"decoded ({k} of {len(items)} started); give it a longer deadline, or "
                        "send fewer or smaller images")
                    return
                try:
                    # in the request's context: a log line from the decoder carries its id
                    results[k] = await loop.run_in_executor(
                        self._executor, contextvars.copy_context().run, fn, items[k])
                except Exception as exc:  # noqa: BLE001 - raised below, once
                    failure = failure or exc
                    return
                if done is not None:
                    done(items[k])

        await asyncio.gather(*(worker() for _ in range(min(self._threads, len(items)))))
        if failure is not None:
            try:
                raise failure
            finally:  # the traceback holds this frame: no cycle keeping the images alive
                failure = None
        return results  # type: ignore[return-value]  # every slot filled
