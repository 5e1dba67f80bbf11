"""``visionserve bench``: start the targets, interleave repeated levels, report medians.

Targets run side by side for the whole run (idle while another is measured), so every level of
every target is measured in each repeat, in the same order: a slow drift of the machine hits all
of them alike. The in-process ceiling is measured once per repeat too, with the servers idle.
"""

from __future__ import annotations

import argparse
import io
import platform
import shlex
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from visionserve.service.cli.mistakes import CommandError
from visionserve.service.format.model_config import ModelConfig
from visionserve.service.format.repository import MODEL_FILES, version_numbers
from visionserve.service.limits import cpu_count

from . import report
from .inprocess import InProcessEngine
from .launch import (
    LINKED_REPO,
    Launched,
    check_triton_python,
    checkout_env,
    default_triton_python,
    single_model_repo,
    start_triton,
    start_visionserve,
)
from .loadgen import ClientProcess, Job
from .schedule import median_run


@dataclass(frozen=True)
class Target:
    label: str  # visionserve | triton
    address: str
    batching: str  # on | off
    apis: tuple[str, ...]
    inputs: tuple[str, ...]
    variant: str = ""  # a named config variant of visionserve (--variant)
    http_address: str = ""  # its REST API (HOST:PORT), for the rest* apis


def run_bench(args: argparse.Namespace) -> int:
    """Start the targets (visionserve with batching on and off, its variants, the Triton peer),
    measure the in-process engine and each target side by side in one run, then report."""
    from rich.console import Console

    console = Console(width=None if sys.stdout.isatty() else 10_000)
    model_dir = args.repo / args.model
    versions = version_numbers(model_dir)
    if not versions:
        raise CommandError(f"no version of {args.model} in {args.repo}; run `visionserve "
                           f"export {args.model} --repo {args.repo}` first")
    config = ModelConfig.from_toml(model_dir / "config.toml")
    model_file = model_dir / str(versions[-1]) / MODEL_FILES["onnxruntime"]
    if "triton" in _split(args.peer or "") and not args.server:  # before any server starts
        check_triton_python(args.triton_python or default_triton_python())
    launched: list[Launched] = []
    workdir = Path(tempfile.mkdtemp(prefix="visionserve-bench-"))
    try:
        with console.status("starting servers…"):
            targets = _start_targets(args, config, model_file, workdir, launched)
        measured = _measure(args, console, config, model_file, targets)
    finally:
        for server in launched:
            server.stop()
    _report(args, console, *measured)
    return 0


def _start_targets(args: argparse.Namespace, config: ModelConfig, model_file: Path,
                   workdir: Path, launched: list[Launched]) -> list[Target]:
    """The servers to measure (each started one appended to ``launched``, to be stopped)."""
    inputs, apis = tuple(_split(args.input)), tuple(_split(args.api))
    batchings, peers = tuple(_split(args.batching)), tuple(_split(args.peer or ""))
    if args.server:
        return [Target("visionserve", args.server, "on", apis, inputs,
                       http_address=args.http_server or "")]
    targets = []
    for batching in batchings:
        repo = single_model_repo(args.repo, args.model, workdir / f"repo-{batching}",
                                 max_batch_size=None if batching == "on" else 1)
        server = start_visionserve(repo, "--model-control", "none", *LINKED_REPO,
                                   name=f"visionserve-batching-{batching}")
        launched.append(server)
        peer_apis = ("kserve",) if peers else ()
        targets.append(Target("visionserve", server.target, batching,
                              tuple(dict.fromkeys(apis + peer_apis)), inputs,
                              http_address=f"127.0.0.1:{server.http_port}"))
    variants = _variants(args.variant) + ([("baseline", {})] if args.baseline_checkout else [])
    for name, overrides in variants:
        repo = single_model_repo(args.repo, args.model, workdir / f"repo-{name}",
                                 overrides=overrides)
        env = checkout_env(args.baseline_checkout, workdir) if name == "baseline" else None
        server = start_visionserve(repo, "--model-control", "none", *LINKED_REPO,
                                   name=f"visionserve-{name}", env=env)
        launched.append(server)
        targets.append(Target("visionserve", server.target, "on", apis, inputs, variant=name,
                              http_address=f"127.0.0.1:{server.http_port}"))
    if "triton" in peers:
        python = args.triton_python or default_triton_python()
        for batching in batchings:
            for dtype in (i for i in inputs if i != "jpeg"):  # no decoder in the peer
                peer = start_triton(
                    python, model_file, args.model, input_name=config.input.name,
                    shape=config.input.shape, dtype=dtype, mean=config.input.mean,
                    std=config.input.std, batching=batching == "on",
                    max_batch_size=config.max_batch_size if batching == "on" else 1,
                    threads=config.onnxruntime.intra_op_threads or cpu_count())
                launched.append(peer)
                targets.append(Target("triton", peer.target, batching, ("kserve",), (dtype,)))
    return targets


