"""One exception root for the whole server; each class carries its gRPC status code.

Layers below the API raise these with messages written for the client: they name the model,
the version and the field that was wrong, and say what to do. ``grpc_status`` is the only
place where an exception becomes a wire status; anything that is not a ``VisionServeError``
becomes INTERNAL with a generic message (the traceback goes to the log, never to the client).
"""

from __future__ import annotations

import logging

import grpc

log = logging.getLogger(__name__)


class VisionServeError(Exception):
    """Root of every error the server reports to clients on purpose."""

    code: grpc.StatusCode = grpc.StatusCode.INTERNAL


class InvalidInput(VisionServeError):
    """The request is malformed: wrong shape, dtype, undecodable image, bad parameter."""

    code = grpc.StatusCode.INVALID_ARGUMENT


class ModelNotFound(VisionServeError):
    """No such model, or no such version of it is loaded."""

    code = grpc.StatusCode.NOT_FOUND


class QueueFull(VisionServeError):
    """The model version's queue is at capacity: the client should back off and retry."""

    code = grpc.StatusCode.RESOURCE_EXHAUSTED


class ServerBusy(VisionServeError):
    """Too many inference requests in progress on this server: back off and retry."""

    code = grpc.StatusCode.RESOURCE_EXHAUSTED


class LimitExceeded(VisionServeError):
    """A configured size limit (bytes, images per request) was exceeded."""

    code = grpc.StatusCode.RESOURCE_EXHAUSTED


class DeadlineExceeded(VisionServeError):
    """The request's deadline passed before it could be computed; its work was dropped."""

    code = grpc.StatusCode.DEADLINE_EXCEEDED


class ModelUnavailable(VisionServeError):
    """The model exists but cannot serve now (failed to load, draining, shutting down)."""

    code = grpc.StatusCode.UNAVAILABLE


class ModelFailed(VisionServeError):
    """The model is known but its load failed; the reason says what to fix."""

    code = grpc.StatusCode.FAILED_PRECONDITION


class ConfigError(VisionServeError):
    """A model's config.toml is invalid; fails that model only, never the whole server."""

    code = grpc.StatusCode.FAILED_PRECONDITION


class BackendError(VisionServeError):
    """The inference engine failed or returned something inconsistent."""

    code = grpc.StatusCode.INTERNAL


def check_image_count(n: int, limit: int, where: str) -> None:
    """The images-per-request limit, one rule for every entry point: each API checks it before
    converting a request's images, the core again for any other caller."""
    if n > limit:
        raise LimitExceeded(f"{where}: {n} images in one request, over the limit of {limit}; "
                            "split the request")


MAX_MESSAGE_CHARS = 2000  # status details travel in a header: keep them well under its limit


def grpc_status(exc: BaseException) -> tuple[grpc.StatusCode, str]:
    """Map any exception to the (code, message) sent to the client."""
    if isinstance(exc, VisionServeError):
        message = str(exc)
        if len(message) > MAX_MESSAGE_CHARS:
            message = message[:MAX_MESSAGE_CHARS] + "…(message shortened)"
        return exc.code, message
    log.error("unexpected error while serving a request", exc_info=exc)
    return (grpc.StatusCode.INTERNAL,
            "internal server error (logged on the server); please report it")
