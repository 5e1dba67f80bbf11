"""What an HTTP request says beyond its body (route names, query parameters, the deadline and
request-id headers) and the JSON replies, errors included, that the HTTP API writes."""

from __future__ import annotations

import json
import time
from typing import Any

from aiohttp import web

from ...errors import InvalidInput
from ...logs import printable

TIMEOUT_HEADER = "X-Timeout-Ms"  # the request's deadline, milliseconds from its arrival
REQUEST_ID_HEADER = "X-Request-ID"
JSON = "application/json"


def deadline(request: web.Request, timeout_us: int = 0) -> float | None:
    """The request's deadline (``X-Timeout-Ms``, Triton's ``timeout`` parameter in
    microseconds; the earlier of the two) as a time.monotonic() instant."""
    limits = []
    text = request.headers.get(TIMEOUT_HEADER)
    if text is not None:
        try:
            ms = float(text)
        except ValueError:
            ms = -1.0
        if not ms > 0 or ms != ms or ms == float("inf"):
            raise InvalidInput(f"{TIMEOUT_HEADER} {printable(text)!r} is not a number of "
                               "milliseconds > 0")
        limits.append(ms / 1000)
    if timeout_us:
        limits.append(timeout_us / 1e6)
    return time.monotonic() + min(limits) if limits else None


def client_id(request: web.Request) -> str:
    return request.headers.get(REQUEST_ID_HEADER, "")[:256]


def names(request: web.Request) -> tuple[str, str]:
    return request.match_info.get("model", ""), request.match_info.get("version", "")


def digits(text: str) -> bool:
    """ASCII digits of an int64 (``"²".isdigit()`` is true too)."""
    return text.isascii() and text.isdigit() and len(text) <= 18


def query_bool(request: web.Request, key: str, model: str) -> bool:
    text = request.query.get(key, "false").lower()
    if text not in ("true", "false", "1", "0"):
        raise InvalidInput(f"model {printable(model)}: query parameter {key} must be true or "
                           f"false, got {printable(text)!r}")
    return text in ("true", "1")


def query_int(request: web.Request, key: str, model: str) -> int:
    text = request.query.get(key, "0")
    if not digits(text):
        raise InvalidInput(f"model {printable(model)}: query parameter {key} must be an "
                           f"integer >= 0, got {printable(text)!r}")
    return int(text)


def json_reply(body: Any, status: int = 200) -> web.Response:
    return web.Response(body=json.dumps(body, separators=(",", ":"), allow_nan=False).encode(),
                        status=status, content_type=JSON)


def error_reply(status: int, message: str, request_id: str,
           headers: dict[str, str] | None = None) -> web.Response:
    response = json_reply({"error": message}, status)
    response.headers.update(headers or {})
    if request_id:
        response.headers[REQUEST_ID_HEADER] = request_id
    return response
