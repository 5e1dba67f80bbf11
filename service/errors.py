"""One exception root for the whole server; each class carries a neutral error code.

Layers below the API raise these with messages written for the client: they name the model,
the version and the field that was wrong, and say what to do. ``client_error`` is the only place
where an exception becomes what a client is told; anything that is not a ``VisionServeError``
becomes INTERNAL with a generic message (the traceback goes to the log, never to the client).
Each wire maps the neutral codes once (gRPC: ``api/status.py``); nothing here knows a wire.
"""

from __future__ import annotations

import enum
import logging

log = logging.getLogger(__name__)


class ErrorCode(enum.Enum):
    """What went wrong, for any wire. The names are gRPC's canonical codes (which HTTP/REST
    front ends map to statuses the same way KServe and Triton do)."""

    INVALID_ARGUMENT = enum.auto()
    NOT_FOUND = enum.auto()
    RESOURCE_EXHAUSTED = enum.auto()
    DEADLINE_EXCEEDED = enum.auto()
    UNAVAILABLE = enum.auto()
    FAILED_PRECONDITION = enum.auto()
    INTERNAL = enum.auto()
    CANCELLED = enum.auto()  # the client left before its request was read: not our error


class VisionServeError(Exception):
    """Root of every error the server reports to clients on purpose."""

    code: ErrorCode = ErrorCode.INTERNAL


class ClientGone(VisionServeError):
    """The client disconnected before its request was read: nobody to answer, nothing to log
    as a server error."""

    code = ErrorCode.CANCELLED


class InvalidInput(VisionServeError):
    """The request is malformed: wrong shape, dtype, undecodable image, bad parameter."""

    code = ErrorCode.INVALID_ARGUMENT


class ModelNotFound(VisionServeError):
    """No such model, or no such version of it is loaded."""

    code = ErrorCode.NOT_FOUND


class QueueFull(VisionServeError):
    """The model version's queue is at capacity: the client should back off and retry."""

    code = ErrorCode.RESOURCE_EXHAUSTED


class ServerBusy(VisionServeError):
    """Too many inference requests in progress on this server: back off and retry."""

    code = ErrorCode.RESOURCE_EXHAUSTED


class RateLimited(VisionServeError):
    """Too many requests of a kind (model loads and unloads): retry after the time it names."""

    code = ErrorCode.RESOURCE_EXHAUSTED


class LimitExceeded(VisionServeError):
    """A configured size limit (bytes, images per request) was exceeded."""

    code = ErrorCode.RESOURCE_EXHAUSTED


class DeadlineExceeded(VisionServeError):
    """The request's deadline passed before it could be computed; its work was dropped."""

    code = ErrorCode.DEADLINE_EXCEEDED


class ModelUnavailable(VisionServeError):
    """The model exists but cannot serve now (failed to load, draining, shutting down)."""

    code = ErrorCode.UNAVAILABLE


class ShuttingDown(ModelUnavailable):
    """The server is stopping and takes no new calls: retry on another replica."""


class ModelFailed(VisionServeError):
    """The model is known but its load failed; the reason says what to fix."""

    code = ErrorCode.FAILED_PRECONDITION


class ConfigError(VisionServeError):
    """A model's config.toml is invalid; fails that model only, never the whole server."""

    code = ErrorCode.FAILED_PRECONDITION


class BackendError(VisionServeError):
    """The inference engine failed or returned something inconsistent."""

    code = ErrorCode.INTERNAL


def check_image_count(n: int, limit: int, where: str) -> None:
    """The images-per-request limit, one rule for every entry point: each API checks it before
    converting a request's images, the core again for any other caller."""
    if n > limit:
        raise LimitExceeded(f"{where}: {n} images in one request, over the limit of {limit}; "
                            "split the request")


# status details travel in a header (grpc-message, percent-encoded: up to 3 bytes per byte),
# under the client's metadata limit (8 KiB by default): bound them in UTF-8 bytes, not characters
MAX_MESSAGE_BYTES = 1024


def bounded(message: str, limit: int = MAX_MESSAGE_BYTES) -> str:
    """``message`` cut to at most ``limit`` UTF-8 bytes (never inside a character), marked."""
    data = message.encode("utf-8", errors="replace")
    if len(data) <= limit:
        return message
    suffix = "…(message shortened)"
    return data[:limit - len(suffix.encode())].decode("utf-8", errors="ignore") + suffix


def error_code(exc: BaseException) -> ErrorCode:
    """The code of any exception (INTERNAL for those not raised on purpose); logs nothing."""
    return exc.code if isinstance(exc, VisionServeError) else ErrorCode.INTERNAL


def client_error(exc: BaseException) -> tuple[ErrorCode, str]:
    """Any exception as the (code, message) a client is told; an unexpected one is logged with
    its traceback and answered with a generic message."""
    if isinstance(exc, VisionServeError):
        return exc.code, bounded(str(exc))
    log.error("unexpected error while serving a request", exc_info=exc)
    return ErrorCode.INTERNAL, "internal server error (logged on the server); please report it"
