"""``visionserve bench-fleet``: balancing on the load signal against round robin, one slow replica.

Starts two fleets of ``--replicas`` servers of ``--model`` on loopback, every server with
``--orca-load-reports``: an even fleet, and one whose last replica is made slower by the
``--slow`` config overrides (default: one intra-op thread and batches of one). One load
generator (its own process) drives each case through one gRPC channel over the fleet's
replicas, closed loop at ``--concurrency``, ``--repeats`` times, the cases interleaved:

- even fleet, ``round_robin`` (the reference);
- slow fleet, ``round_robin``: every replica gets the same share, the slow one holds calls back;
- slow fleet, ``weighted_round_robin``: gRPC's load-aware policy, weighing each replica by its
  call rate ÷ its engine utilization (the ORCA reports the servers attach).

For each: answered calls/s, p50 and p99 (medians over the repeats) and each replica's share of
the calls (from its own metrics).
"""

from __future__ import annotations

import argparse
import json
import shlex
import statistics
import sys
import tempfile
import urllib.request
from pathlib import Path

from visionserve.service.cli.mistakes import CommandError
from visionserve.service.format.model_config import ModelConfig

from . import report
from .launch import LINKED_REPO, Launched, single_model_repo, start_visionserve
from .loadgen import ClientProcess, Job

SLOW = "onnxruntime.intra_op_threads=1,max_batch_size=1"
POLICIES = ("round_robin", "weighted_round_robin")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default="resnet18")
    p.add_argument("--repo", type=Path, default=Path("model_repo"))
    p.add_argument("--replicas", type=int, default=3)
    p.add_argument("--slow", default=SLOW,
                   help="config.toml overrides (KEY=VALUE, comma-separated) of the slow replica")
    p.add_argument("--concurrency", type=int, default=8, help="calls in flight (closed loop)")
    p.add_argument("--duration-s", type=float, default=15.0)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--json", type=Path)
    p.add_argument("--markdown", type=Path)


def run_fleet(args: argparse.Namespace) -> int:
    from rich.console import Console

    console = Console(stderr=True)
    if args.replicas < 2 or args.repeats < 1:
        raise CommandError(f"--replicas {args.replicas} --repeats {args.repeats}: a fleet has at "
                           "least 2 replicas, and each case runs at least once")
    if not all("=" in kv for kv in args.slow.split(",")):
        raise CommandError(f"--slow {args.slow}: give KEY=VALUE overrides, comma-separated "
                           f"(e.g. {SLOW})")
    work = Path(tempfile.mkdtemp(prefix="visionserve-fleet-"))
    normal = single_model_repo(args.repo, args.model, work / "normal")
    slow = single_model_repo(args.repo, args.model, work / "slow",
                             overrides=dict(kv.split("=", 1) for kv in args.slow.split(",")))
    spec = ModelConfig.from_toml(normal / args.model / "config.toml").input
    fleets: dict[str, list[Launched]] = {}
    try:
        with console.status(f"starting two fleets of {args.replicas}"):
            for name, last in (("even", normal), ("slow", slow)):
                fleets[name] = [_start(normal if i < args.replicas - 1 else last,
                                       work / f"{name}{i}.log") for i in range(args.replicas)]
        runs: dict[str, list[dict]] = {}
        with ClientProcess() as client:
            for repeat in range(args.repeats):
                for fleet, policy in (("even", "round_robin"), *(("slow", p) for p in POLICIES)):
                    case = f"{fleet} fleet, {policy}"
                    with console.status(f"{case} (repeat {repeat + 1} of {args.repeats})"):
                        runs.setdefault(case, []).append(
                            _run(client, fleets[fleet], policy, args, spec))
                    console.print(f"{case}: {runs[case][-1]['requests_per_s']:.1f}/s, p99 "
                                  f"{runs[case][-1]['p99_ms']:.0f} ms")
    finally:
        for servers in fleets.values():
            for s in servers:
                s.stop()
    result = {"command": "visionserve bench-fleet " + shlex.join(sys.argv[2:]),
              "model": args.model, "replicas": args.replicas, "slow": args.slow,
              "concurrency": args.concurrency, "cases": {c: _median(r) for c, r in runs.items()},
              "runs": runs}
    text = markdown(result)
    sys.stdout.write(text)
    report.save(args.json, result, args.markdown, text)
    return 0


def _start(repo: Path, log: Path) -> Launched:
    return start_visionserve(repo, *LINKED_REPO, "--orca-load-reports", log_path=log)


def _run(client: ClientProcess, servers: list[Launched], policy: str,
         args: argparse.Namespace, spec) -> dict:
    config = {"loadBalancingConfig": [{policy: {"blackoutPeriod": "1s"}
                                       if policy == "weighted_round_robin" else {}}]}
    target = "ipv4:" + ",".join(f"127.0.0.1:{s.grpc_port}" for s in servers)
    before = [_calls(s) for s in servers]
    row = client.run(Job(target=target, label=policy, model=args.model, api="classify",
                         input="uint8", shape=spec.shape, input_name=spec.name,
                         concurrency=args.concurrency, duration_s=args.duration_s,
                         warmup_s=2.0,
                         channel_options=(("grpc.service_config", json.dumps(config)),)))
    calls = [_calls(s) - b for s, b in zip(servers, before, strict=True)]
    return {"requests_per_s": row["requests_per_s"], "p50_ms": row["p50_ms"],
            "p99_ms": row["p99_ms"], "errors": row["errors"],
            "share": [c / max(sum(calls), 1) for c in calls]}


def _calls(server: Launched) -> float:
    with urllib.request.urlopen(f"http://127.0.0.1:{server.metrics_port}/metrics",
                                timeout=10) as reply:
        text = reply.read().decode()
    return sum(float(line.rpartition(" ")[2]) for line in text.splitlines()
               if line.startswith("visionserve_request_duration_seconds_count{")
               and 'method="Classify"' in line)


def _median(runs: list[dict]) -> dict:
    return {key: statistics.median(r[key] for r in runs)
            for key in ("requests_per_s", "p50_ms", "p99_ms", "errors")} | {
        "share": [statistics.median(r["share"][i] for r in runs)
                  for i in range(len(runs[0]["share"]))]}


def markdown(result: dict) -> str:
    even = result["cases"]["even fleet, round_robin"]
    lines = [f"`{result['command']}`: {result['replicas']} replicas of {result['model']}, the "
             f"slow one with {result['slow']}; closed loop c{result['concurrency']}; medians of "
             f"{len(next(iter(result['runs'].values())))} interleaved repeats", "",
             "| fleet, policy | calls/s | p50 ms | p99 ms | p99 ÷ even fleet's | share of calls "
             "(the slow replica last) |", "|---|---:|---:|---:|---:|---|"]
    for case, m in result["cases"].items():
        lines.append(f"| {case} | {m['requests_per_s']:.1f} | {m['p50_ms']:.0f} | "
                     f"{m['p99_ms']:.0f} | {m['p99_ms'] / even['p99_ms']:.2f} | "
                     + " / ".join(f"{s:.0%}" for s in m["share"]) + " |")
    return "\n".join(lines) + "\n"
