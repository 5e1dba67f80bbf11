"""A bench run's results → ratios, a terminal table, JSON, a PNG plot and a markdown section.

Every ratio is computed from rows of the same run (never against a number from another day):
served ÷ in-process best, batching on ÷ off against the engine's own batching gain, ours ÷
Triton's with the same client, JPEG ÷ raw tensors.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from pathlib import Path
from typing import Any

Row = dict[str, Any]


def save(json_path: Path | None, data: object, markdown_path: Path | None,
         markdown_text: str) -> list[Path]:
    """Write the results as JSON and/or markdown where asked (folders created); the paths
    written."""
    import json

    written = []
    if json_path:
        json_path.parent.mkdir(parents=True, exist_ok=True)
        json_path.write_text(json.dumps(data, indent=2) + "\n")
        written.append(json_path)
    if markdown_path:
        markdown_path.parent.mkdir(parents=True, exist_ok=True)
        markdown_path.write_text(markdown_text)
        written.append(markdown_path)
    return written


def target_name(row: Row) -> str:
    return f"{row['target']} [{row['variant']}]" if row.get("variant") else str(row["target"])


def level(row: Row) -> str:
    return f"c{row['concurrency']}" if "concurrency" in row else f"r{row['rate']:g}"


def _find(runs: Iterable[Row], **match: object) -> Row | None:
    return next((r for r in runs if all(r.get(k) == v for k, v in match.items())), None)


def compute_ratios(runs: list[Row], in_process: dict[str, float],
                   round_trip: Row | None = None) -> dict[str, float]:
    """Named ratios from one run's rows (see docs/benchmarks.md for what each means)."""
    ratios: dict[str, float] = {}
    if not in_process:
        return ratios
    best, b1 = max(in_process.values()), in_process.get("1", 0.0)
    engine_gain = best / b1 if b1 else math.nan
    ratios["engine_batching_gain"] = engine_gain
    for r in runs:
        if r.get("variant"):
            base = _find((x for x in runs if x["target"] == "visionserve" and not x.get("variant")),
                         api=r["api"], input=r["input"], batching="on", **_level_match(r))
            if base and base["images_per_s"] > 0:
                key = f"{r['input']}_{r['api']}_{level(r)}_{r['variant']}"
                ratios[f"{key}_vs_default"] = r["images_per_s"] / base["images_per_s"]
                ratios[f"{key}_vs_in_process_best"] = r["images_per_s"] / best
    ours = [r for r in runs if r["target"] == "visionserve" and not r.get("variant")]
    for r in ours:
        if r["batching"] != "on":
            continue
        key = f"{r['input']}_{r['api']}_{level(r)}"
        peer = _find(runs, target="triton", api=r["api"], input=r["input"], batching="on",
                     **_level_match(r))
        if peer and peer["images_per_s"] > 0:
            ratios[f"{key}_vs_triton"] = r["images_per_s"] / peer["images_per_s"]
            ratios[f"{key}_p99_triton_over_ours"] = peer["p99_ms"] / r["p99_ms"]
        if r["api"].startswith("rest"):  # REST beside the same call over gRPC
            grpc_api = "classify" if r["api"] == "rest-classify" else "kserve"
            same = _find(ours, api=grpc_api, input=r["input"], batching="on", **_level_match(r))
            if same and same["images_per_s"] > 0:
                ratios[f"{key}_vs_grpc_{grpc_api}"] = r["images_per_s"] / same["images_per_s"]
        if "concurrency" not in r:  # open loop: throughput is the offered rate
            continue
        ratios[f"{key}_vs_in_process_best"] = r["images_per_s"] / best
        if r.get("concurrency") == 1 and b1:
            ratios[f"{key}_vs_in_process_b1"] = r["images_per_s"] / b1
            if round_trip and r["images_per_request"] == 1:  # the floor: engine + one RTT
                floor_ms = 1000.0 / b1 + round_trip["p50_ms"]
                ratios[f"{key}_p50_over_engine_plus_rtt"] = r["p50_ms"] / floor_ms
        off = _find(ours, api=r["api"], input=r["input"], batching="off",
                    **_level_match(r))
        if off and off["images_per_s"] > 0:
            on_off = r["images_per_s"] / off["images_per_s"]
            ratios[f"{key}_batching_on_vs_off"] = on_off
            if engine_gain and not math.isnan(engine_gain):  # target: >= 0.9 at c32
                ratios[f"{key}_batching_on_off_vs_engine_gain"] = on_off / engine_gain
        if r["input"] == "jpeg":
            for raw in ("float32", "uint8"):
                other = _find(ours, api=r["api"], input=raw, batching="on", **_level_match(r))
                if other and other["images_per_s"] > 0:
                    ratios[f"{key}_vs_{raw}"] = r["images_per_s"] / other["images_per_s"]
    return {k: round(v, 3) for k, v in ratios.items() if not math.isnan(v)}


def _level_match(row: Row) -> dict[str, object]:
    return {"concurrency": row["concurrency"]} if "concurrency" in row else {"rate": row["rate"]}


