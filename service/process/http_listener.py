"""An aiohttp application on the server's event loop, with bounded connections: the one HTTP
listener of ``/metrics`` (``metrics_http``) and of the KServe v2 REST API (``api/http/rest``).

aiohttp because it is maintained, asyncio-native (the gRPC server's loop: no thread per
connection, the same batchers) and already the metrics endpoint's library; prometheus-client's
own server is a threading WSGI server: one thread per connection, no timeout, so held
connections took the process from 13 to 452 threads.

Every byte a client sends passes ``http_framing`` first (heads whole, bounded and checked, bodies
framed), so this module knows for each connection whether the server or the client has the next
move. A client that has it is held to time limits; the server's own work is never cut:
- between requests, a connection idle for ``KEEPALIVE_S`` is closed;
- a request head must arrive whole within ``HEAD_TIMEOUT_S`` of its first byte (a TLS
  handshake too), a body with no gap over ``READ_IDLE_S`` and at an average of at least
  ``MIN_BODY_RATE`` after its first ``READ_IDLE_S``: else 408 and the connection is closed;
- at most ``max_connections`` are open at once, counted from accept (TLS handshakes included):
  at the bound, a new connection evicts the one that has made the least recent progress among
  those the server is not answering, so stalled clients can never lock out a health probe or a
  scrape; only when the server is answering on every one is a new connection refused.
"""

from __future__ import annotations

import asyncio
import json
import logging
import ssl
import time
from collections.abc import Awaitable, Callable

from aiohttp import web
from aiohttp.http_exceptions import HttpProcessingError

from ..logs import rate_limit
from .http_framing import REASONS, FramingError, RequestFraming

log = logging.getLogger(__name__)

KEEPALIVE_S = 5.0  # an idle keep-alive connection is closed after this
HEAD_TIMEOUT_S = 10.0  # a request head (or TLS handshake) must be complete by then
READ_IDLE_S = 5.0  # a request (head or body) with no byte for this long is cut off
MIN_BODY_RATE = 64 * 1024  # bytes a second a body averages, after its first READ_IDLE_S
MAX_FIELD_BYTES = 8190  # aiohttp's bound on the request line and on each header field
SWEEP_S = 0.5  # how often the timers are checked
LINGER_S = 1.0  # after a refusal, the client's bytes are read (and dropped) this long
LIBRARY_LOG_LINES_PER_S = 5  # aiohttp's and asyncio's own error lines, under attack


