"""``GET /metrics`` (Prometheus text) over HTTP, served by aiohttp on the server's event loop
(``http_listener``: bounded connections and heads, no thread per connection)."""

from __future__ import annotations

import asyncio

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest

from .http_listener import HttpListener

MAX_CONNECTIONS = 64  # open at once; Prometheus needs one per scraper


class MetricsHttp:
    def __init__(self, registry: CollectorRegistry, host: str, port: int) -> None:
        self._registry = registry
        app = web.Application()
        app.router.add_get("/metrics", self._metrics)
        self._listener = HttpListener(app, host, port, MAX_CONNECTIONS, bodies=False)

    async def start(self) -> int:
        """Listen; returns the port bound (``port`` 0 picks a free one). Raises OSError."""
        return await self._listener.start()

    async def close(self) -> None:
        await self._listener.close()

    async def _metrics(self, request: web.Request) -> web.Response:
        body = await asyncio.get_running_loop().run_in_executor(None, generate_latest,
                                                                self._registry)
        response = web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})
        if "gzip" in request.headers.get("Accept-Encoding", ""):
            response.enable_compression()
        return response
