"""One root for the export stage's errors; each carries a code saying what kind of fault it is.

Library code raises these and never exits; ``visionserve export`` (``export/cli.py``) reports
them, exits 1 for a failed export and 2 for a usage error, and goes on with the next
architecture of an ``--all`` run.
"""

from __future__ import annotations

import enum


class ExportErrorCode(enum.Enum):
    USAGE = "usage"  # a flag or name the user must change (exit 2)
    WEIGHTS = "weights"  # the weights file does not fit the architecture
    PARITY = "parity"  # the exported model does not match PyTorch within tolerance
    PUBLISH = "publish"  # the repository could not take the version
    ENGINE = "engine"  # TensorRT could not build the engine


class ExportError(Exception):
    code: ExportErrorCode = ExportErrorCode.USAGE


class UsageError(ExportError):
    code = ExportErrorCode.USAGE


class WeightsError(ExportError):
    """The weights file does not fit the architecture; the message lists what differs."""

    code = ExportErrorCode.WEIGHTS
