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
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING

from .. import package_version
from .terminal import OUTPUT_FORMATS

if TYPE_CHECKING:
    from ..process.server_config import ServerConfig

log = logging.getLogger("visionserve")

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


def build_parser() -> argparse.ArgumentParser:
    from ..modes import GoldenMode
    from ..process.server_config import ServerConfig

    defaults = ServerConfig()  # the one place the server's defaults live
    limits = defaults.limits
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

    p = sub.add_parser("serve", help="serve every model of a repository over gRPC and HTTP",
                       description="Load every model/version of the repository (ONNX Runtime on "
                                   "CPU by default) and serve Classify/Embed and KServe v2 over "
                                   "gRPC and HTTP/REST with dynamic batching; Prometheus "
                                   "metrics over HTTP. Stops gracefully on SIGTERM/SIGINT.")
    p.add_argument("--repo", type=Path, default=defaults.repo, help="model repository")
    p.add_argument("--host", default=defaults.host, help="address to bind (gRPC, HTTP, and "
                                                      "metrics unless --metrics-host)")
    p.add_argument("--metrics-host", default=defaults.metrics_host,
                   help="address of the /metrics HTTP server (default: --host), e.g. 127.0.0.1 "
                        "or a cluster-internal address")
    p.add_argument("--grpc-port", type=int, default=defaults.grpc_port,
                   help="0 = pick a free port, logged. Bound exclusively: a port in use is a "
                        "start-up error (exit 2)")
    p.add_argument("--reuse-port", action="store_true", default=defaults.reuse_port,
                   help="set SO_REUSEPORT on the gRPC port, so that several servers share it "
                        "and the kernel spreads connections over them (on purpose only: a "
                        "stale server would silently take a share of the traffic)")
    p.add_argument("--http-port", type=int, default=defaults.http_port,
                   help="HTTP port of the KServe v2 REST API (tritonclient.http, curl: "
                        "docs/rest.md) and the image endpoints (POST /v2/models/<m>/classify "
                        "with the file as the body); 0 = pick a free port, logged. Same TLS, "
                        "token, limits and batchers as gRPC")
    p.add_argument("--no-http", action="store_true",
                   help="serve no HTTP API (gRPC only; /metrics stays)")
    p.add_argument("--metrics-port", type=int, default=defaults.metrics_port,
                   help="HTTP port of /metrics; 0 = pick a free port, logged")
    p.add_argument("--max-message-bytes", type=int, default=limits.max_message_bytes,
                   help="largest gRPC message accepted or sent (RESOURCE_EXHAUSTED above)")
    p.add_argument("--max-image-bytes", type=int, default=limits.max_encoded_image_bytes,
                   help="largest encoded image (JPEG/PNG/WebP) accepted")
    p.add_argument("--max-image-pixels", type=int, default=limits.max_image_pixels,
                   help="largest decoded image (width x height); checked before decoding")
    p.add_argument("--max-images-per-request", type=int,
                   default=limits.max_images_per_request)
    p.add_argument("--max-request-pixels", type=int, default=limits.max_request_pixels,
                   help="decoded pixels of all encoded images of one request, read from their "
                        "headers before any decodes (RESOURCE_EXHAUSTED above; >= "
                        "--max-image-pixels)")
    p.add_argument("--max-decode-queue-pixels", type=int,
                   default=limits.max_decode_queue_pixels,
                   help="decoded pixels admitted for decoding and not yet decoded, "
                        "server-wide; a request that would exceed it is refused "
                        "RESOURCE_EXHAUSTED at once (>= --max-request-pixels)")
    p.add_argument("--max-inflight-requests", type=int, default=limits.max_inflight_requests,
                   help="inference requests in progress at once, server-wide; more are refused "
                        "RESOURCE_EXHAUSTED at once (health and metadata calls still pass). "
                        "About capacity x acceptable latency (docs/security.md); 0 = no limit")
    p.add_argument("--max-stream-inflight", type=int, default=limits.max_stream_inflight,
                   help="messages of one stream answered or waiting to be sent at once; at the "
                        "bound the server stops reading that stream until the client reads "
                        "its replies (>= 1)")
    p.add_argument("--max-concurrent-rpcs", type=int, default=limits.max_concurrent_rpcs,
                   help="RPCs of any kind at once, refused by gRPC before Python parses them: "
                        "a memory backstop (0 = no limit; it also refuses health probes)")
    p.add_argument("--max-streams-per-connection", type=int,
                   default=limits.max_streams_per_connection,
                   help="calls in flight on one HTTP/2 connection (more wait in the client)")
    p.add_argument("--connection-idle-s", type=float, default=limits.connection_idle_s,
                   help="close a connection idle this long (0 = never)")
    p.add_argument("--connection-age-s", type=float, default=limits.connection_age_s,
                   help="close every connection at this age, so clients reconnect and a load "
                        "balancer spreads them again (0 = never)")
    p.add_argument("--connection-age-grace-s", type=float,
                   default=limits.connection_age_grace_s,
                   help="time the calls in flight on a connection closed for its age get to "
                        "finish")
    p.add_argument("--preprocess-threads", type=int, default=defaults.preprocess_threads,
                   help="0 = one per core")
    p.add_argument("--model-control", choices=["poll", "explicit", "none"],
                   default=defaults.model_control,
                   help="poll (default): rescan the repository every --poll-interval-s and "
                        "serve new, changed and removed models/versions without a restart; "
                        "explicit: load only --load-model models at start, then only the KServe "
                        "RepositoryModelLoad/Unload RPCs change what is served (as in Triton); "
                        "none: load every model once at start")
    p.add_argument("--poll-interval-s", type=float, default=defaults.poll_interval_s,
                   help="seconds between repository scans in poll mode")
    p.add_argument("--allow-symlinks-outside-repo", action="store_true",
                   default=defaults.allow_symlinks_outside_repo,
                   help="follow symbolic links in the repository that lead outside it (refused "
                        "by default, failing that model or version: docs/security.md); for "
                        "volume layouts that link models in from elsewhere")
    p.add_argument("--golden-check", choices=[m.value for m in GoldenMode],
                   default=defaults.golden_check.value,
                   help="before a version serves, run its golden set (exported with it: real "
                        "photos and seeded tensors with PyTorch's outputs, the labels and "
                        "preprocessing it was made with) through the server's own path. "
                        "enforce (default): a version that is off beyond its tolerance does not "
                        "serve (state failed, the reason says how far off; the previous version "
                        "keeps serving); warn: it serves anyway, logged as an error; off: no "
                        "check (docs/lifecycle.md)")
    p.add_argument("--openvino-cache-dir", type=Path, default=defaults.openvino_cache_dir,
                   metavar="DIR",
                   help="models with backend = \"openvino\": keep their compiled form in DIR "
                        "(created if missing; it must be writable: the repository may be "
                        "read-only) and import it on reloads and restarts instead of compiling "
                        "again (docs/config.md). Default: compile at every load")
    p.add_argument("--trust-network", action="store_true",
                   help="with --model-control explicit and no token: accept that anyone who "
                        "can reach the port may load and unload every model (refused at start "
                        "otherwise)")
    p.add_argument("--load-interval-s", type=float, default=defaults.load_interval_s,
                   help="with --model-control explicit: per model, after a burst of 4, at most "
                        "one RepositoryModelLoad/Unload per this many seconds (each reloads and "
                        "warms up the model); more are RESOURCE_EXHAUSTED. 0 = no limit")
    p.add_argument("--load-model", action="append", default=[], metavar="NAME",
                   help="with --model-control explicit: a model to load at start (repeatable)")
    p.add_argument("--shutdown-grace-s", type=float, default=defaults.shutdown_grace_s,
                   help="how long in-flight requests may take to finish on SIGTERM/SIGINT (a "
                        "second signal exits at once)")
    p.add_argument("--shutdown-delay-s", type=float, default=defaults.shutdown_delay_s,
                   help="on SIGTERM, report not-ready but keep serving this long before new "
                        "calls are refused (lets Kubernetes/a mesh stop routing here first)")
    p.add_argument("--tls-cert", type=Path, help="PEM certificate chain: serve gRPC over TLS")
    p.add_argument("--tls-key", type=Path, help="PEM private key of --tls-cert")
    p.add_argument("--tls-client-ca", type=Path,
                   help="PEM CA bundle: require client certificates signed by it (mutual TLS)")
    p.add_argument("--auth-token-file", type=Path,
                   help="require 'authorization: Bearer <token>' metadata, the token being this "
                        "file's first line (or set VISIONSERVE_AUTH_TOKEN to the token itself); "
                        "health is always open, repository load/unload always protected")
    p.add_argument("--auth-open", default="", metavar="CLASSES",
                   help="with a token: comma-separated classes left open, from inference, "
                        "metadata, statistics (e.g. behind a mesh that authenticates callers)")
    p.add_argument("--access-log", choices=["all", "errors", "off"], default=defaults.access_log,
                   help="one log line per request (request id, method, model, version, code, "
                        "duration): for every request, only for failed ones, or none")
    p.add_argument("--ready-file", type=Path, metavar="PATH",
                   help="once SERVING, write {\"grpc_port\", \"http_port\", \"metrics_port\", "
                        "\"pid\", "
                        "\"models_ready\", \"models_failed\"} as JSON to PATH (atomically; "
                        "removed when shutdown starts): how scripts learn the ports of "
                        "--grpc-port 0 and when the server is ready")
    p.set_defaults(func=_serve)

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
    p.add_argument("--repo", type=Path, default=Path("model_repo"))
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

    p = sub.add_parser("classify", help="classify image files with a running server")
    p.add_argument("images", nargs="+", type=Path, help="JPEG/PNG/WebP files")
    p.add_argument("--model", required=True)
    p.add_argument("--version", type=int, default=0, help="0 = newest")
    p.add_argument("--top-k", type=int, default=5)
    p.add_argument("--server", default="localhost:8001", help="HOST:PORT of the gRPC server")
    _output_flag(p, "(json: the ClassifyResponse, results in the order of the files)")
    _client_security_flags(p)
    p.set_defaults(func=_client_command("classify"))

    p = sub.add_parser("embed", help="print embedding vectors of image files")
    p.add_argument("images", nargs="+", type=Path)
    p.add_argument("--model", required=True)
    p.add_argument("--version", type=int, default=0, help="0 = newest")
    p.add_argument("--raw", action="store_true", help="do not L2-normalize")
    p.add_argument("--server", default="localhost:8001")
    _output_flag(p, "(table: size, norm and the first values; json: every vector in full)")
    _client_security_flags(p)
    p.set_defaults(func=_client_command("embed"))

    p = sub.add_parser("models", help="list the models of a running server")
    p.add_argument("--server", default="localhost:8001")
    _output_flag(p, "(json: the ListModelsResponse)")
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

    for command, summary in BENCH_COMMANDS.items():  # parsed by visionserve.bench.cli
        sub.add_parser(command, help=summary + " (the 'bench' extra; "
                                               f"`visionserve {command} --help`)",
                       add_help=False, prefix_chars="\0")

    for name, action_parser in sub.choices.items():
        if name not in BENCH_COMMANDS:
            action_parser.epilog = action_parser.epilog or EXIT_CODES
            action_parser.set_defaults(command_parser=action_parser)
            env_defaults(action_parser)
    env_defaults(parser)
    return parser


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


