"""``visionserve bench-overload``: open-loop load at a multiple of capacity, and the way back.

Starts the model's server, measures its capacity (closed loop), then offers Poisson load in three
back-to-back phases: ``before`` (half of capacity), ``overload`` (``--factor`` x capacity) and
``after`` (half again). For each phase: offered and admitted rates, refusals by status and how
fast they came back, latency percentiles of the admitted requests, and — sampled from the
server process every 0.25 s — its RSS and batching-queue depth. The question it answers: is the
queue bounded, is the excess refused quickly (not after a timeout), do admitted requests keep a
bounded p99, does memory stay flat, and is the server back to normal at once when load drops?
"""

from __future__ import annotations

import argparse
import shlex
import sys
import tempfile
import threading
import urllib.request
from pathlib import Path

from visionserve.service.format.model_config import ModelConfig

from . import report
from .launch import LINKED_REPO, rss_mb, single_model_repo, start_visionserve
from .loadgen import ClientProcess, Job

PHASES = (("before", 0.5), ("overload", None), ("after", 0.5))  # None: --factor


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default="mobilenet_v3_small")
    p.add_argument("--repo", type=Path, default=Path("model_repo"))
    p.add_argument("--input", choices=["uint8", "float32", "jpeg"], default="uint8")
    p.add_argument("--api", choices=["kserve", "classify"], default="kserve")
    p.add_argument("--factor", type=float, default=2.0, help="overload = factor x capacity")
    p.add_argument("--capacity", type=float, default=0.0,
                   help="requests/s the server sustains (0 = measure it, closed loop c16)")
    p.add_argument("--duration-s", type=float, default=20.0, help="length of the overload")
    p.add_argument("--calm-s", type=float, default=10.0,
                   help="length of the phases before and after it (and of the capacity run)")
    p.add_argument("--deadline-ms", type=float, default=0.0,
                   help="deadline carried by every call (0 = none, i.e. 60 s)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="config.toml override of the served model, e.g. "
                        "batching.max_queue_size=256 (repeatable)")
    p.add_argument("--serve-args", default="",
                   help="extra `visionserve serve` flags, e.g. '--max-concurrent-rpcs 256'")
    p.add_argument("--json", type=Path)
    p.add_argument("--markdown", type=Path)


def run_overload(args: argparse.Namespace) -> int:
    from rich.console import Console

    console = Console(width=None if sys.stdout.isatty() else 10_000)
    overrides = dict(kv.split("=", 1) for kv in args.set)
    workdir = Path(tempfile.mkdtemp(prefix="visionserve-overload-"))
    repo = single_model_repo(args.repo, args.model, workdir, overrides=overrides)
    spec = ModelConfig.from_toml(repo / args.model / "config.toml").input
    job = Job(target="", label="visionserve", model=args.model, api=args.api, input=args.input,
              shape=spec.shape, input_name=spec.name, timeout_s=args.deadline_ms / 1000)
    with console.status("starting the server…"):
        server = start_visionserve(repo, *LINKED_REPO, *shlex.split(args.serve_args),
                                   log_path=workdir / "server.log")
    job = _with(job, target=server.target)
    sampler = Sampler(server.process.pid, server.metrics_port, args.model)
    phases: list[dict[str, object]] = []
    try:
        with ClientProcess() as client:
            capacity = args.capacity
            if not capacity:
                with console.status(f"measuring capacity (closed loop c16, {args.calm_s:.0f} s)"):
                    row = client.run(_with(job, concurrency=16, duration_s=args.calm_s))
                capacity = float(row["requests_per_s"])  # type: ignore[arg-type]
            console.print(f"capacity: {capacity:.0f} requests/s")
            sampler.start()
            for i, (name, factor) in enumerate(PHASES):
                rate = capacity * (factor or args.factor)
                length = args.duration_s if factor is None else args.calm_s
                with console.status(f"{name}: {rate:.0f} requests/s for {length:.0f} s"):
                    sampler.phase = name
                    row = client.run(_with(job, rate=rate, duration_s=length,
                                           warmup_s=2.0 if i == 0 else 0.0, seed=i))
                phases.append({"phase": name, **row, **sampler.summary(name)})
    finally:
        sampler.stop()
        server.stop()
    result = {"command": "visionserve bench-overload " + shlex.join(sys.argv[2:]),
              "model": args.model, "input": args.input, "api": args.api,
              "capacity_requests_per_s": capacity, "factor": args.factor,
              "deadline_ms": args.deadline_ms, "overrides": overrides,
              "serve_args": args.serve_args, "phases": phases}
    text = markdown(result)
    console.print(text)
    report.save(args.json, result, args.markdown, text)
    return 0


