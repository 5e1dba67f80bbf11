"""``visionserve bench-signal``: which load signal tells how close a replica is to its limit.

For each of ``--models``: start its server, measure its capacity (closed loop, c16), then offer
Poisson load at each ``--levels`` fraction of it (10 % … 150 %), ``--duration-s`` per level. At
each level, sampled from the server every 0.25 s over the level's second half (once the 10 s
utilization window is full of it): ``visionserve_engine_utilization`` (the model's), the
batching queue's depth, and the server process's CPU (user + system of all its threads, from
/proc, ÷ the cores); from the client: the answered rate and p99. The signal an autoscaler wants
grows with offered load and reaches its top exactly where the answered rate stops growing.
"""

from __future__ import annotations

import argparse
import os
import shlex
import statistics
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

from visionserve.service.cli.mistakes import CommandError
from visionserve.service.format.model_config import ModelConfig

from . import report
from .launch import LINKED_REPO, single_model_repo, start_visionserve
from .loadgen import ClientProcess, Job

LEVELS = "0.1,0.25,0.5,0.75,0.9,1.0,1.25,1.5"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--models", default="resnet18,mobilenet_v3_small")
    p.add_argument("--repo", type=Path, default=Path("model_repo"))
    p.add_argument("--levels", default=LEVELS, help="offered load, fractions of capacity")
    p.add_argument("--duration-s", type=float, default=24.0,
                   help="seconds per level (its second half is sampled)")
    p.add_argument("--capacity-s", type=float, default=10.0,
                   help="seconds of the closed-loop capacity run")
    p.add_argument("--input", choices=["uint8", "float32"], default="uint8")
    p.add_argument("--json", type=Path)
    p.add_argument("--markdown", type=Path)
    p.add_argument("--plot", type=Path, help="write a PNG: offered load vs each signal")


def run_signal(args: argparse.Namespace) -> int:
    from rich.console import Console

    console = Console(stderr=True)
    try:
        levels = [float(x) for x in args.levels.split(",") if x]
    except ValueError:
        levels = []
    if not levels or min(levels) <= 0:
        raise CommandError(f"--levels {args.levels}: give fractions of capacity above 0, "
                           f"comma-separated (e.g. {LEVELS})")
    results = {"command": "visionserve bench-signal " + shlex.join(sys.argv[2:]),
               "cores": os.cpu_count(), "models": {}}
    for model in [m for m in args.models.split(",") if m]:
        results["models"][model] = _model(model, args, levels, console)
    text = markdown(results)
    sys.stdout.write(text)
    report.save(args.json, results, args.markdown, text)
    if args.plot:
        plot(results, args.plot)
    return 0


def _model(model: str, args: argparse.Namespace, levels: list[float], console) -> dict:
    workdir = Path(tempfile.mkdtemp(prefix="visionserve-signal-"))
    repo = single_model_repo(args.repo, model, workdir)
    spec = ModelConfig.from_toml(repo / model / "config.toml").input
    job = Job(target="", label="visionserve", model=model, api="kserve", input=args.input,
              shape=spec.shape, input_name=spec.name)
    server = start_visionserve(repo, *LINKED_REPO, log_path=workdir / "server.log")
    job = _with(job, target=server.target)
    sampler = Sampler(server.process.pid, server.metrics_port, model)
    rows = []
    try:
        with ClientProcess() as client:
            with console.status(f"{model}: capacity (closed loop c16)"):
                capacity = float(client.run(_with(job, concurrency=16,
                                                  duration_s=args.capacity_s))[
                    "requests_per_s"])  # type: ignore[arg-type]
            sampler.start()
            for i, level in enumerate(levels):
                with console.status(f"{model}: {level:.0%} of {capacity:.0f} requests/s"):
                    half = args.duration_s / 2
                    threading.Timer(half, sampler.begin, args=(level,)).start()
                    row = client.run(_with(job, rate=level * capacity, duration_s=args.duration_s,
                                           warmup_s=0.0, seed=i))
                    sampler.end()
                rows.append({"level": level, "offered_per_s": row["offered_per_s"],
                             "answered_per_s": row["requests_per_s"], "p99_ms": row["p99_ms"],
                             "errors": row["errors"], **sampler.summary(level)})
                console.print(_line(model, rows[-1]))
    finally:
        sampler.stop()
        server.stop()
    return {"capacity_requests_per_s": capacity, "levels": rows}


