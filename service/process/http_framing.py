"""HTTP/1.1 request framing, checked before aiohttp parses a byte (RFC 9112).

One ``RequestFraming`` per connection sees every byte the client sends and passes on what is
well framed: each request head whole (at most ``MAX_HEAD_BYTES`` for the request line and all
header fields together, not per field: many large heads cannot add up to hundreds of MB), then
its body as it arrives (``Content-Length`` bytes, or chunks whose framing and trailer are
checked as they come, so a malformed trailer is answered at once, not when a timer fires). So
it knows, for the listener's timers and eviction, whether a connection is between requests,
sending a head or sending a body; and every head is checked here, pipelined ones included:

- only HTTP/1.0 and HTTP/1.1 (505 otherwise, never a reply in the client's version);
- ``Transfer-Encoding`` in an HTTP/1.0 request, beside ``Content-Length``, or other than
  ``chunked``, and ``Content-Length`` that is not one number: 400 and the connection closed
  (request smuggling, RFC 9112 §6.1 and §6.3);
- an HTTP/1.1 request has exactly one valid ``Host`` (§3.2): 400 otherwise;
- a port that takes no request bodies (``/metrics``) refuses one when the head declares it,
  instead of waiting for it;
- ``Upgrade`` is ignored (RFC 9110 §7.8: the fields are dropped from the head), so a request
  pipelined behind ``Upgrade: h2c`` is answered like any other.

What it cannot read as HTTP (a malformed request line or field) is a 400 too: it never guesses
where such a request ends. A refusal closes the connection.
"""

from __future__ import annotations

import re
from enum import Enum

MAX_HEAD_BYTES = 64 * 1024  # a request line and all its header fields together
MAX_CHUNK_LINE = 4096  # a chunk-size line with its extensions
_HOST = re.compile(r"(\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9._~%!$&'()*+,;=-]*)(:[0-9]*)?")
_VERSION = re.compile(r"HTTP/([0-9])\.([0-9])")
_TOKEN = re.compile(r"[!#$%&'*+.^_`|~0-9A-Za-z-]+")
_REQUEST_LINE = re.compile(
    rb"([!#$%&'*+.^_`|~0-9A-Za-z-]+) ([\x21-\x7e]+) HTTP/([0-9])\.([0-9])\r\n")
_FIELD_LINES = re.compile(rb"(?:[!#$%&'*+.^_`|~0-9A-Za-z-]+:[^\r\n\x00]*\r\n)*\r\n")
_READ = ("host", "transfer-encoding", "content-length", "upgrade", "http2-settings")
_DROPPED = frozenset({"upgrade", "http2-settings"})  # fields of an upgrade this server ignores
REASONS = {400: "Bad Request", 408: "Request Timeout", 431: "Request Header Fields Too Large",
           501: "Not Implemented", 505: "HTTP Version Not Supported"}


def _values(head: bytes, lower: bytes, name: str) -> list[str]:
    """The values of field ``name`` (lower case) in a well-formed ``head``, trimmed."""
    key, found = b"\r\n" + name.encode() + b":", []
    at = lower.find(key)
    while at >= 0:
        start = at + len(key)
        end = head.find(b"\r\n", start)
        found.append(head[start:end].strip(b" \t").decode("latin-1"))
        at = lower.find(key, end)
    return found