def markdown(result: dict[str, object]) -> str:
    lines = [f"`{result['command']}` — capacity {result['capacity_requests_per_s']:.0f} "
             "requests/s (closed loop c16)", "",
             "| phase | offered/s | admitted/s | refused/s (codes) | admitted p50 / p99 ms | "
             "refusal p50 / p99 ms | max queue (images) | RSS min-max MB | client CPU |",
             "|---|---|---|---|---|---|---|---|---|"]
    for p in result["phases"]:  # type: ignore[attr-defined]
        seconds = float(p["requests"]) / max(float(p["requests_per_s"]), 1e-9) \
            if p["requests"] else 1.0
        refused = float(p["errors"]) / seconds
        codes = ", ".join(f"{k} {v}" for k, v in sorted(p["error_codes"].items())) or "none"
        err = p["error_latency"]
        lines.append(
            f"| {p['phase']} | {p['offered_per_s']:.0f} | {p['requests_per_s']:.0f} | "
            f"{refused:.0f} ({codes}) | {p['p50_ms']:.1f} / {p['p99_ms']:.1f} | "
            f"{err['p50_ms']:.1f} / {err['p99_ms']:.1f} | {p['max_queue_images']:.0f} | "
            f"{p['rss_min_mb']:.0f}-{p['rss_max_mb']:.0f} | {p['client_cpu']:.2f} |")
    examples: dict[str, str] = {}
    for p in result["phases"]:  # type: ignore[attr-defined]
        for code, text in dict(p.get("error_examples") or {}).items():
            examples.setdefault(code, text)
    if examples:
        lines += ["", "The first refusal of each code said:", ""]
        lines += [f"- {code}: {text}" for code, text in sorted(examples.items())]
    return "\n".join(lines) + "\n"


class Sampler:
    """The server's RSS (from /proc) and queue depth (from /metrics), every 0.25 s, by phase."""

    def __init__(self, pid: int, metrics_port: int, model: str) -> None:
        self._pid, self._url, self._model = pid, f"http://127.0.0.1:{metrics_port}/metrics", model
        self.phase = ""
        self.samples: list[tuple[str, float, float]] = []  # phase, rss MB, queue images
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join()

    def summary(self, phase: str) -> dict[str, float]:
        mine = [s for s in self.samples if s[0] == phase] or [(phase, 0.0, 0.0)]
        return {"rss_min_mb": min(s[1] for s in mine), "rss_max_mb": max(s[1] for s in mine),
                "max_queue_images": max(s[2] for s in mine)}

    def _loop(self) -> None:
        while not self._stop.wait(0.25):
            try:
                self.samples.append((self.phase, rss_mb(self._pid), self._queue()))
            except (OSError, ValueError):
                return  # the server is gone

    def _queue(self) -> float:
        with urllib.request.urlopen(self._url, timeout=5) as reply:
            text = reply.read().decode()
        prefix = f'visionserve_queue_depth{{model="{self._model}"'
        return sum(float(line.rpartition(" ")[2]) for line in text.splitlines()
                   if line.startswith(prefix))


def _with(job: Job, **changes: object) -> Job:
    import dataclasses

    return dataclasses.replace(job, **changes)  # type: ignore[arg-type]
