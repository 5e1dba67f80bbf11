"""Hostile HTTP clients on raw sockets (the attacks of ``bench-attacks --http`` and of
tests/test_http_hardening.py): connections held open after part of a request, exchanges of
exact bytes, and a probe that opens a fresh connection the way a kubelet or Prometheus does."""

from __future__ import annotations

import json
import re
import socket
import ssl
import time
from collections.abc import Iterator
from contextlib import contextmanager


def connect(port: int, context: ssl.SSLContext | None = None,
            timeout: float = 30.0) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", port), timeout=timeout)
    if context is not None:
        sock = context.wrap_socket(sock, server_hostname="localhost")
    return sock


def read_reply(sock: socket.socket, timeout: float = 30.0) -> bytes:
    """What the server sends until it closes the connection or ``timeout`` passes (a hang
    guard: the reply so far is returned)."""
    sock.settimeout(timeout)
    reply = b""
    try:
        while chunk := sock.recv(65536):
            reply += chunk
    except (TimeoutError, ConnectionResetError, ssl.SSLError, OSError):
        pass
    return reply


def exchange(port: int, data: bytes, timeout: float = 30.0,
             context: ssl.SSLContext | None = None) -> bytes:
    """Send ``data`` on a fresh connection; everything the server answers until it closes
    (send ``Connection: close`` last, or the connection stays open until ``timeout``)."""
    with connect(port, context, timeout) as sock:
        sock.sendall(data)
        return read_reply(sock, timeout)


def statuses(reply: bytes) -> list[int]:
    """The status codes of the HTTP/1.x replies in ``reply``, in order (a reply's status line
    follows the previous reply's body directly)."""
    return [int(code) for code in re.findall(rb"HTTP/1\.[01] (\d{3}) ", reply)]


def error_message(reply: bytes) -> str:
    body = reply.partition(b"\r\n\r\n")[2]
    try:
        return str(json.loads(body)["error"])
    except (ValueError, KeyError, TypeError):
        return body.decode(errors="replace")


def request(method: str, path: str, body: bytes = b"", headers: dict[str, str] | None = None,
            version: str = "HTTP/1.1") -> bytes:
    fields = {"Host": "127.0.0.1", **({"Content-Length": str(len(body))} if body else {}),
              **(headers or {})}
    head = f"{method} {path} {version}\r\n" + "".join(f"{k}: {v}\r\n" for k, v in
                                                        fields.items()) + "\r\n"
    return head.encode("latin-1") + body


def probe(port: int, path: str = "/v2/health/ready", timeout: float = 30.0,
          context: ssl.SSLContext | None = None) -> tuple[int, float]:
    """A GET on a fresh connection (as a kubelet or Prometheus sends it): its status (0: no
    answer) and seconds to the answer."""
    start = time.monotonic()
    found = statuses(exchange(port, request("GET", path, headers={"Connection": "close"}),
                              timeout, context))
    return (found[0] if found else 0), time.monotonic() - start


@contextmanager
def held(port: int, count: int, prefix: bytes, context: ssl.SSLContext | None = None
         ) -> Iterator[list[socket.socket]]:
    """``count`` connections that each send ``prefix`` and then nothing (closed at the end);
    a connection the server refuses at once is kept as it is (its reply is read later)."""
    socks: list[socket.socket] = []
    try:
        for _ in range(count):
            sock = connect(port, context)
            try:
                if prefix:
                    sock.sendall(prefix)
            except OSError:
                pass
            socks.append(sock)
        yield socks
    finally:
        for sock in socks:
            sock.close()


def replies(socks: list[socket.socket], timeout: float = 30.0) -> list[bytes]:
    """What each held connection got before the server closed it (``timeout`` each at most)."""
    return [read_reply(sock, timeout) for sock in socks]
