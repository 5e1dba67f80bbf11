"""The gRPC face of our errors: one mapping from the neutral codes to gRPC status codes."""

from __future__ import annotations

import grpc

from ...errors import ErrorCode, client_error

GRPC_CODES = {code: grpc.StatusCode[code.name] for code in ErrorCode}


def grpc_status(exc: BaseException) -> tuple[grpc.StatusCode, str]:
    """Any exception as the gRPC (code, message) sent to the client (see ``client_error``)."""
    code, message = client_error(exc)
    return GRPC_CODES[code], message