class FramingError(Exception):
    """A request the server answers with ``status`` and then closes the connection on."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.passed = b""  # what the same bytes held before the refused part, to pass on
        self.in_body = False  # refused in a request's body (no answer has begun)


class Phase(Enum):
    HEAD = "head"  # between requests, or a head arriving
    BODY = "body"  # Content-Length bytes still due
    CHUNK_LINE = "chunk size line"
    CHUNK_DATA = "chunk data"
    CHUNK_END = "CRLF after chunk data"
    TRAILER = "trailer"
    DRAIN = "drain"  # after a refusal: nothing passes


# the bytes that end each line-read phase, and its length limit (0: the head limit)
_ENDINGS = {Phase.HEAD: (b"\r\n\r\n", 0), Phase.CHUNK_LINE: (b"\r\n", MAX_CHUNK_LINE),
            Phase.CHUNK_END: (b"\r\n", 2), Phase.TRAILER: (b"\r\n", 0)}


class RequestFraming:
    """The framing of one connection's requests; ``feed`` returns the bytes to pass on."""

    def __init__(self, bodies: bool = True, max_head: int = MAX_HEAD_BYTES) -> None:
        self._bodies = bodies
        self._max_head = max_head
        self._phase = Phase.HEAD
        self._pending = bytearray()  # a head, chunk line or trailer not complete yet
        self._due = 0  # body or chunk bytes still due
        self._trailer = 0  # bytes of the trailer so far (at most max_head)
        self.body_bytes = 0  # of the request now arriving

    @property
    def waiting_for_head(self) -> bool:
        """Between requests: no byte of the next head yet."""
        return self._phase is Phase.HEAD and not self._pending

    @property
    def in_head(self) -> bool:
        return self._phase is Phase.HEAD and bool(self._pending)

    @property
    def in_body(self) -> bool:
        return self._phase not in (Phase.HEAD, Phase.DRAIN)

    def feed(self, data: bytes) -> bytes:
        """Checks ``data`` (the next bytes received); returns what to pass on (``data`` itself
        when all of it passes unchanged, the common case: no copy). Raises FramingError for a
        request to refuse; the connection is then to be closed."""
        out: list[bytes | memoryview] = []
        view, at = memoryview(data), 0
        try:
            while at < len(data) and self._phase is not Phase.DRAIN:
                at = self._step(data, view, at, out)
        except FramingError as refusal:
            refusal.passed, refusal.in_body = b"".join(out), self.in_body
            self._phase = Phase.DRAIN
            raise
        if all(isinstance(piece, memoryview) for piece in out) and \
                sum(len(piece) for piece in out) == len(data):
            return data  # every byte passed, in order, unchanged
        return b"".join(out)

    def _step(self, data: bytes, view: memoryview, at: int,
              out: list[bytes | memoryview]) -> int:
        phase = self._phase
        if phase is Phase.BODY or phase is Phase.CHUNK_DATA:
            n = min(self._due, len(data) - at)
            out.append(view[at:at + n])
            self._due -= n
            self.body_bytes += n
            if not self._due:
                self._phase = Phase.HEAD if phase is Phase.BODY else Phase.CHUNK_END
            return at + n
        ending, limit = _ENDINGS[phase]
        limit = limit or self._max_head - (self._trailer if phase is Phase.TRAILER else 0)
        start = len(self._pending)
        if not start:  # the common case: the line or head whole in ``data``, read in place
            end = data.find(ending, at, at + limit + 1)
            if 0 <= end and end + len(ending) - at <= limit:
                whole = data[at:end + len(ending)]
                passed = self._complete(phase, whole)
                out.append(view[at:end + len(ending)] if passed is whole else passed)
                return end + len(ending)
        self._pending += view[at:at + limit - start + 1]
        end = self._pending.find(ending, max(0, start - len(ending) + 1))
        if end < 0 or end + len(ending) > limit:
            if len(self._pending) > limit or end >= 0:
                raise self._too_long(phase)
            return len(data)
        whole = bytes(self._pending[:end + len(ending)])
        used = len(whole) - start
        self._pending.clear()
        out.append(self._complete(phase, whole))
        return at + used

    def _too_long(self, phase: Phase) -> FramingError:
        if phase is Phase.HEAD:
            return FramingError(431, f"the request head (request line and header fields) is "
                                     f"over {self._max_head // 1024} KiB; send fewer or "
                                     "shorter header fields")
        if phase is Phase.CHUNK_END:
            return FramingError(400, "chunk data is not followed by CRLF: the chunked body "
                                     "is malformed (RFC 9112 §7.1)")
        return FramingError(400, f"the chunked body's {phase.value} is over its limit or "
                                 "malformed (RFC 9112 §7.1)")

    def _complete(self, phase: Phase, whole: bytes) -> bytes:
        """A head, chunk-size line, chunk end or trailer has arrived whole: check it and
        move on; returns the bytes to pass on."""
        if phase is Phase.HEAD:
            return self._head(whole)
        if phase is Phase.CHUNK_END:
            if whole != b"\r\n":
                raise self._too_long(phase)
            self._phase = Phase.CHUNK_LINE
            return whole
        if phase is Phase.CHUNK_LINE:
            size = whole[:-2].split(b";", 1)[0].strip(b" \t")
            if not size or len(size) > 16 or not all(c in b"0123456789abcdefABCDEF"
                                                     for c in size):
                raise FramingError(400, f"chunk size {size[:20]!r} is not a hex number: the "
                                        "chunked body is malformed (RFC 9112 §7.1)")
            self._due = int(size, 16)
            self._phase = Phase.CHUNK_DATA if self._due else Phase.TRAILER
            self._trailer = 0
            return whole
        name, colon, _ = whole[:-2].partition(b":")  # a trailer line, checked as it arrives
        if whole != b"\r\n" and (not colon or not _TOKEN.fullmatch(name.decode("latin-1"))):
            raise FramingError(400, "a trailer field of the chunked body is malformed "
                                    "(RFC 9112 §7.1.2); send name: value lines or none")
        self._trailer += len(whole)
        if whole == b"\r\n":  # the blank line: the request is complete
            self._phase = Phase.HEAD
        return whole

    def _head(self, head: bytes) -> bytes:
        """Checks one request head; returns it (without the fields of an ignored upgrade).
        Two regular expressions read a well-formed head (each request pays for this); what
        they refuse is diagnosed line by line."""
        head = head.lstrip(b"\r\n")  # empty lines before a request line are ignored (§2.2)
        if not head:
            return b""
        line = _REQUEST_LINE.match(head)
        if line is None or not _FIELD_LINES.fullmatch(head, line.end()):
            raise self._malformed(head)
        method, version = line[1].decode(), f"HTTP/{line[3].decode()}.{line[4].decode()}"
        if version not in ("HTTP/1.0", "HTTP/1.1"):
            raise FramingError(505, f"{version} is not supported; send HTTP/1.1 (or HTTP/2 to "
                                    "the gRPC port)")
        lower = head.lower()
        values = {name: _values(head, lower, name) for name in _READ}
        self._check_host(values.get("host", []), version)
        self._body_framing(values, version, method)
        self.body_bytes = 0
        if not (values["upgrade"] or values["http2-settings"]):
            return head
        lines = head[:-4].split(b"\r\n")
        kept = [lines[0]] + [f for f in lines[1:]
                             if f.partition(b":")[0].decode("latin-1").lower() not in _DROPPED]
        return b"\r\n".join(kept) + b"\r\n\r\n"

    @staticmethod
    def _malformed(head: bytes) -> FramingError:
        """Why a head that is not well formed was refused: its first bad line, named."""
        lines = head[:-4].decode("latin-1").split("\r\n")
        parts = lines[0].split(" ")
        if len(parts) != 3 or not _TOKEN.fullmatch(parts[0]) or not _VERSION.fullmatch(parts[2]):
            return FramingError(400, f"the request line {lines[0][:80]!r} is not 'METHOD "
                                     "target HTTP/1.1' (RFC 9112 §3)")
        if not all(0x21 <= ord(c) <= 0x7E for c in parts[1]):
            return FramingError(400, f"the request target {parts[1][:80]!r} holds characters "
                                     "outside visible ASCII; percent-encode them (RFC 3986)")
        bad = next((f for f in lines[1:] if not _FIELD_LINES.fullmatch(
            (f + "\r\n\r\n").encode("latin-1"))), lines[-1])
        return FramingError(400, f"the header field {bad[:80]!r} is not 'name: value' "
                                 "(RFC 9112 §5); send one field per CRLF-ended line")

    @staticmethod
    def _check_host(hosts: list[str], version: str) -> None:
        if version == "HTTP/1.1" and len(hosts) != 1 or len(hosts) > 1:
            raise FramingError(400, f"an {version} request needs exactly one Host header field "
                                    f"(RFC 9112 §3.2), this one has {len(hosts)}")
        if hosts and not _HOST.fullmatch(hosts[0]):
            raise FramingError(400, f"the Host header {hosts[0][:80]!r} is not a host[:port] "
                                    "(RFC 9112 §3.2)")

    def _body_framing(self, values: dict[str, list[str]], version: str, method: str) -> None:
        codings = ",".join(values.get("transfer-encoding", [])).lower().replace(" ", "")
        lengths = values.get("content-length", [])
        if codings and version == "HTTP/1.0":
            raise FramingError(400, "Transfer-Encoding in an HTTP/1.0 request cannot be "
                                    "trusted (RFC 9112 §6.1); send Content-Length, or HTTP/1.1")
        if codings and lengths:
            raise FramingError(400, "a request with both Transfer-Encoding and "
                                    "Content-Length is refused (RFC 9112 §6.3, request "
                                    "smuggling); send one")
        if codings and codings != "chunked":
            raise FramingError(501, f"Transfer-Encoding {codings[:40]!r} is not supported; "
                                    "send chunked, or Content-Length")
        if len(lengths) > 1 or lengths and not (lengths[0].isascii() and lengths[0].isdigit()
                                                and len(lengths[0]) <= 18):
            raise FramingError(400, "Content-Length must be one decimal number (RFC 9112 "
                                    "§6.3)")
        length = int(lengths[0]) if lengths else 0
        if not self._bodies and (codings or length):
            raise FramingError(400, f"{method[:16]} on this port takes no request body; send "
                                    "none (Prometheus sends none)")
        self._phase = Phase.CHUNK_LINE if codings else Phase.BODY if length else Phase.HEAD
        self._due = length
