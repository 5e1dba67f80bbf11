"""An aiohttp application on the server's event loop, with bounded connections: the one HTTP
listener of ``/metrics`` (``metrics_http``) and of the KServe v2 REST API (``api/rest``).

aiohttp because it is maintained, asyncio-native (the gRPC server's loop: no thread per
connection, the same batchers) and already the metrics endpoint's library; prometheus-client's
own server is a threading WSGI server: one thread per connection, no timeout, so held
connections took the process from 13 to 452 threads. Here a connection costs a socket and a
little memory, never a thread: idle keep-alive connections are closed after ``KEEPALIVE_S``, a
connection that has not sent a complete request head within ``HEAD_TIMEOUT_S`` is closed,
request lines and headers are bounded, and at most ``max_connections`` are open at once: at the
bound a new connection replaces the oldest one that has not sent a request head yet (so held
connections cannot lock a client out), or is closed when every open one is busy.
"""

from __future__ import annotations

import asyncio
import logging
import ssl
from collections.abc import Awaitable, Callable

from aiohttp import web

log = logging.getLogger(__name__)

KEEPALIVE_S = 5.0  # an idle keep-alive connection is closed after this
HEAD_TIMEOUT_S = 10.0  # a connection must have sent a complete request head by then
MAX_HEAD_BYTES = 8190  # request line and each header field


class HttpListener:
    def __init__(self, app: web.Application, host: str, port: int, max_connections: int,
                 ssl_context: ssl.SSLContext | None = None, **server_options: object) -> None:
        self._host, self._port = host, port
        self._max_connections = max_connections
        self._ssl = ssl_context
        app.middlewares.insert(0, self._mark)
        # shutdown: the server has drained its requests before it closes this; what is still
        # open then gets a second, not aiohttp's default minute
        self._runner = web.AppRunner(app, access_log=None, keepalive_timeout=KEEPALIVE_S,
                                     max_line_size=MAX_HEAD_BYTES, max_field_size=MAX_HEAD_BYTES,
                                     handle_signals=False, shutdown_timeout=1.0,
                                     **server_options)
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
            lambda: _Bounded(factory(), self), self._host, self._port, reuse_address=True,
            ssl=self._ssl, ssl_handshake_timeout=HEAD_TIMEOUT_S if self._ssl else None)
        return int(self._server.sockets[0].getsockname()[1])

    def admit(self, handler: asyncio.BaseProtocol, transport: asyncio.BaseTransport) -> bool:
        """A new connection: at the bound, it replaces the oldest silent one, or is refused."""
        if len(self._open) >= self._max_connections:
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

    async def stop_listening(self) -> None:
        """No new connections; open ones go on (shutdown: accepted requests finish)."""
        if self._server is not None:
            self._server.close()

    async def close(self) -> None:
        await self.stop_listening()
        await self._runner.cleanup()


class _Bounded(asyncio.Protocol):
    """aiohttp's connection handler, admitted (or not) by the ``HttpListener`` that owns it."""

    def __init__(self, inner: asyncio.Protocol, owner: HttpListener) -> None:
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
