"""The benchmark's commands: ``visionserve bench``, ``bench-overload`` and ``bench-decode``.

``visionserve.service.cli`` hands these commands and their arguments to :func:`main` only after
checking that the ``bench`` extra is installed, so the server never imports this package.
"""

from __future__ import annotations

import argparse
import shlex
import sys
import textwrap
from importlib import import_module
from pathlib import Path

from visionserve.service.cli import BENCH_COMMANDS as COMMANDS
from visionserve.service.cli import EXIT_CODES, env_defaults
from visionserve.service.cli.main import DefaultsHelp
from visionserve.service.cli.mistakes import CommandError

DESCRIPTIONS = {
    "bench": "Starts the model's server with batching on and off (or measures --server), "
             "optionally Triton (--peer triton), and drives them with one load generator in its "
             "own process: closed loop at --concurrency levels, open loop (Poisson) at --rate "
             "levels. Each level is repeated (--repeats, median reported) with the targets "
             "interleaved, beside the same model file in an in-process ONNX Runtime session at "
             "batch 1..max. Prints a table and ratios; writes JSON, a PNG plot and a markdown "
             "section on request.",
    "bench-overload": "Measures the model's capacity, then offers Poisson load at half of it, "
                      "at --factor times it, and at half again; reports per phase the admitted "
                      "and refused rates, how fast refusals come back, admitted latency "
                      "percentiles, and the server's RSS and queue depth (docs/benchmarks.md, "
                      "Overload).",
    "bench-attacks": "Starts a server and sends it one request of each class of hostile input "
                     "(requested outputs, repeated fields, typed contents, decode cost, echoed "
                     "strings); per request: its status and how fast it came, the server's RSS "
                     "and threads before, at their peak and after, and the slowest of the "
                     "health checks sent meanwhile (docs/security.md). Exits 1 if any status "
                     "differs from the expected one or the server died.",
    "bench-int8": "Exports --model (real default weights) at FP32 and at INT8, calibrated on "
                  "seeded crops and flips of half of the photos in scikit-image's and "
                  "matplotlib's wheels, and reports top-1 and top-5 agreement of INT8 with "
                  "FP32 on ≥ 100 crops and flips of the other half (never calibrated on). Needs "
                  "the 'export' extra too.",
    "bench-ladder": "For each of --models: ONNX Runtime FP32, OpenVINO FP32, OpenVINO BF16 "
                    "(where the CPU has it), ONNX Runtime INT8 and OpenVINO INT8, exported into "
                    "--repo where missing and served side by side by one server; one load "
                    "generator drives each rung at each --concurrency, interleaved and repeated "
                    "(median reported), beside each rung's in-process engine (the server's own "
                    "backend, same config); plus each rung's top-1/top-5 agreement with ONNX "
                    "Runtime FP32 on crops and flips of real photos. Needs the 'export' and "
                    "'openvino' extras too.",
    "bench-fleet": "Starts two fleets of --replicas servers of --model with ORCA load reports "
                   "(an even one, and one whose last replica is slowed by --slow config "
                   "overrides) and drives each through one gRPC channel over its replicas, "
                   "closed loop: the even fleet with round_robin, the slow one with round_robin "
                   "and with weighted_round_robin; calls/s, p50, p99 and each replica's share "
                   "(docs/deploy.md).",
    "bench-signal": "For each of --models: measures its capacity (closed loop c16), then offers "
                    "Poisson load at each --levels fraction of it; per level, from the level's "
                    "second half: the engine-utilization gauge, the server's CPU (of all cores), "
                    "the batching queue's depth, the answered rate and p99 (docs/metrics.md, "
                    "Engine utilization).",
    "bench-store": "Starts moto's S3 server on loopback and uploads the newest version of each "
                   "of --models into it. Per model: start-up to SERVING from the local folder, "
                   "from the store with an empty cache and with the cache warm (--repeats, "
                   "median); the time from a new version's manifest upload to --servers "
                   "servers sharing the bucket serving it; and the CPU and memory of the "
                   "sha256 verification (docs/deploy.md). Needs moto's server (the dev "
                   "extra, or pip install 'moto[s3,server]').",
    "bench-decode": "For photo sizes (640x480, 1920x1080 by default): images/s per core of each "
                    "decoder (Pillow exact = the reference, Pillow draft, Pillow reducing_gap, "
                    "simplejpeg, OpenCV) and its top-1/top-5 agreement with the reference "
                    "through --model, on real sample photos.",
}
EXAMPLES = {
    "bench-ladder": "example:\n  visionserve bench-ladder --models resnet50,mobilenet_v3_small "
                    "--concurrency 1,8 --json docs/bench/ladder.json\n\n",
    "bench": "example:\n  visionserve bench --model resnet50 --concurrency 1,4,16,64 --peer "
             "triton --json bench/results/resnet50.json --plot docs/img/resnet50.png\n\n",
}


