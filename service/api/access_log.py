"""The access log: one line per request (logger ``visionserve.access``), for every request, only
for failed ones (rate-limited, so a flood of bad requests cannot flood the log or its CPU), or
none."""

from __future__ import annotations

import logging
import time

from ..logs import log_field

access_log = logging.getLogger("visionserve.access")
ACCESS_LOG_LINES_PER_S = 20  # in "errors" mode: a flood of bad requests is summarized


class AccessLog:
    def __init__(self, mode: str) -> None:
        self._mode = mode  # all | errors | off (--access-log)
        self._budget = float(ACCESS_LOG_LINES_PER_S)
        self._refilled = time.monotonic()
        self._suppressed = 0

    def record(self, method: str, model: str, version: str, code: str,
               elapsed_s: float) -> None:
        if self._mode == "all" or (self._mode == "errors" and code != "OK" and self._may_log()):
            access_log.info("%s model=%s version=%s code=%s duration_ms=%.2f%s", method,
                            log_field(model), version or "-", code, elapsed_s * 1000,
                            self._suppressed_note())

    def _may_log(self) -> bool:
        """Token bucket of the "errors" mode: at most ACCESS_LOG_LINES_PER_S lines a second."""
        now = time.monotonic()
        self._budget = min(float(ACCESS_LOG_LINES_PER_S),
                           self._budget + (now - self._refilled) * ACCESS_LOG_LINES_PER_S)
        self._refilled = now
        if self._budget < 1:
            self._suppressed += 1
            return False
        self._budget -= 1
        return True

    def _suppressed_note(self) -> str:
        if not self._suppressed:
            return ""
        note = f" (+{self._suppressed} failed requests not logged: rate limit)"
        self._suppressed = 0
        return note