def print_table(console: Any, results: dict[str, Any]) -> None:
    from rich.table import Table

    best = max(results["in_process"].values())
    table = Table(title=f"{results['model']}: served vs in-process engine "
                        f"(best batch {best:.1f} img/s; median of {results['repeats']} repeats)")
    for col in ("target", "api", "input", "batching", "level", "img/s", "p50 ms", "p90 ms",
                "p99 ms", "p99.9 ms", "errors", "client CPU", "÷ in-process best"):
        table.add_column(col, justify="right")
    for r in results["runs"]:
        table.add_row(target_name(r), r["api"], r["input"], r["batching"], level(r),
                      f"{r['images_per_s']:.1f}",
                      *(f"{r[k]:.1f}" for k in ("p50_ms", "p90_ms", "p99_ms", "p999_ms")),
                      str(r["errors"]), f"{r['client_cpu']:.2f}",
                      f"{r['images_per_s'] / best:.2f}")
    console.print(table)
    console.print("in-process img/s by batch: " + ", ".join(
        f"{b}: {v:.1f}" for b, v in results["in_process"].items()))
    if results.get("round_trip"):
        rt = results["round_trip"]
        console.print(f"gRPC round trip without a model (health Check, concurrency 1): p50 "
                      f"{rt['p50_ms']:.2f} ms; in-process batch 1: "
                      f"{1000 / results['in_process']['1']:.2f} ms per image")
    for name, value in results["ratios"].items():
        console.print(f"  {name}: {value:.3f}")


def plot(results: dict[str, Any], path: Path) -> None:
    """Throughput and latency percentiles against concurrency (and offered rate, if any)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    closed = [r for r in results["runs"] if "concurrency" in r]
    opened = [r for r in results["runs"] if "rate" in r]
    panels = 2 + (1 if opened else 0)
    fig, axes = plt.subplots(1, panels, figsize=(6 * panels, 4.5))
    series: dict[str, list[Row]] = {}
    for r in closed:
        series.setdefault(f"{target_name(r)} {r['api']} {r['input']} batching {r['batching']}",
                          []).append(r)
    best = max(results["in_process"].values())
    for name, rows in series.items():
        rows = sorted(rows, key=lambda r: r["concurrency"])
        xs = [r["concurrency"] for r in rows]
        axes[0].plot(xs, [r["images_per_s"] for r in rows], marker="o", label=name)
        line = axes[1].plot(xs, [r["p50_ms"] for r in rows], marker="o", label=f"{name} p50")
        axes[1].plot(xs, [r["p99_ms"] for r in rows], marker="x", linestyle="--",
                     color=line[0].get_color(), label=f"{name} p99")
    axes[0].axhline(best, color="grey", linestyle=":", label="in-process best")
    top = max((r["images_per_s"] for r in closed), default=best)
    axes[0].set(yscale="log" if best > 5 * top else "linear")
    axes[0].set(xscale="log", xlabel="concurrency (requests in flight)", ylabel="images/s",
                title=f"{results['model']}: throughput")
    axes[1].set(xscale="log", yscale="log", xlabel="concurrency", ylabel="latency ms",
                title="latency p50 (solid) / p99 (dashed)")
    if opened:
        by: dict[str, list[Row]] = {}
        for r in opened:
            by.setdefault(f"{target_name(r)} {r['input']} batching {r['batching']}", []).append(r)
        for name, rows in by.items():
            rows = sorted(rows, key=lambda r: r["rate"])
            axes[2].plot([r["offered_per_s"] * r["images_per_request"] for r in rows],
                         [r["images_per_s"] for r in rows], marker="o", label=name)
        axes[2].set(xlabel="offered images/s (Poisson)", ylabel="answered images/s",
                    title="open loop")
        axes[2].legend(fontsize=7)
    axes[0].legend(fontsize=7)
    axes[1].legend(fontsize=6)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)


def markdown(results: dict[str, Any]) -> str:
    """A section for docs/benchmarks.md: command, machine, table, in-process, ratios."""
    m = results["machine"]
    best = max(results["in_process"].values())
    lines = [f"### {results['model']}", "", "```bash", results["command"], "```", "",
             f"{results['date']}; {m['cores']} cores ({m['cpu']}), Python {m['python']}, "
             f"ONNX Runtime {m['onnxruntime']}; median of {results['repeats']} repeats of "
             f"{results['duration_s']:g} s per level, levels interleaved across targets.", "",
             "| target | api | input | batching | level | img/s | p50 ms | p90 ms | p99 ms | "
             "p99.9 ms | errors | client CPU | ÷ in-process best |",
             "|---|---|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in results["runs"]:
        lines.append(
            f"| {target_name(r)} | {r['api']} | {r['input']} | {r['batching']} | {level(r)} | "
            f"{r['images_per_s']:.1f} | {r['p50_ms']:.1f} | {r['p90_ms']:.1f} | "
            f"{r['p99_ms']:.1f} | {r['p999_ms']:.1f} | {r['errors']} | {r['client_cpu']:.2f} | "
            f"{r['images_per_s'] / best:.2f} |")
    lines += ["", "In-process img/s by batch: " + ", ".join(
        f"{b}: {v:.1f}" for b, v in results["in_process"].items()) + ".", "",
        *([f"gRPC round trip without a model (health Check, concurrency 1): p50 "
           f"{results['round_trip']['p50_ms']:.2f} ms; in-process batch 1: "
           f"{1000 / results['in_process']['1']:.2f} ms per image.", ""]
          if results.get("round_trip") else []),
        "Ratios: " + ", ".join(f"`{k}` {v:.2f}" for k, v in results["ratios"].items()) + ".",
        ""]
    return "\n".join(lines)
