"""``visionserve bench-attacks``: each class of hostile request against a real server.

One request per class of input that once made the server do unbounded work (issue 16): what is
sent, the status it gets and how fast, and — sampled from the server process every 20 ms while
it is being answered — its peak RSS and thread count, and the slowest answer of a health check
sent every 50 ms on another connection. The tests (``tests/test_request_limits.py``) send the
same requests and hold them to their bounds; this command prints the table of
``docs/security.md``.
"""

from __future__ import annotations

import argparse
import shlex
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import grpc
import numpy as np
from grpc_health.v1 import health_pb2, health_pb2_grpc
from tritonclient.grpc import service_pb2 as kpb  # not visionserve.inference: the same names

from visionserve.service.format.model_config import InputSpec, ModelConfig
from visionserve.service.format.model_format import CONFIG_FILE, EMBEDDING, INPUT
from visionserve.v1 import visionserve_pb2 as pb

from . import report
from .launch import Launched, checkout_env, start_visionserve
from .watch import Cost, Watch

CLASSIFY = "/visionserve.v1.VisionService/Classify"
MODEL_INFER = "/inference.GRPCInferenceService/ModelInfer"
MiB = 1024 * 1024


@dataclass(frozen=True)
class Attack:
    name: str  # the class of input
    sent: str  # what the request holds
    method: str
    build: Callable[[str, InputSpec], bytes]  # (model, its input spec) -> serialized request
    expected: grpc.StatusCode


def _infer(model: str, **fields: object) -> kpb.ModelInferRequest:
    return kpb.ModelInferRequest(model_name=model, **fields)  # type: ignore[arg-type]


def _bytes_input(images: list[bytes]) -> dict[str, object]:
    return {"inputs": [kpb.ModelInferRequest.InferInputTensor(name=INPUT, datatype="BYTES",
                                                              shape=[len(images)])],
            "raw_input_contents": [b"".join(len(i).to_bytes(4, "little") + i for i in images)]}


def flat_png(width: int, height: int) -> bytes:
    """A flat-colour PNG: a few hundred bytes per megapixel, the full pixel count to decode."""
    import io

    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (width, height), (120, 120, 120)).save(buf, "PNG")
    return buf.getvalue()


def _outputs(model: str, spec: InputSpec) -> bytes:
    image = flat_png(spec.width, spec.height)
    return _infer(model, outputs=[kpb.ModelInferRequest.InferRequestedOutputTensor(
        name=EMBEDDING)] * 20_000, **_bytes_input([image])).SerializeToString()


