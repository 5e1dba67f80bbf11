"""Logging: every line written while a request is handled carries its request id, and one
access-log line per request (logger ``visionserve.access``) records method, model, version,
status code and duration. Nothing a client sent is logged beyond its model name and request id,
both shortened and escaped (``printable``); never payload bytes.
"""

from __future__ import annotations

import itertools
import logging
import os
import time
from contextvars import ContextVar

REQUEST_ID: ContextVar[str] = ContextVar("request_id", default="")
FORMAT = "%(asctime)s %(levelname)s %(name)s:%(request_tag)s %(message)s"
_MAX_SHOWN = 64


def configure(level: str) -> None:
    """Root logging for the CLI: the format above, and the request id on every record."""
    logging.basicConfig(level=getattr(logging, level.upper()), format=FORMAT)
    tag_request_ids()


def tag_request_ids() -> None:
    """Every log record gets ``request_tag`` (the current request's id), which ``FORMAT``
    shows. Idempotent: an embedding program (or a test) may call it again."""
    previous = logging.getLogRecordFactory()
    if getattr(previous, "tags_request_ids", False):
        return

    def factory(*args: object, **kwargs: object) -> logging.LogRecord:
        record = previous(*args, **kwargs)
        rid = REQUEST_ID.get()
        record.request_tag = f" [req {rid}]" if rid else ""
        return record

    factory.tags_request_ids = True  # type: ignore[attr-defined]
    logging.setLogRecordFactory(factory)


_ID_PREFIX = os.urandom(4).hex()  # this process's; ids differ across replicas and restarts
_id_counter = itertools.count(1)


def request_id(client_id: str) -> str:
    """The id logs use for one request: the client's own (shortened, escaped), or a new one
    (16 hex digits: this process's random prefix and a counter; a uuid4 cost ~4 µs a request,
    a tenth of a small model's engine time)."""
    return log_field(client_id) if client_id else f"{_ID_PREFIX}{next(_id_counter):08x}"


def log_field(text: str) -> str:
    """``printable(text)``, quoted when it holds a space, ``=`` or a quote, so that a client's
    string cannot pose as another ``key=value`` field of an access-log line."""
    shown = printable(text)
    if not any(c in shown for c in " =\"'"):
        return shown
    return '"' + shown.replace('"', '\\"') + '"'


def printable(text: str, limit: int = _MAX_SHOWN) -> str:
    """``text`` safe for a log line or a status message: control characters escaped (no forged
    log lines), at most ``limit`` characters."""
    shown = text[:limit].encode("unicode_escape").decode("ascii") if not text.isprintable() \
        else text[:limit]
    return shown + (f"…(+{len(text) - limit} chars)" if len(text) > limit else "")


class TokenBucket:
    """At most ``per_s`` events a second (bursts of as many); counts what it refused."""

    def __init__(self, per_s: float) -> None:
        self._per_s = per_s
        self._budget = per_s
        self._refilled = time.monotonic()
        self.suppressed = 0  # refused since the last ``take_suppressed``

    def allow(self) -> bool:
        now = time.monotonic()
        self._budget = min(self._per_s, self._budget + (now - self._refilled) * self._per_s)
        self._refilled = now
        if self._budget < 1:
            self.suppressed += 1
            return False
        self._budget -= 1
        return True

    def take_suppressed(self) -> int:
        count, self.suppressed = self.suppressed, 0
        return count


class RateLimited(logging.Filter):
    """A logger's records, at most ``per_s`` a second: a flood of malformed or abandoned
    connections cannot flood the log (or its CPU) with library tracebacks. The next record let
    through says how many were dropped."""

    def __init__(self, per_s: float) -> None:
        super().__init__()
        self._bucket = TokenBucket(per_s)

    def filter(self, record: logging.LogRecord) -> bool:
        if not self._bucket.allow():
            return False
        if dropped := self._bucket.take_suppressed():
            record.msg = f"{record.msg} (+{dropped} similar lines not logged: rate limit)"
        return True


def rate_limit(logger_names: tuple[str, ...], per_s: float) -> None:
    """Rate-limits these loggers' own records (idempotent)."""
    for name in logger_names:
        logger = logging.getLogger(name)
        if not any(isinstance(f, RateLimited) for f in logger.filters):
            logger.addFilter(RateLimited(per_s))
