"""What a server process does while an attack runs: its RSS and threads every 20 ms, and a probe
(a health check, a scrape) on its own connection at a fixed interval: its slowest answer, and
how many failed. Shared by ``bench-attacks``' gRPC and HTTP attacks."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

from .launch import rss_mb, threads


@dataclass(frozen=True)
class Cost:
    """What an attack cost the server: memory and threads before, at the peak and after, and
    its probe's slowest answer and failures."""

    rss_before_mb: float
    rss_peak_mb: float
    rss_after_mb: float
    threads_before: int
    threads_peak: int
    threads_after: int
    probe_max_s: float
    probe_failures: int

    def cells(self) -> str:
        """Three markdown table cells: RSS, threads, the slowest probe (and failures)."""
        failures = f", {self.probe_failures} failed" if self.probe_failures else ""
        return (f"{self.rss_before_mb:.0f} → {self.rss_peak_mb:.0f} → {self.rss_after_mb:.0f} | "
                f"{self.threads_before} → {self.threads_peak} → {self.threads_after} | "
                f"{self.probe_max_s * 1000:.0f} ms{failures}")


class Watch:
    def __init__(self, pid: int, check: Callable[[], bool], every_s: float) -> None:
        """``check`` probes the server once: True when it answered as it should; an
        exception counts as a failure."""
        self._pid, self._check, self._every_s = pid, check, every_s
        self.rss_peak, self.threads_peak = rss_mb(pid), threads(pid)
        self._before = (self.rss_peak, self.threads_peak)
        self.probe_max, self.probe_failures = 0.0, 0
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._sample, daemon=True),
                         threading.Thread(target=self._probe, daemon=True)]

    def __enter__(self) -> Watch:
        for t in self._threads:
            t.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        for t in self._threads:
            t.join()

    def cost(self) -> Cost:
        """The cost so far, "after" read now."""
        return Cost(self._before[0], self.rss_peak, rss_mb(self._pid), self._before[1],
                    self.threads_peak, threads(self._pid), self.probe_max, self.probe_failures)

    def _sample(self) -> None:
        while not self._stop.wait(0.02):
            self.rss_peak = max(self.rss_peak, rss_mb(self._pid))
            self.threads_peak = max(self.threads_peak, threads(self._pid))

    def _probe(self) -> None:
        while not self._stop.wait(self._every_s):
            start = time.monotonic()
            try:
                ok = self._check()
            except Exception:  # noqa: BLE001 - any failure of the probe is counted
                ok = False
            self.probe_failures += not ok
            self.probe_max = max(self.probe_max, time.monotonic() - start)