def _empty_images(model: str, spec: InputSpec) -> bytes:
    name = model.encode()
    head = b"\n" + bytes([len(name)]) + name
    return head + b"\x1a\x00" * ((64 * MiB - len(head)) // 2)


def _bytes_elements(model: str, spec: InputSpec) -> bytes:
    return _infer(model, inputs=[kpb.ModelInferRequest.InferInputTensor(
        name=INPUT, datatype="BYTES", shape=[1],
        contents=kpb.InferTensorContents(bytes_contents=[b""] * 1_000_000))]).SerializeToString()


def _typed_fp32(model: str, spec: InputSpec) -> bytes:
    values = np.zeros(16 * MiB - 64, np.float32)  # the largest that fits in 64 MiB
    return _infer(model, inputs=[kpb.ModelInferRequest.InferInputTensor(
        name=INPUT, datatype="FP32", shape=[1, 1, 1, len(values)],
        contents=kpb.InferTensorContents(fp32_contents=values))]).SerializeToString()


def _typed_uint8(model: str, spec: InputSpec) -> bytes:
    values = np.full(32 * MiB - 64, 200, np.uint32)  # two bytes each on the wire: 64 MiB
    return _infer(model, inputs=[kpb.ModelInferRequest.InferInputTensor(
        name=INPUT, datatype="UINT8", shape=[1, 1, 1, len(values)],
        contents=kpb.InferTensorContents(uint_contents=values))]).SerializeToString()


def _decode_cost(model: str, spec: InputSpec) -> bytes:
    image = flat_png(8000, 5000)  # 40 MP, the per-image limit
    return pb.ClassifyRequest(model=model, images=[pb.Image(encoded=image)] * 256) \
        .SerializeToString()


def _echo(model: str, spec: InputSpec) -> bytes:
    name = "é" * 100_000  # 200 KB of UTF-8, echoed in the error if nothing bounded it
    return _infer(model, inputs=[kpb.ModelInferRequest.InferInputTensor(
        name=name, datatype="FP32", shape=[1, *spec.shape])],
        raw_input_contents=[bytes(4 * int(np.prod(spec.shape)))]).SerializeToString()


def _one_big_image(model: str, spec: InputSpec) -> bytes:
    return pb.ClassifyRequest(model=model, images=[pb.Image(encoded=bytes(64 * MiB - 64))]) \
        .SerializeToString()


ATTACKS = (
    # not an attack: what any 64 MiB message costs in gRPC's transport before our code runs
    Attack("baseline", "64 MiB Classify of one 64 MiB image (over --max-image-bytes)", CLASSIFY,
           _one_big_image, grpc.StatusCode.RESOURCE_EXHAUSTED),
    Attack("requested outputs", "ModelInfer naming `embedding` 20,000 times (one image)",
           MODEL_INFER, _outputs, grpc.StatusCode.INVALID_ARGUMENT),
    Attack("repeated fields", "64 MiB Classify of 33.5 M empty images", CLASSIFY,
           _empty_images, grpc.StatusCode.RESOURCE_EXHAUSTED),
    Attack("repeated fields", "ModelInfer BYTES with 1 M empty `bytes_contents` (2 MB)",
           MODEL_INFER, _bytes_elements, grpc.StatusCode.RESOURCE_EXHAUSTED),
    Attack("typed contents", "64 MiB of FP32 `fp32_contents` (16 M values)", MODEL_INFER,
           _typed_fp32, grpc.StatusCode.INVALID_ARGUMENT),
    Attack("typed contents", "64 MiB of UINT8 `uint_contents` (32 M two-byte varints)",
           MODEL_INFER, _typed_uint8, grpc.StatusCode.INVALID_ARGUMENT),
    Attack("decode cost", "Classify of 256 flat 40 MP PNGs (30 MB, 10 G pixels)", CLASSIFY,
           _decode_cost, grpc.StatusCode.RESOURCE_EXHAUSTED),
    Attack("status messages", "an input named with 100,000 × `é` (200 KB)", MODEL_INFER, _echo,
           grpc.StatusCode.INVALID_ARGUMENT),
)


@dataclass
class Outcome:
    attack: Attack
    code: str
    details: str
    seconds: float
    cost: Cost  # its probe: a gRPC health check every 50 ms


def send(server: Launched, attack: Attack, model: str, spec: InputSpec) -> Outcome:
    """Send one attack's request to ``server`` and measure it."""
    body = attack.build(model, spec)
    channel = grpc.insecure_channel(server.target, options=[
        ("grpc.max_send_message_length", 65 * MiB),
        ("grpc.max_receive_message_length", 65 * MiB)])
    call = channel.unary_unary(attack.method, request_serializer=None,
                               response_deserializer=None)
    pid = server.process.pid
    time.sleep(0.5)  # the previous attack's memory, if any, returned
    code, details = "OK", ""
    probe_channel = grpc.insecure_channel(server.target)
    health = health_pb2_grpc.HealthStub(probe_channel)
    health.Check(health_pb2.HealthCheckRequest(), timeout=10)  # connected before the attack
    with Watch(pid, lambda: bool(health.Check(health_pb2.HealthCheckRequest(), timeout=10)),
               every_s=0.05) as watch:
        start = time.monotonic()
        try:
            call(body, timeout=120)
        except grpc.RpcError as err:
            code, details = err.code().name, err.details() or ""
        seconds = time.monotonic() - start
        time.sleep(0.2)  # what happens right after the answer counts too
    channel.close()
    probe_channel.close()
    return Outcome(attack, code, details, seconds, watch.cost())


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default="resnet18", help="model the requests name")
    p.add_argument("--repo", type=Path, default=Path("model_repo"))
    p.add_argument("--ports", default="grpc,http",
                   help="comma-separated: grpc (hostile messages), http (hostile HTTP clients "
                        "on the REST and metrics ports)")
    p.add_argument("--serve-args", default="", help="extra `visionserve serve` flags")
    p.add_argument("--server-checkout", type=Path, metavar="DIR",
                   help="run the server from this checkout of the project instead (e.g. `git "
                        "worktree add /tmp/prev HEAD~1`): the attacks' 'before' figures")
    p.add_argument("--json", type=Path)
    p.add_argument("--markdown", type=Path)


