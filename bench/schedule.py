"""Pure helpers of the load generator: open-loop arrival schedules and latency summaries."""

from __future__ import annotations

import numpy as np


def poisson_offsets(rate_per_s: float, duration_s: float, seed: int = 0) -> np.ndarray:
    """Send times (seconds from the start) of a Poisson process of ``rate_per_s`` over
    ``duration_s``: exponential gaps, drawn up front so the client spends no time on them."""
    if rate_per_s <= 0 or duration_s <= 0:
        raise ValueError(f"rate ({rate_per_s}) and duration ({duration_s}) must be positive")
    rng = np.random.default_rng(seed)
    expected = rate_per_s * duration_s
    n = int(expected + 10 * np.sqrt(expected) + 10)  # enough gaps with overwhelming odds
    times = np.cumsum(rng.exponential(1.0 / rate_per_s, n))
    while times[-1] < duration_s:  # (never in practice) extend
        times = np.concatenate([times, times[-1] + np.cumsum(
            rng.exponential(1.0 / rate_per_s, n))])
    return times[times < duration_s]


PERCENTILES = {"p50_ms": 50.0, "p90_ms": 90.0, "p99_ms": 99.0, "p999_ms": 99.9}


def latency_summary(latencies_s: list[float] | np.ndarray) -> dict[str, float]:
    """p50/p90/p99/p99.9 in milliseconds (NaN when nothing completed)."""
    if len(latencies_s) == 0:
        return {k: float("nan") for k in PERCENTILES}
    ms = np.asarray(latencies_s, dtype=np.float64) * 1000.0
    return {k: float(np.percentile(ms, q)) for k, q in PERCENTILES.items()}


def median_run(runs: list[dict[str, object]], key: str = "images_per_s") -> dict[str, object]:
    """Of repeated runs of one level, the one with the median throughput (its percentiles are
    reported with it, so a row is always one real run), with every repeat's value attached."""
    if not runs:
        raise ValueError("no runs")
    ordered = sorted(runs, key=lambda r: float(r[key]))  # type: ignore[arg-type]
    chosen = dict(ordered[(len(ordered) - 1) // 2])
    chosen[f"{key}_repeats"] = [round(float(r[key]), 3) for r in runs]  # type: ignore[arg-type]
    chosen["errors"] = sum(int(r["errors"]) for r in runs)  # type: ignore[call-overload]
    codes: dict[str, int] = {}
    examples: dict[str, str] = {}
    for r in runs:
        for code, n in dict(r.get("error_codes") or {}).items():  # type: ignore[call-overload]
            codes[code] = codes.get(code, 0) + int(n)
        for code, text in dict(r.get("error_examples") or {}).items():  # type: ignore[call-overload]
            examples.setdefault(code, str(text))
    chosen["error_codes"] = codes  # of every repeat, like "errors"
    chosen["error_examples"] = examples
    return chosen
