"""The ``visionserve`` command: serve, export, classify, embed, models, health, bench.

Every flag can also come from the environment as ``VISIONSERVE_<FLAG>`` (``--grpc-port`` →
``VISIONSERVE_GRPC_PORT``); a flag on the command line wins. Each command imports what it needs
when it runs: the export stage (and PyTorch) only for ``export``, the benchmark package
(``visionserve.bench``, the ``bench`` extra) only for the ``bench*`` commands, whose arguments
it parses itself.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
from pathlib import Path
from typing import TYPE_CHECKING

from .. import install_hint, package_version
from ..errors import ConfigError
from ..settings import env_name
from .mistakes import CommandError
from .terminal import OUTPUT_FORMATS

if TYPE_CHECKING:
    pass

log = logging.getLogger("visionserve")
Subcommands = argparse._SubParsersAction  # what add_subparsers returns

EXIT_CODES = ("exit status: 0 ok, 1 failed (a call, a check or an export failed), 2 usage "
              "(bad flags, missing extra, nothing to do), 130 interrupted (Ctrl-C)")
# The benchmark's commands (visionserve.bench.cli parses their arguments): command -> summary.
BENCH_COMMANDS = {
    "bench": "served throughput/latency beside the in-process engine and a peer",
    "bench-overload": "open-loop load at 2x capacity: shedding, p99, memory, recovery",
    "bench-decode": "JPEG decode+resize+normalize speed and accuracy per decoder",
    "bench-attacks": "each class of hostile request: status, memory, threads, health latency",
    "bench-int8": "INT8 vs FP32 top-1/top-5 agreement of a real-weights model on real photos",
    "bench-ladder": "the CPU precision ladder (ORT/OpenVINO FP32, BF16, INT8) served and "
                    "in-process, with agreement",
    "bench-fleet": "round robin vs load-aware balancing (ORCA) over N replicas, one slow",
    "bench-signal": "offered load from 0.1 to 1.5 x capacity vs engine utilization, CPU, "
                    "queue depth and p99: the autoscaling signal",
    "bench-store": "a repository in object storage (loopback S3): start-ups, publish → served "
                   "on N servers, verification cost",
}


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, rest = parser.parse_known_args(argv)
    if rest and args.command not in BENCH_COMMANDS:
        args.command_parser.error(f"unrecognized arguments: {' '.join(rest)}")
    from ..logs import configure

    configure(args.log_level)
    try:
        if args.command in BENCH_COMMANDS:
            return _bench(args.command, rest)
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        return 130
    except CommandError as exc:
        log.error("%s", exc)
        return 2
    except ConfigError as exc:  # a repository or config.toml the command was pointed at
        log.error("%s", exc)
        return 2
    except (FileNotFoundError, IsADirectoryError, NotADirectoryError, PermissionError) as exc:
        if exc.filename is None:  # not a path the user named: a fault, with its traceback
            raise
        log.error("%s%s: %s", exc.filename, f" -> {exc.filename2}" if exc.filename2 else "",
                  exc.strerror or exc)
        return 2


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="visionserve",
        description="Serve image classifiers over gRPC (ONNX Runtime), export them from "
                    "PyTorch, and call them. Every flag may also be set as an environment "
                    "variable VISIONSERVE_<FLAG>, e.g. VISIONSERVE_GRPC_PORT=9001. "
                    "Logs and progress go to stderr; results to stdout.",
        epilog=EXIT_CODES)
    parser.add_argument("--version", action="version", version=f"visionserve {package_version()}")
    parser.add_argument("--log-level", default="info",
                        choices=["debug", "info", "warning", "error"])
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for add in (_add_serve, _add_export, _add_train_digits, _add_client_commands):
        add(sub)

    for command, summary in BENCH_COMMANDS.items():  # parsed by visionserve.bench.cli
        sub.add_parser(command, help=summary + " (the 'bench' extra; "
                                               f"`visionserve {command} --help`)",
                       add_help=False, prefix_chars="\0")

    for name, action_parser in sub.choices.items():
        if name not in BENCH_COMMANDS:
            action_parser.epilog = action_parser.epilog or EXIT_CODES
            action_parser.set_defaults(command_parser=action_parser)
            action_parser.formatter_class = DefaultsHelp
            if name != "serve":  # serve's flags read their variables themselves
                env_defaults(action_parser, name)
    env_defaults(parser)
    return parser




def _add_serve(sub: Subcommands) -> None:
    """`serve`: its flags are generated from the settings ServerConfig declares."""
    from .serve_flags import add_serve_flags

    p = sub.add_parser("serve", help="serve every model of a repository over gRPC and HTTP",
                       description="Load every model/version of the repository (ONNX Runtime on "
                                   "CPU by default) and serve Classify/Embed and KServe v2 over "
                                   "gRPC and HTTP/REST with dynamic batching; Prometheus "
                                   "metrics over HTTP. Stops gracefully on SIGTERM/SIGINT.")
    add_serve_flags(p)  # generated from the settings ServerConfig declares
    p.set_defaults(func=_serve)


def _add_export(sub: Subcommands) -> None:
    """`export` (the export stage runs it: visionserve.export.cli)."""
    p = sub.add_parser("export", help="export a PyTorch architecture to a new ONNX version",
                       description="Build ARCH with its weights, export it to ONNX with "
                                   "outputs logits and embedding, check parity against "
                                   "PyTorch, and publish it atomically as a new version in the "
                                   "repository. Weights: --weights PATH; else the "
                                   "architecture's default where it has one (real ImageNet "
                                   "weights for efficientnet_lite0/1/2, LeNet-5 trained on "
                                   "scikit-learn's digits); else seeded random init with its "
                                   "BatchNorm statistics re-estimated so that the outputs "
                                   "depend on the input. Needs the 'export' extra.")
    p.add_argument("arch", nargs="*", help="architecture name(s), e.g. resnet50")
    p.add_argument("--repo", type=Path, default=Path("model_repo"),
                   help="the repository: a folder, or s3://BUCKET/PREFIX (gs://, az://): the "
                        "version is uploaded there, its manifest last; credentials from the "
                        "cloud's environment (docs/deploy.md)")
    p.add_argument("--name", help="model name in the repository (default: the architecture's)")
    p.add_argument("--version", type=int, help="version number (default: next free)")
    p.add_argument("--weights", type=Path,
                   help="local state_dict / checkpoint (.pt/.pth); efficientnet_pytorch "
                        "checkpoints of EfficientNet-Lite are converted")
    p.add_argument("--random-weights", action="store_true",
                   help="seeded random init even for architectures with default weights")
    p.add_argument("--seed", type=int, default=0,
                   help="seed of the random init, of LeNet-5's training and of the checks")
    p.add_argument("--num-classes", type=int, help="classes of a fine-tuned head")
    p.add_argument("--labels", type=Path, help="labels file, one class name per line")
    p.add_argument("--if-missing", action="store_true",
                   help="skip architectures that already have a version in the repository")
    p.add_argument("--list", action="store_true", help="list the known architectures")
    _output_flag(p, "of --list")
    p.add_argument("--all", action="store_true", help="export every known architecture")
    p.add_argument("--skip-heavy", action="store_true",
                   help="with --all: leave out the architectures --list marks heavy (ViT-H/14: "
                        "a 2.5 GB model, seconds per image on a CPU, ~3 min and ~6 GB to "
                        "export), as the CI sweep does")
    p.add_argument("--precision", choices=["fp32", "fp16", "bf16", "int8"], default="fp32",
                   help="fp16: FP16 weights and compute (for GPU providers; I/O stays FP32); "
                        "bf16: the FP32 file, served by OpenVINO in BF16 (implies --backend "
                        "openvino; needs a CPU with AVX512_BF16 or AMX, here and where it "
                        "serves); int8: static QDQ quantization calibrated on --calibration "
                        "images (fastest on CPU). Each is parity-checked on the engine that "
                        "will serve it (README: which to pick)")
    p.add_argument("--backend", choices=["onnxruntime", "openvino"], default=None,
                   help="the engine the model folder's config.toml names, on which parity and "
                        "the golden set are computed (default: onnxruntime; openvino for "
                        "--precision bf16). One model name per backend: exporting into a "
                        "folder configured for another engine is refused")
    p.add_argument("--format", choices=["onnx", "tensorrt"], default="onnx",
                   help="tensorrt: also build a TensorRT engine (model.plan, needs a GPU and "
                        "visionserve[gpu]) from the checked ONNX model; with --precision fp16 "
                        "the engine is built with TensorRT's FP16 flag")
    p.add_argument("--calibration", type=Path, metavar="DIR",
                   help="int8: a folder of representative JPEG/PNG/WebP images (default: "
                        "seeded noise, a weak fallback)")
    p.add_argument("--report", type=Path, metavar="PATH",
                   help="after exporting, write a markdown table of every exported "
                        "architecture (parity, size, ORT CPU speed), e.g. docs/models.md")
    p.set_defaults(func=_export)


def _add_train_digits(sub: Subcommands) -> None:
    """`train-digits` (LeNet-5 on scikit-learn's digits)."""
    p = sub.add_parser("train-digits", help="train LeNet-5 on scikit-learn's digits (seconds)",
                       description="Train LeNet-5 on scikit-learn's labelled digits (1,797 "
                                   "8x8 images as 32x32 PNGs; split test_size=0.25, stratified, "
                                   "random_state=0), seeded, and save its state_dict for "
                                   "`visionserve export lenet5 --weights PATH`. The default "
                                   "lenet5 export runs the same training. Needs the 'export' "
                                   "extra.")
    p.add_argument("--out", type=Path, required=True, help="where to write the .pt state_dict")
    p.add_argument("--seed", type=int, default=0, help="seed of the init and of the batches")
    p.add_argument("--epochs", type=int, default=15)
    p.set_defaults(func=_train_digits)


def _add_client_commands(sub: Subcommands) -> None:
    """The commands that call a running server (``client_commands``)."""
    p = sub.add_parser("classify", help="classify image files with a running server",
                       description="Send image files in one Classify call to a running server "
                                   "(`visionserve serve`) and print each one's top-k labels and "
                                   "probabilities, and where the model's weights came from.")
    p.add_argument("images", nargs="+", type=Path, help="JPEG/PNG/WebP files")
    p.add_argument("--model", required=True,
                   help="the model's name in the server's repository (`visionserve models`)")
    p.add_argument("--version", type=int, default=0, help="the version to ask; 0 = the newest")
    p.add_argument("--top-k", type=int, default=5, help="labels per image")
    p.add_argument("--server", default="localhost:8001", help="HOST:PORT of the gRPC server")
    _output_flag(p, "(json: the ClassifyResponse as our JSON, results in the order of the "
                    "files, with the version's weights)")
    _client_security_flags(p)
    p.set_defaults(func=_client_command("classify"))

    p = sub.add_parser("embed", help="print embedding vectors of image files",
                       description="Send image files in one Embed call to a running server and "
                                   "print each one's feature vector (the layer before the "
                                   "classifier), L2-normalized unless --raw.")
    p.add_argument("images", nargs="+", type=Path, help="JPEG/PNG/WebP files")
    p.add_argument("--model", required=True,
                   help="the model's name in the server's repository (`visionserve models`)")
    p.add_argument("--version", type=int, default=0, help="the version to ask; 0 = the newest")
    p.add_argument("--raw", action="store_true", help="do not L2-normalize")
    p.add_argument("--server", default="localhost:8001", help="HOST:PORT of the gRPC server")
    _output_flag(p, "(table: size, norm and the first values; json: every vector in full)")
    _client_security_flags(p)
    p.set_defaults(func=_client_command("embed"))

    p = sub.add_parser("models", help="list the models of a running server",
                       description="List every model a running server knows: its state, "
                                   "versions, input, classes, embedding size, largest batch, "
                                   "where its newest version's weights came from, and why it "
                                   "failed when it did.")
    p.add_argument("--server", default="localhost:8001", help="HOST:PORT of the gRPC server")
    _output_flag(p, "(json: the ListModelsResponse as our JSON)")
    _client_security_flags(p)
    p.set_defaults(func=_client_command("models"))

    p = sub.add_parser("health", help="exit 0 if the server (or a model) is SERVING",
                       description="Ask the gRPC health service (grpc.health.v1) of a server; "
                                   "for container HEALTHCHECKs and exec probes. Exit 0 when "
                                   "SERVING, 1 otherwise.")
    p.add_argument("--server", default=f"localhost:{os.environ.get('VISIONSERVE_GRPC_PORT', 8001)}",
                   help="HOST:PORT (default: localhost and $VISIONSERVE_GRPC_PORT or 8001)")
    p.add_argument("--service", default="", help="a model name; empty = the server itself")
    p.add_argument("--timeout-s", type=float, default=3.0)
    _output_flag(p, "(json: server, service and status)")
    _client_security_flags(p, token=False)
    p.set_defaults(func=_client_command("health"))


class DefaultsHelp(argparse.HelpFormatter):
    """``--help`` shows each option's default, where it has one worth showing."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        text = action.help or ""
        if "(default" in text or not action.option_strings \
                or action.default in (None, False, argparse.SUPPRESS, [], ()):
            return text
        return text + " (default: %(default)s)"


def _client_command(name: str):  # type: ignore[no-untyped-def]
    """The handler of a command that calls a server (``client_commands``), imported when run."""
    def run(args: argparse.Namespace) -> int:
        from . import client_commands

        return int(getattr(client_commands, name)(args))

    return run


def _output_flag(p: argparse.ArgumentParser, what: str) -> None:
    p.add_argument("-o", "--output", choices=OUTPUT_FORMATS, default="table",
                   help=f"table for people, json for scripts: one JSON document on stdout "
                        f"{what}")


def _client_security_flags(p: argparse.ArgumentParser, token: bool = True) -> None:
    """Flags of the commands that call a server secured with TLS (and a token)."""
    p.add_argument("--tls-ca", type=Path, help="PEM CA that signed the server's certificate: "
                                               "connect over TLS")
    p.add_argument("--tls-client-cert", type=Path, help="PEM client certificate (mutual TLS)")
    p.add_argument("--tls-client-key", type=Path, help="PEM key of --tls-client-cert")
    if token:
        p.add_argument("--auth-token-file", type=Path,
                       help="send 'authorization: Bearer <first line of this file>' (or set "
                            "VISIONSERVE_AUTH_TOKEN to the token)")


# flags whose meaning differs between commands (export's --version names the version it
# publishes, classify's the version it asks for): their variables carry the command's name
PER_COMMAND = ("--version", "--seed")


def env_defaults(parser: argparse.ArgumentParser, command: str = "") -> None:
    """VISIONSERVE_<FLAG> becomes the flag's default (the command line still wins); for the
    flags in ``PER_COMMAND``, VISIONSERVE_<COMMAND>_<FLAG> (VISIONSERVE_EXPORT_VERSION)."""
    for action in parser._actions:
        flags = [o for o in action.option_strings if o.startswith("--")]
        if not flags or action.dest == "help" or isinstance(action, argparse._VersionAction):
            continue
        key = env_name(f"--{command}-{flags[0][2:]}" if command and flags[0] in PER_COMMAND
                       else flags[0])
        if key in os.environ:
            raw = os.environ[key]
            if isinstance(action, argparse._StoreTrueAction):
                action.default = raw.lower() in ("1", "true", "yes")
            elif isinstance(action, argparse._AppendAction):
                action.default = [v for v in raw.split(",") if v]
            else:
                action.default = action.type(raw) if action.type else raw
        if isinstance(action, argparse._AppendAction):
            key_help = f" [env {key}, comma-separated]"
        else:
            key_help = f" [env {key}]"
        if action.help and action.help is not argparse.SUPPRESS:
            action.help += key_help
        elif action.help is None:
            action.help = key_help.strip()


def _serve(args: argparse.Namespace) -> int:
    from ..process.server import StartupError, serve
    from .serve_flags import UsageError, server_config

    try:
        config = server_config(args)
    except UsageError as exc:
        log.error("%s", exc)
        return 2
    try:
        asyncio.run(serve(config))
    except StartupError as exc:
        log.error("%s", exc)
        return 2
    return 0


def _export(args: argparse.Namespace) -> int:
    try:
        from visionserve.export.cli import run_export
    except ImportError as exc:
        log.error("export needs the 'export' extra (PyTorch, ONNX): %s (%s)",
                  install_hint("export"), exc)
        return 2
    return run_export(args)


def _train_digits(args: argparse.Namespace) -> int:
    try:
        from visionserve.export.cli import run_train_digits
    except ImportError as exc:
        log.error("train-digits needs the 'export' extra (PyTorch, scikit-learn): %s (%s)",
                  install_hint("export"), exc)
        return 2
    return run_train_digits(args)


def _bench(command: str, argv: list[str]) -> int:
    """The ``bench*`` commands live in ``visionserve.bench``; without the ``bench`` extra they
    exit 2 naming it (the server itself never needs it)."""
    from visionserve.bench import missing_requirements

    missing = missing_requirements()
    if missing:
        log.error("`visionserve %s` needs the 'bench' extra: %s (missing: %s)", command,
                  install_hint("bench"), ", ".join(missing))
        return 2
    from visionserve.bench.cli import main as bench_main

    return bench_main(command, argv)

