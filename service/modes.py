"""The server's modes: each a closed set of choices of a `serve` flag, one enum each."""

from __future__ import annotations

import enum


class GoldenMode(enum.StrEnum):
    """``--golden-check``: what a version whose golden check fails does
    (service/models/golden.py)."""

    ENFORCE = "enforce"  # it does not serve (state failed, with the reason)
    WARN = "warn"  # it serves anyway, the reason logged as an error and shown in GetModel
    OFF = "off"  # no check


class ModelControlMode(enum.StrEnum):
    """``--model-control``: what changes the models served."""

    POLL = "poll"  # rescan the repository every --poll-interval-s
    EXPLICIT = "explicit"  # only the KServe load/unload RPCs (Triton's explicit mode)
    NONE = "none"  # load once at start


class AccessLogMode(enum.StrEnum):
    """``--access-log``: which requests get a log line."""

    ALL = "all"
    ERRORS = "errors"
    OFF = "off"