def _measure(args: argparse.Namespace, console: Any, config: ModelConfig, model_file: Path,
             targets: list[Target]) -> tuple[dict[tuple[Any, ...], list[dict[str, Any]]],
                                             dict[str, list[float]], list[dict[str, Any]]]:
    """Each repeat: the in-process engine at each batch size, a health round trip, then every
    target × API × input at every concurrency and rate. Returns the raw rows, the in-process
    images/s and the round trips."""
    from rich.progress import Progress

    inputs = tuple(_split(args.input))
    jpegs = tuple(_photos(args.jpeg_dir)) if "jpeg" in inputs else ()
    levels = [("concurrency", int(c)) for c in _split(args.concurrency)] + \
        [("rate", float(r)) for r in _split(args.rate or "")]
    engine = InProcessEngine(model_file, config)
    raw: dict[tuple[Any, ...], list[dict[str, Any]]] = {}
    in_process: dict[str, list[float]] = {str(b): [] for b in engine.batch_sizes}
    round_trip: list[dict[str, Any]] = []
    combos = [(t, api, inp) for t in targets for api in t.apis for inp in t.inputs
              if _possible(api, inp)]
    total = args.repeats * (len(engine.batch_sizes) + len(levels) * len(combos))
    with Progress(console=console, transient=True) as progress, ClientProcess() as client:
        task = progress.add_task("bench", total=total)
        for repeat in range(args.repeats):
            step = f"[{repeat + 1}/{args.repeats}]"
            for b in engine.batch_sizes:
                progress.update(task, description=f"{step} in-process batch {b}")
                in_process[str(b)].append(engine.images_per_s(b, args.in_process_s))
                progress.advance(task)
            round_trip.append(client.run(Job(
                target=targets[0].address, label=targets[0].label, model=args.model,
                api="health", input="none", shape=config.input.shape, concurrency=1,
                duration_s=min(2.0, args.duration_s), warmup_s=0.2)))
            for kind, value in levels:
                for target, api, inp in combos:
                    progress.update(task, description=(
                        f"{step} {target.label} {api} {inp} batching {target.batching} "
                        f"{kind} {value:g}"))
                    row = client.run(Job(
                        target=target.address, label=target.label, model=args.model, api=api,
                        input=inp, shape=config.input.shape, input_name=config.input.name,
                        concurrency=int(value) if kind == "concurrency" else 0,
                        rate=float(value) if kind == "rate" else 0.0,
                        duration_s=args.duration_s, warmup_s=args.warmup_s,
                        images_per_request=args.images_per_request, jpegs=jpegs, seed=repeat,
                        http_target=target.http_address))
                    row["batching"] = target.batching
                    if target.variant:
                        row["variant"] = target.variant
                    raw.setdefault((target.label, target.variant, api, inp, target.batching,
                                    kind, value), []).append(row)
                    progress.advance(task)
    return raw, in_process, round_trip


def _report(args: argparse.Namespace, console: Any,
            raw: dict[tuple[Any, ...], list[dict[str, Any]]],
            in_process: dict[str, list[float]], round_trip: list[dict[str, Any]]) -> None:
    """Medians over the repeats, the ratios, the table; the JSON, markdown and plot files."""
    results: dict[str, Any] = {
        "model": args.model, "command": "visionserve " + shlex.join(sys.argv[1:]),
        "date": time.strftime("%Y-%m-%d %H:%M"), "duration_s": args.duration_s,
        "repeats": args.repeats, "runs": [median_run(rows) for rows in raw.values()],
        "in_process": {b: _median(v) for b, v in in_process.items()},
        "round_trip": {k: v for k, v in median_run(round_trip, "p50_ms").items()
                       if k in ("p50_ms", "p99_ms", "requests_per_s", "p50_ms_repeats")},
        "machine": _machine(tuple(_split(args.peer or "")))}
    results["ratios"] = report.compute_ratios(results["runs"], results["in_process"],
                                                results["round_trip"])
    report.print_table(console, results)
    written = report.save(args.json, results, args.markdown,
                          report.markdown(results) if args.markdown else "")
    if args.plot:
        report.plot(results, args.plot)
        written.append(args.plot)
    for path in written:
        console.print(f"wrote {path}")


