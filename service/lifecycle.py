"""The server's phase: one object that health, KServe ServerReady, admission and the registry
read, and that only the server moves, forward only.

    LOADING ──▶ SERVING ──▶ DRAINING ──▶ STOPPING ──▶ STOPPED
       └──────────────────────▲   (a signal during the initial load never reports SERVING)

LOADING: listening, models loading, not ready. SERVING: ready. DRAINING: a signal came;
readiness is off (health NOT_SERVING, ServerReady false) but calls are still admitted for
``--shutdown-delay-s``, so load balancers stop routing here before anything is refused.
STOPPING: new calls are refused UNAVAILABLE while accepted ones finish. STOPPED: done.
(DESIGN.md names four phases; the shutdown delay needs the fifth: not ready, still admitting.)
"""

from __future__ import annotations

import enum


class Phase(enum.StrEnum):
    LOADING = "loading"
    SERVING = "serving"
    DRAINING = "draining"
    STOPPING = "stopping"
    STOPPED = "stopped"


_ORDER = list(Phase)


class Lifecycle:
    def __init__(self) -> None:
        self._phase = Phase.LOADING

    @property
    def phase(self) -> Phase:
        return self._phase

    @property
    def loading(self) -> bool:
        return self._phase is Phase.LOADING

    @property
    def ready(self) -> bool:
        """What readiness probes report: SERVING only."""
        return self._phase is Phase.SERVING

    @property
    def admitting(self) -> bool:
        """Whether a new call is taken (until STOPPING)."""
        return _ORDER.index(self._phase) < _ORDER.index(Phase.STOPPING)

    def advance(self, phase: Phase) -> None:
        """Move to ``phase``; moving back is a bug and raises."""
        if _ORDER.index(phase) < _ORDER.index(self._phase):
            raise ValueError(f"the server cannot go back from {self._phase} to {phase}")
        self._phase = phase