def env_defaults(parser: argparse.ArgumentParser) -> None:
    """VISIONSERVE_<FLAG> becomes the flag's default (the command line still wins)."""
    for action in parser._actions:
        flags = [o for o in action.option_strings if o.startswith("--")]
        if not flags or action.dest == "help" or isinstance(action, argparse._VersionAction):
            continue
        key = "VISIONSERVE_" + flags[0][2:].upper().replace("-", "_")
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


class UsageError(ValueError):
    """A serve flag, or a combination of them, that cannot work: exit 2 with the message."""


def _serve(args: argparse.Namespace) -> int:
    from ..process.server import StartupError, serve

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


def server_config(args: argparse.Namespace) -> ServerConfig:
    """The ``ServerConfig`` that ``serve``'s parsed flags describe, with the cross-flag rules
    checked; a usage error (``UsageError``) names the flag. The tests' in-process servers are
    built through here too, so a flag means the same in a test as on the command line."""
    from ..api.auth import BearerTokenInterceptor, load_token
    from ..limits import ServerLimits
    from ..modes import GoldenMode
    from ..process.server_config import ServerConfig
    from ..process.tls import TlsConfig

    if bool(args.tls_cert) != bool(args.tls_key):
        raise UsageError("--tls-cert and --tls-key go together; give both (or neither)")
    if args.tls_client_ca and not args.tls_cert:
        raise UsageError("--tls-client-ca (mutual TLS) needs --tls-cert and --tls-key")
    if args.ready_file and not os.access(args.ready_file.parent, os.W_OK):
        raise UsageError(f"--ready-file {args.ready_file}: its folder does not exist or is not "
                         "writable; point it into a writable volume")
    auth_open = tuple(c for c in args.auth_open.split(",") if c)
    tls = TlsConfig(cert=args.tls_cert, key=args.tls_key, client_ca=args.tls_client_ca) \
        if args.tls_cert else None
    try:  # fail at start, with the flag named, rather than at the first call
        token = load_token(args.auth_token_file)
        if token:
            BearerTokenInterceptor(token, auth_open)
        elif auth_open:
            raise ValueError("--auth-open needs a token (--auth-token-file or "
                             "VISIONSERVE_AUTH_TOKEN)")
        if tls:
            tls.validate()
    except ValueError as exc:
        raise UsageError(str(exc)) from None
    if args.model_control == "explicit" and not token and not args.trust_network:
        raise UsageError(
            "--model-control explicit without a token lets any client that reaches the "
            "port unload every model; set a token (--auth-token-file or "
            "VISIONSERVE_AUTH_TOKEN: load/unload then need it), or pass --trust-network "
            "if only trusted clients can reach the port")
    try:
        limits = ServerLimits(max_message_bytes=args.max_message_bytes,
                              max_encoded_image_bytes=args.max_image_bytes,
                              max_image_pixels=args.max_image_pixels,
                              max_images_per_request=args.max_images_per_request,
                              max_request_pixels=args.max_request_pixels,
                              max_decode_queue_pixels=args.max_decode_queue_pixels,
                              max_inflight_requests=args.max_inflight_requests,
                              max_stream_inflight=args.max_stream_inflight,
                              max_concurrent_rpcs=args.max_concurrent_rpcs,
                              max_streams_per_connection=args.max_streams_per_connection,
                              connection_idle_s=args.connection_idle_s,
                              connection_age_s=args.connection_age_s,
                              connection_age_grace_s=args.connection_age_grace_s)
    except ValueError as exc:
        raise UsageError(str(exc)) from None
    cache_dir = args.openvino_cache_dir
    if cache_dir is not None:
        try:
            cache_dir.mkdir(parents=True, exist_ok=True)
            probe = tempfile.NamedTemporaryFile(dir=cache_dir, prefix=".probe-")
            probe.close()
        except OSError as exc:
            raise UsageError(
                f"--openvino-cache-dir {cache_dir} is not a writable directory "
                f"({exc.strerror or exc}); give one this user may write, or leave the flag "
                "out to compile at every load") from None
    return ServerConfig(
        repo=args.repo, host=args.host, grpc_port=args.grpc_port,
        http_port=None if args.no_http else args.http_port,
        metrics_port=args.metrics_port, preprocess_threads=args.preprocess_threads,
        model_control=args.model_control, poll_interval_s=args.poll_interval_s,
        load_models=tuple(args.load_model),
        allow_symlinks_outside_repo=args.allow_symlinks_outside_repo,
        golden_check=GoldenMode(args.golden_check),
        openvino_cache_dir=cache_dir,
        load_interval_s=args.load_interval_s,
        shutdown_grace_s=args.shutdown_grace_s, shutdown_delay_s=args.shutdown_delay_s,
        metrics_host=args.metrics_host, tls=tls, ready_file=args.ready_file,
        reuse_port=args.reuse_port,
        auth_token=token, auth_token_file=args.auth_token_file if token else None,
        auth_open=auth_open, access_log=args.access_log,
        limits=limits)


def _export(args: argparse.Namespace) -> int:
    try:
        from visionserve.export.cli import run_export
    except ImportError as exc:
        log.error("export needs the 'export' extra (PyTorch, ONNX): pip install "
                  "'visionserve[export]' (%s)", exc)
        return 2
    return run_export(args)


def _train_digits(args: argparse.Namespace) -> int:
    try:
        from visionserve.export.cli import run_train_digits
    except ImportError as exc:
        log.error("train-digits needs the 'export' extra (PyTorch, scikit-learn): pip install "
                  "'visionserve[export]' (%s)", exc)
        return 2
    return run_train_digits(args)


def _bench(command: str, argv: list[str]) -> int:
    """The ``bench*`` commands live in ``visionserve.bench``; without the ``bench`` extra they
    exit 2 naming it (the server itself never needs it)."""
    from visionserve.bench import missing_requirements

    missing = missing_requirements()
    if missing:
        log.error("`visionserve %s` needs the 'bench' extra: pip install 'visionserve[bench]' "
                  "(missing: %s)", command, ", ".join(missing))
        return 2
    from visionserve.bench.cli import main as bench_main

    return bench_main(command, argv)