# each command's module (its add_arguments) and the function that runs it; bench-decode is here
MODULES = {
    "bench": ("run", "run_bench"),
    "bench-overload": ("overload", "run_overload"),
    "bench-attacks": ("attacks", "run_attacks"),
    "bench-int8": ("int8", "run_int8"),
    "bench-ladder": ("ladder", "run_ladder"),
    "bench-fleet": ("fleet", "run_fleet"),
    "bench-signal": ("load_signal", "run_signal"),
    "bench-store": ("store", "run_store"),
}


class _Help(argparse.RawDescriptionHelpFormatter, DefaultsHelp):
    """The description as written (its example command line), each option's default shown."""


def build_parser(command: str) -> argparse.ArgumentParser:
    """The parser of one bench command, named as the user typed it (``visionserve bench``)."""
    if command not in COMMANDS:
        raise ValueError(f"not a bench command: {command!r} (one of {', '.join(COMMANDS)})")
    p = argparse.ArgumentParser(  # raw: the example's command line must not be re-wrapped
        prog=f"visionserve {command}", description=textwrap.fill(DESCRIPTIONS[command], 79),
        formatter_class=_Help, allow_abbrev=False,  # --model is not bench-ladder's --models
        epilog=EXAMPLES.get(command, "") + textwrap.fill(EXIT_CODES, 79))
    if command in MODULES:  # imported when run: each pulls its own dependencies
        import_module(f".{MODULES[command][0]}", __package__).add_arguments(p)
    else:  # bench-decode
        p.add_argument("--model", default="resnet50",
                       help="model whose input spec and predictions are used (newest version)")
        p.add_argument("--repo", type=Path, default=Path("model_repo"))
        p.add_argument("--sizes", default="640x480,1920x1080", help="WxH,...")
        p.add_argument("--seconds", type=float, default=2.0,
                       help="CPU seconds per decoder and size")
        p.add_argument("--json", type=Path)
        p.add_argument("--markdown", type=Path)
    env_defaults(p)
    return p


def main(command: str, argv: list[str]) -> int:
    from visionserve.export.errors import ExportError, ExportErrorCode

    args = build_parser(command).parse_args(argv)
    try:
        return _run(command, args)
    except ExportError as exc:  # an architecture or flag the export stage refused
        if exc.code is not ExportErrorCode.USAGE:
            raise
        raise CommandError(str(exc)) from None


def _run(command: str, args: argparse.Namespace) -> int:
    if command in MODULES:
        module, run = MODULES[command]
        return getattr(import_module(f".{module}", __package__), run)(args)
    return _bench_decode(args)


def _bench_decode(args: argparse.Namespace) -> int:
    from rich.console import Console

    from visionserve.service.format.model_config import ModelConfig
    from visionserve.service.format.model_format import CONFIG_FILE, MODEL_FILES
    from visionserve.service.format.repository import version_numbers

    from .decoders import markdown, run_decode_bench
    from .report import save

    console = Console()
    model_dir = args.repo / args.model
    versions = version_numbers(model_dir)
    if not versions:
        raise CommandError(f"no version of {args.model} in {args.repo}; run `visionserve "
                           f"export {args.model} --repo {args.repo}` first")
    config = ModelConfig.from_toml(model_dir / CONFIG_FILE)
    sizes = [tuple(int(v) for v in s.split("x")) for s in args.sizes.split(",")]
    with console.status("decoding…") as status:
        results = run_decode_bench(model_dir / str(versions[-1]) / MODEL_FILES["onnxruntime"],
                                   config.input, sizes, args.seconds,  # type: ignore[arg-type]
                                   progress=lambda text: status.update(f"decoding: {text}"))
    text = markdown(results, "visionserve " + shlex.join(sys.argv[1:]))
    console.print(text)
    save(args.json, results, args.markdown, text)
    return 0