class Sampler:
    """Every 0.25 s between ``begin`` and ``end``: the model's utilization and queue depth
    (/metrics) and the server's CPU (/proc), kept by level."""

    def __init__(self, pid: int, metrics_port: int, model: str) -> None:
        self._pid, self._model = pid, model
        self._url = f"http://127.0.0.1:{metrics_port}/metrics"
        self._level: float | None = None
        self._samples: dict[float, list[tuple[float, float]]] = {}
        self._cpu: dict[float, tuple[float, float]] = {}  # level -> (CPU s, wall s)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)

    def start(self) -> None:
        self._thread.start()

    def begin(self, level: float) -> None:
        self._cpu[level] = (_cpu_s(self._pid), time.monotonic())
        self._level = level

    def end(self) -> None:
        level, self._level = self._level, None
        if level is not None:
            cpu, wall = self._cpu[level]
            self._cpu[level] = (_cpu_s(self._pid) - cpu, time.monotonic() - wall)

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()

    def summary(self, level: float) -> dict[str, float]:
        samples = self._samples.get(level) or [(0.0, 0.0)]
        cpu, wall = self._cpu.get(level, (0.0, 1.0))
        return {"utilization": statistics.mean(s[0] for s in samples),
                "queue_depth": statistics.mean(s[1] for s in samples),
                "cpu_fraction": cpu / max(wall, 1e-9) / (os.cpu_count() or 1)}

    def _loop(self) -> None:
        while not self._stop.wait(0.25):
            level = self._level
            if level is None:
                continue
            try:
                with urllib.request.urlopen(self._url, timeout=5) as reply:
                    text = reply.read().decode()
            except OSError:
                continue
            self._samples.setdefault(level, []).append(
                (_series(text, "visionserve_engine_utilization", self._model),
                 _series(text, "visionserve_queue_depth", self._model)))


def _series(text: str, name: str, model: str) -> float:
    prefix = f'{name}{{model="{model}"'
    return sum(float(line.rpartition(" ")[2]) for line in text.splitlines()
               if line.startswith(prefix))


def _cpu_s(pid: int) -> float:
    """User + system CPU seconds of a process and all its threads."""
    fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _with(job: Job, **changes: object) -> Job:
    import dataclasses

    return dataclasses.replace(job, **changes)  # type: ignore[arg-type]


def _line(model: str, r: dict) -> str:
    return (f"{model} {r['level']:.0%}: answered {r['answered_per_s']:.0f}/s, utilization "
            f"{r['utilization']:.2f}, CPU {r['cpu_fraction']:.2f}, queue {r['queue_depth']:.1f}"
            f", p99 {r['p99_ms']:.0f} ms")


def markdown(results: dict) -> str:
    lines = [f"`{results['command']}` ({results['cores']} cores)", ""]
    for model, m in results["models"].items():
        lines += [f"**{model}**: capacity {m['capacity_requests_per_s']:.0f} requests/s "
                  "(closed loop c16)", "",
                  "| offered (of capacity) | answered/s | engine utilization | server CPU "
                  "(of all cores) | queue depth (images) | p99 ms |",
                  "|---:|---:|---:|---:|---:|---:|"]
        lines += [f"| {r['level']:.0%} ({r['offered_per_s']:.0f}/s) | {r['answered_per_s']:.0f}"
                  f" | {r['utilization']:.2f} | {r['cpu_fraction']:.2f} | "
                  f"{r['queue_depth']:.1f} | {r['p99_ms']:.0f} |" for r in m["levels"]]
        lines.append("")
    return "\n".join(lines)


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    models = results["models"]
    fig, axes = plt.subplots(1, len(models), figsize=(6.5 * len(models), 4.5), squeeze=False)
    for ax, (model, m) in zip(axes[0], models.items(), strict=True):
        rows = m["levels"]
        xs = [r["level"] for r in rows]
        cap = m["capacity_requests_per_s"]
        ax.plot(xs, [r["answered_per_s"] / cap for r in rows], "k-o", label="answered / capacity")
        ax.plot(xs, [r["utilization"] for r in rows], "-o", label="engine utilization")
        ax.plot(xs, [r["cpu_fraction"] for r in rows], "-s", label="server CPU (all cores)")
        ax.set(xlabel="offered load (fraction of capacity)", ylabel="fraction", ylim=(0, 1.6),
               title=f"{model}: {cap:.0f} requests/s capacity")
        right = ax.twinx()
        right.plot(xs, [r["p99_ms"] for r in rows], "r--x", label="p99 ms")
        right.plot(xs, [r["queue_depth"] for r in rows], "m:^", label="queue depth")
        right.set(yscale="symlog", ylabel="p99 ms / queue images")
        handles = ax.get_legend_handles_labels()
        extra = right.get_legend_handles_labels()
        ax.legend(handles[0] + extra[0], handles[1] + extra[1], fontsize=7, loc="upper left")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