def _possible(api: str, inp: str) -> bool:
    """rest-json carries no image files; rest-classify carries nothing else."""
    return not (api == "rest-json" and inp == "jpeg") and \
        not (api == "rest-classify" and inp != "jpeg")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True, help="model name in the repository")
    p.add_argument("--repo", type=Path, default=Path("model_repo"))
    p.add_argument("--server", help="HOST:PORT of a running server to measure instead of "
                                    "starting one per --batching mode (the default, --start)")
    p.add_argument("--start", action="store_true",
                   help="start the servers here (the default when --server is not given)")
    p.add_argument("--input", default="float32",
                   help="comma-separated: float32 and/or uint8 raw tensors (one 224² image "
                        "each), jpeg (640×480 photos, decoded server-side)")
    p.add_argument("--api", default="classify",
                   help="comma-separated: classify (our Classify, top-5), kserve (KServe v2 "
                        "ModelInfer through tritonclient.grpc, logits), rest (the same over "
                        "HTTP through tritonclient.http, binary tensor data), rest-json (JSON "
                        "tensors), rest-classify (a JPEG as the body of POST "
                        "/v2/models/<m>/classify; jpeg input)")
    p.add_argument("--http-server", metavar="HOST:PORT",
                   help="with --server: the running server's HTTP port, for the rest apis")
    p.add_argument("--concurrency", default="1,4,8,16,32,64",
                   help="closed-loop levels: requests kept in flight")
    p.add_argument("--rate", default="",
                   help="open-loop levels: Poisson arrivals per second (latency counted from "
                        "each request's intended send time)")
    p.add_argument("--duration-s", type=float, default=10.0, help="seconds per level")
    p.add_argument("--warmup-s", type=float, default=2.0,
                   help="unrecorded load before each level")
    p.add_argument("--repeats", type=int, default=3,
                   help="repeat every level; the median run is reported")
    p.add_argument("--in-process-s", type=float, default=3.0,
                   help="seconds per batch size of the in-process ceiling")
    p.add_argument("--batching", default="on,off",
                   help="comma-separated: on (the model's config) and/or off (the same "
                        "server with max_batch_size = 1)")
    p.add_argument("--peer", default="",
                   help="triton: also serve the same ONNX file with the real tritonserver "
                        "bundled in nvidia-pytriton (Python backend + dynamic batcher), driven "
                        "by the same client via KServe v2")
    p.add_argument("--triton-python", type=Path,
                   help="python of a venv with nvidia-pytriton (default: "
                        "$ANCHORS_DIR/venv-triton/bin/python)")
    p.add_argument("--variant", action="append", default=[], metavar="NAME:KEY=VALUE;...",
                   help="also serve a config variant side by side, e.g. "
                        "'2x1:instance_count=2;onnxruntime.intra_op_threads=1' (repeatable)")
    p.add_argument("--baseline-checkout", type=Path, metavar="DIR",
                   help="also serve the model with the server code of this checkout (e.g. `git "
                        "worktree add /tmp/prev HEAD~1`), as the variant 'baseline', measured "
                        "in the same repeats: its <level>_baseline_vs_default ratio is "
                        "before ÷ after")
    p.add_argument("--images-per-request", type=int, default=1)
    p.add_argument("--jpeg-dir", type=Path,
                   help="photos for --input jpeg (default: scikit-image's sample photos "
                        "resized to 640×480)")
    p.add_argument("--json", type=Path, help="write the results here")
    p.add_argument("--plot", type=Path, help="write a PNG plot here")
    p.add_argument("--markdown", type=Path, help="write a docs/benchmarks.md section here")


def _variants(specs: list[str]) -> list[tuple[str, dict[str, str]]]:
    out = []
    for spec in specs:
        name, _, body = spec.partition(":")
        pairs = [kv.split("=", 1) for kv in body.split(";") if kv.strip()]
        if not name or not pairs or any(len(p) != 2 for p in pairs):
            raise SystemExit(f"--variant {spec!r}: expected NAME:KEY=VALUE;KEY=VALUE")
        out.append((name, {k.strip(): v.strip() for k, v in pairs}))
    return out


def _split(text: str) -> list[str]:
    return [x.strip() for x in text.split(",") if x.strip()]


def _median(values: list[float]) -> float:
    ordered = sorted(values)
    return round(ordered[(len(ordered) - 1) // 2], 2)


def _photos(folder: Path | None) -> list[bytes]:
    """Real photos as 640×480 JPEGs (quality 90), or the files of ``folder`` unchanged."""
    if folder is not None:
        files = sorted(p for p in folder.iterdir() if p.suffix.lower() in (".jpg", ".jpeg"))
        if not files:
            raise SystemExit(f"no .jpg files in {folder}")
        return [p.read_bytes() for p in files]
    from PIL import Image

    from .decoders import sample_photos

    out = []
    for photo in sample_photos():
        buf = io.BytesIO()
        Image.fromarray(photo).resize((640, 480), Image.Resampling.BICUBIC).save(
            buf, "JPEG", quality=90)
        out.append(buf.getvalue())
    return out


def _machine(peers: tuple[str, ...]) -> dict[str, object]:
    import grpc
    import numpy
    import onnxruntime

    cpu = "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {"cores": cpu_count(), "cpu": cpu, "python": platform.python_version(),
            "onnxruntime": onnxruntime.__version__, "grpcio": grpc.__version__,
            "numpy": numpy.__version__, "peers": list(peers)}