class HttpListener:
    def __init__(self, app: web.Application, host: str, port: int, max_connections: int,
                 ssl_context: ssl.SSLContext | None = None, bodies: bool = True,
                 **server_options: object) -> None:
        """``bodies`` False: requests that declare a body are refused (the metrics port)."""
        self._host, self._port = host, port
        self._max_connections = max_connections
        self.ssl = ssl_context
        self.bodies = bodies
        app.middlewares.insert(0, self._track)
        # shutdown: the server has drained its requests before it closes this; what is still
        # open then gets a second, not aiohttp's default minute
        self._runner = web.AppRunner(app, access_log=None, keepalive_timeout=KEEPALIVE_S,
                                     max_line_size=MAX_FIELD_BYTES,
                                     max_field_size=MAX_FIELD_BYTES, handle_signals=False,
                                     shutdown_timeout=1.0, **server_options)
        self._server: asyncio.Server | None = None
        self._open: dict[_Connection, None] = {}  # oldest first
        self._by_handler: dict[asyncio.BaseProtocol, _Connection] = {}
        self._sweeper: asyncio.TimerHandle | None = None
        self.evicted = 0  # connections closed at the bound, to admit a new one
        rate_limit(("aiohttp.server", "aiohttp.web", "aiohttp.internal", "asyncio"),
                   LIBRARY_LOG_LINES_PER_S)
        for name in ("aiohttp.server", "asyncio"):
            if not any(isinstance(f, _ClientErrorsBrief) for f in logging.getLogger(name).filters):
                logging.getLogger(name).addFilter(_ClientErrorsBrief())

    async def start(self) -> int:
        """Listen; returns the port bound (``port`` 0 picks a free one). Raises OSError."""
        await self._runner.setup()
        loop = asyncio.get_running_loop()
        self._server = await loop.create_server(lambda: _Connection(self), self._host,
                                                self._port, reuse_address=True)
        self._sweeper = loop.call_later(SWEEP_S, self._sweep)
        return int(self._server.sockets[0].getsockname()[1])

    def handler(self) -> asyncio.Protocol:
        """A new aiohttp connection handler."""
        factory = self._runner.server
        assert factory is not None
        return factory()

    def admit(self, connection: _Connection) -> bool:
        """A new connection: at the bound, it evicts the one with the least recent progress
        among those waiting on their client, or is refused."""
        if len(self._open) >= self._max_connections:
            waiting = [c for c in self._open if not c.answering]
            if not waiting:  # the server is answering on every open connection
                return False
            victim = min(waiting, key=lambda c: c.progress)
            victim.close()
            self.gone(victim)
            self.evicted += 1
        self._open[connection] = None
        return True

    def attached(self, connection: _Connection, handler: asyncio.BaseProtocol) -> None:
        self._by_handler[handler] = connection

    def gone(self, connection: _Connection) -> None:
        self._open.pop(connection, None)
        if connection.inner is not None:
            self._by_handler.pop(connection.inner, None)

    def _sweep(self) -> None:
        now = time.monotonic()
        for connection in list(self._open):
            connection.check_time(now)
        self._sweeper = asyncio.get_running_loop().call_later(SWEEP_S, self._sweep)

    @web.middleware
    async def _track(self, request: web.Request,
                     handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
                     ) -> web.StreamResponse:
        """While a request is in the application, its connection is busy: once its body has
        arrived, the server (not the client) has the next move."""
        connection = self._by_handler.get(request.protocol)  # type: ignore[arg-type]
        if connection is None:
            return await handler(request)
        connection.busy += 1
        try:
            response = await handler(request)
        finally:
            connection.busy -= 1
            connection.progress = time.monotonic()
        if connection.refusal is not None:  # a pipelined request was refused: close after this
            response.force_close()
        return response

    async def stop_listening(self) -> None:
        """No new connections; open ones go on (shutdown: accepted requests finish)."""
        if self._server is not None:
            self._server.close()

    async def close(self) -> None:
        await self.stop_listening()
        if self._sweeper is not None:
            self._sweeper.cancel()
        await self._runner.cleanup()


class _ClientErrorsBrief(logging.Filter):
    """A client's malformed request or dropped connection, as aiohttp or asyncio log it: one
    line, without a traceback (it is not a server error)."""

    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info[1] if record.exc_info else None
        if isinstance(exc, HttpProcessingError | ConnectionError | ssl.SSLError):
            record.msg, record.args = f"{record.getMessage()}: {exc!r}"[:300], ()
            record.exc_info, record.exc_text = None, None
        return True


