"""The access log: one line per request (logger ``visionserve.access``), for every request, only
for failed ones (rate-limited, so a flood of bad requests cannot flood the log or its CPU), or
none."""

from __future__ import annotations

import logging

from ..logs import TokenBucket, log_field

access_log = logging.getLogger("visionserve.access")
ACCESS_LOG_LINES_PER_S = 20  # in "errors" mode: a flood of bad requests is summarized


class AccessLog:
    def __init__(self, mode: str) -> None:
        self._mode = mode  # all | errors | off (--access-log)
        self._bucket = TokenBucket(ACCESS_LOG_LINES_PER_S)

    def record(self, method: str, model: str, version: str, code: str,
               elapsed_s: float) -> None:
        if self._mode == "all" or (self._mode == "errors" and code != "OK"
                                   and self._bucket.allow()):
            access_log.info("%s model=%s version=%s code=%s duration_ms=%.2f%s", method,
                            log_field(model), version or "-", code, elapsed_s * 1000,
                            self._suppressed_note())

    def _suppressed_note(self) -> str:
        suppressed = self._bucket.take_suppressed()
        return f" (+{suppressed} failed requests not logged: rate limit)" if suppressed else ""