def run_attacks(args: argparse.Namespace) -> int:
    from rich.console import Console

    console = Console(width=None if sys.stdout.isatty() else 10_000)
    from .http_attacks import HTTP_ATTACKS, http_markdown, run_http_attack

    config = ModelConfig.from_toml(args.repo / args.model / CONFIG_FILE)
    ports = args.ports.split(",")
    workdir = Path(tempfile.mkdtemp(prefix="visionserve-attacks-"))
    log = workdir / "server.log"
    server = start_visionserve(args.repo, "--model-control", "none",
                               *shlex.split(args.serve_args), log_path=log,
                               env=checkout_env(args.server_checkout, workdir)
                               if args.server_checkout else None)
    outcomes, http_outcomes = [], []
    try:
        with console.status("attacking…") as status:
            for i, attack in enumerate(ATTACKS if "grpc" in ports else (), 1):
                status.update(f"attack {i}/{len(ATTACKS)}: {attack.sent}")
                outcomes.append(send(server, attack, args.model, config.input))
            for i, http in enumerate(HTTP_ATTACKS if "http" in ports else (), 1):
                status.update(f"HTTP attack {i}/{len(HTTP_ATTACKS)}: {http.sent}")
                http_outcomes.append(run_http_attack(server, http, args.model, config.input))
        alive = server.process.poll() is None
    finally:
        server.stop()
    text = markdown(outcomes, "visionserve " + shlex.join(sys.argv[1:])) if outcomes else \
        f"`visionserve {shlex.join(sys.argv[1:])}`\n\n"
    if http_outcomes:
        text += "\n" + http_markdown(http_outcomes)
    console.print(text)
    report.save(args.json, [vars(o) | {"cost": vars(o.cost), "attack": vars(o.attack) | {
        "build": o.attack.build.__name__, "expected": o.attack.expected.name}}
        for o in outcomes] + [vars(o) | {"cost": vars(o.cost), "attack": {
            "name": o.attack.name, "sent": o.attack.sent}} for o in http_outcomes],
        args.markdown, text)
    wrong = [o for o in outcomes if o.code != o.attack.expected.name]
    for o in wrong:
        console.print(f"[red]{o.attack.sent}: {o.code}, expected {o.attack.expected.name}: "
                      f"{o.details}")
    if not alive:
        console.print(f"[red]the server died; its log: {log}")
    return 1 if wrong or not alive else 0


def markdown(outcomes: list[Outcome], command: str) -> str:
    lines = [f"`{command}`", "",
             "| class | sent | status | answered in | RSS before → peak → after (MB) | "
             "threads before → peak → after | slowest health check |",
             "|---|---|---|---|---|---|---|"]
    for o in outcomes:
        lines.append(f"| {o.attack.name} | {o.attack.sent} | {o.code} | {o.seconds:.2f} s | "
                     f"{o.cost.cells()} |")
    return "\n".join(lines) + "\n"


__all__ = ["ATTACKS", "Attack", "Outcome", "run_attacks", "send"]
