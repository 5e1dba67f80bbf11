"""The states of a model version, one enum for every reader (registry, loader, metrics, APIs)."""

from __future__ import annotations

import enum


class VersionState(enum.StrEnum):
    """The one set of states of a model version (and of a model: its best version's). Each wire
    maps it once: api/grpc/vision.py (ModelState), api/kserve_protocol.py (index strings), metrics
    (the ``state`` label, the value itself)."""

    LOADING = "loading"
    READY = "ready"
    FAILED = "failed"
    DRAINING = "draining"
    UNLOADED = "unloaded"
