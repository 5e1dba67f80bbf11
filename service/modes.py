"""The server's modes: each a closed set of choices of a `serve` flag, one enum each."""

from __future__ import annotations

import enum


class GoldenMode(enum.StrEnum):
    """``--golden-check``: what a version whose golden check fails does
    (service/models/golden.py)."""

    ENFORCE = "enforce"  # it does not serve (state failed, with the reason)
    WARN = "warn"  # it serves anyway, the reason logged as an error and shown in GetModel
    OFF = "off"  # no check
