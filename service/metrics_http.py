"""``GET /metrics`` (Prometheus text) over HTTP, served by aiohttp on the server's event loop.

prometheus-client's own server is a threading WSGI server: one thread per connection, no timeout,
so held connections took the process from 13 to 452 threads. Here a connection costs a socket
and a little memory, never a thread: idle keep-alive connections are closed after
``KEEPALIVE_S``, a connection that has not sent a complete request head within ``HEAD_TIMEOUT_S``
is closed, request lines and headers are bounded, and at most ``MAX_CONNECTIONS`` are open at
once: at the bound a new connection replaces the oldest one that has not sent a request head yet
(so held connections cannot lock a scraper out), or is closed when every open one is busy. The
same library will serve the planned HTTP API.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest

log = logging.getLogger(__name__)

KEEPALIVE_S = 5.0  # an idle keep-alive connection is closed after this
HEAD_TIMEOUT_S = 10.0  # a connection must have sent a complete request head by then
MAX_CONNECTIONS = 64  # open at once; Prometheus needs one per scraper
MAX_HEAD_BYTES = 8190  # request line and each header field


class MetricsHttp:
    def __init__(self, registry: CollectorRegistry, host: str, port: int) -> None:
        self._registry = registry
        self._host, self._port = host, port
        app = web.Application(middlewares=[self._mark])
        app.router.add_get("/metrics", self._metrics)
        self._runner = web.AppRunner(app, access_log=None, keepalive_timeout=KEEPALIVE_S,
                                     max_line_size=MAX_HEAD_BYTES, max_field_size=MAX_HEAD_BYTES,
                                     handle_signals=False)
        self._server: asyncio.Server | None = None
        # connections now, oldest first
        self._open: dict[asyncio.BaseProtocol, asyncio.BaseTransport] = {}
        self._heard: set[asyncio.BaseProtocol] = set()  # those that sent a whole request head

    async def start(self) -> int:
        """Listen; returns the port bound (``port`` 0 picks a free one). Raises OSError."""
        await self._runner.setup()
        factory = self._runner.server
        assert factory is not None
        self._server = await asyncio.get_running_loop().create_server(
            lambda: _Bounded(factory(), self), self._host, self._port, reuse_address=True)
        return int(self._server.sockets[0].getsockname()[1])

    def admit(self, handler: asyncio.BaseProtocol, transport: asyncio.BaseTransport) -> bool:
        """A new connection: at the bound, it replaces the oldest silent one, or is refused."""
        if len(self._open) >= MAX_CONNECTIONS:
            silent = next((h for h in self._open if h not in self._heard), None)
            if silent is None:  # every open connection is busy with a request
                return False
            self._open.pop(silent).close()
        self._open[handler] = transport
        asyncio.get_running_loop().call_later(HEAD_TIMEOUT_S, self._close_if_silent, handler,
                                              transport)
        return True

    def gone(self, handler: asyncio.BaseProtocol) -> None:
        self._open.pop(handler, None)
        self._heard.discard(handler)

    def _close_if_silent(self, handler: asyncio.BaseProtocol,
                         transport: asyncio.BaseTransport) -> None:
        """A connection that has not completed one request head by now (slowloris) is closed."""
        if handler in self._open and handler not in self._heard:
            transport.close()

    @web.middleware
    async def _mark(self, request: web.Request,
                    handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
                    ) -> web.StreamResponse:
        self._heard.add(request.protocol)  # type: ignore[arg-type]
        return await handler(request)

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
        await self._runner.cleanup()

    async def _metrics(self, request: web.Request) -> web.Response:
        body = await asyncio.get_running_loop().run_in_executor(None, generate_latest,
                                                                self._registry)
        response = web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})
        if "gzip" in request.headers.get("Accept-Encoding", ""):
            response.enable_compression()
        return response


class _Bounded(asyncio.Protocol):
    """aiohttp's connection handler, admitted (or not) by the ``MetricsHttp`` that owns it."""

    def __init__(self, inner: asyncio.Protocol, owner: MetricsHttp) -> None:
        self._inner, self._owner = inner, owner
        self._admitted = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._admitted = self._owner.admit(self._inner, transport)
        if not self._admitted:
            transport.close()
            return
        self._inner.connection_made(transport)

    def data_received(self, data: bytes) -> None:
        if self._admitted:
            self._inner.data_received(data)

    def eof_received(self) -> bool | None:
        return self._inner.eof_received() if self._admitted else None

    def connection_lost(self, exc: Exception | None) -> None:
        if self._admitted:
            self._owner.gone(self._inner)
            self._inner.connection_lost(exc)

    def pause_writing(self) -> None:
        self._inner.pause_writing()

    def resume_writing(self) -> None:
        self._inner.resume_writing()