class _Connection(asyncio.Protocol):
    """One client connection: its framing, its progress, aiohttp's handler behind it."""

    def __init__(self, owner: HttpListener) -> None:
        self._owner = owner
        self.transport: asyncio.Transport | None = None
        self.inner: asyncio.Protocol | None = None  # aiohttp's handler, once TLS is up
        self._framing = RequestFraming(owner.bodies)
        self.progress = time.monotonic()  # the last byte received or answer sent
        self._since: float | None = None  # when the head or body now arriving began
        self._in_body = False  # at the last byte
        self.busy = 0  # requests of this connection inside the application
        self.refusal: FramingError | None = None
        self._closing = False
        self._early = bytearray()  # received between the TLS handshake and ``_attach``
        self._handshaking: asyncio.Task[None] | None = None  # held: a task is weakly referenced

    @property
    def answering(self) -> bool:
        """The server has the next move: a request is in the application, its body whole."""
        return self.busy > 0 and self._framing.waiting_for_head

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport
        if not self._owner.admit(self):
            self._closing = True
            transport.abort()
            return
        if self._owner.ssl is None:
            self._attach(transport)
        else:  # counted from accept: a handshake holds a place like any connection
            self._handshaking = asyncio.get_running_loop().create_task(
                self._handshake(self._owner.ssl))

    async def _handshake(self, context: ssl.SSLContext) -> None:
        assert self.transport is not None
        try:
            tls = await asyncio.get_running_loop().start_tls(
                self.transport, self, context, server_side=True,
                ssl_handshake_timeout=HEAD_TIMEOUT_S)
        except (OSError, ssl.SSLError, TimeoutError, ConnectionError, RuntimeError):
            self.close()
            self._owner.gone(self)
            return
        if self._closing or tls is None:
            return
        self.transport = tls
        self._attach(tls)

    def _attach(self, transport: asyncio.Transport) -> None:
        self.inner = self._owner.handler()
        self._owner.attached(self, self.inner)
        self.progress = time.monotonic()
        self.inner.connection_made(transport)
        early, self._early = bytes(self._early), bytearray()
        if early:
            self.data_received(early)

    def data_received(self, data: bytes) -> None:
        if self._closing:
            return
        if self.inner is None:  # TLS: the first bytes can arrive before start_tls returns (one
            self._early += data  # turn of the loop: a record or two)
            return
        now = self.progress = time.monotonic()
        try:
            passed = self._framing.feed(data)
        except FramingError as refusal:
            if refusal.passed:
                self.inner.data_received(refusal.passed)
            self._refuse(refusal)
            return
        framing = self._framing
        if framing.waiting_for_head:
            self._since = None
        elif self._since is None or framing.in_body != self._in_body:
            self._since = now
        self._in_body = framing.in_body
        if passed:
            self.inner.data_received(passed)

    def check_time(self, now: float) -> None:
        """The sweep: a client that has the next move and is late is cut off."""
        if self.inner is None or self._closing or self.answering:
            return
        framing, idle = self._framing, now - self.progress
        if framing.waiting_for_head:
            sending = self.transport is not None and self.transport.get_write_buffer_size()
            if idle > KEEPALIVE_S and not self.busy and not sending:  # (a reply being read
                self.close()  # slowly is not idle; at the bound it may be evicted)
            return
        since = self._since if self._since is not None else self.progress
        late = ""
        if framing.in_head and (now - since > HEAD_TIMEOUT_S or idle > READ_IDLE_S):
            late = f"the request head did not arrive within {HEAD_TIMEOUT_S:.0f} s; send it whole"
        elif framing.in_body and idle > READ_IDLE_S:
            late = (f"no byte of the request body arrived for {READ_IDLE_S:.0f} s; send the "
                    "body at once after the head")
        elif framing.in_body and now - since > READ_IDLE_S and \
                framing.body_bytes < MIN_BODY_RATE * (now - since - READ_IDLE_S):
            late = f"the request body arrives at under {MIN_BODY_RATE // 1024} KiB/s; send faster"
        elif not (framing.in_head or framing.in_body) and not self.busy:
            self.close()  # refused earlier, answered: nothing more to wait for
        if late:
            refusal = FramingError(408, late)
            refusal.in_body = framing.in_body
            self._refuse(refusal)

    def _refuse(self, refusal: FramingError) -> None:
        """Answer ``refusal`` and close, unless an earlier request's answer is still due: then
        that answer goes out first, and the connection closes after it."""
        self.refusal = refusal
        if self.transport is None or self._closing:
            return
        if not refusal.in_body and (self.busy or refusal.passed):
            return  # ``_track`` closes after the answer due
        body = json.dumps({"error": str(refusal)}).encode()
        head = (f"HTTP/1.1 {refusal.status} {REASONS[refusal.status]}\r\n"
                "Content-Type: application/json\r\n"
                f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n").encode()
        self._closing = True
        self.transport.write(head + body)
        if self.transport.can_write_eof():  # lingering close: the client reads the answer
            self.transport.write_eof()
            asyncio.get_running_loop().call_later(LINGER_S, self.transport.abort)
        else:
            self.transport.close()

    def close(self) -> None:
        self._closing = True
        if self.transport is not None:
            self.transport.abort()

    def eof_received(self) -> bool | None:
        return self.inner.eof_received() if self.inner is not None else None

    def connection_lost(self, exc: Exception | None) -> None:
        self._owner.gone(self)
        if self.inner is not None:
            self.inner.connection_lost(exc)

    def pause_writing(self) -> None:
        if self.inner is not None:
            self.inner.pause_writing()

    def resume_writing(self) -> None:
        if self.inner is not None:
            self.inner.resume_writing()
