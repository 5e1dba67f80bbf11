"""``visionserve bench``: served throughput/latency beside the in-process engine, in one run.

The load generator runs in its own process (grpc.aio, closed loop, pre-built messages) and
reports its own CPU use, so a client-bound run is visible. The in-process ceiling is the same
model file in an ONNX Runtime session with the server's thread settings, at batch 1…max.
The headline is a ratio measured side by side: served images/s ÷ in-process best images/s.
On a small machine the client, the server and the engine share the same cores: say so when
quoting the numbers.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing as mp
import platform
import re
import resource
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from .config import InputSpec, ModelConfig, cpu_count
from .repository import MODEL_FILES, version_numbers

READY = re.compile(r"serving gRPC on [\d.]+:(\d+)")


def run_bench(args: argparse.Namespace) -> int:
    from rich.console import Console
    from rich.progress import Progress
    from rich.table import Table

    console = Console(width=None if sys.stdout.isatty() else 140)
    model_dir = args.repo / args.model
    versions = version_numbers(model_dir)
    if not versions:
        console.print(f"no version of {args.model} in {args.repo}; run `visionserve export "
                      f"{args.model}` first")
        return 2
    config = ModelConfig.from_toml(model_dir / "config.toml")
    model_file = model_dir / str(versions[-1]) / MODEL_FILES["onnxruntime"]
    levels = [int(c) for c in args.concurrency.split(",")]
    server = None if args.server else _start_server(args.repo)
    target = args.server or f"127.0.0.1:{server[1]}"  # type: ignore[index]
    results: dict[str, object] = {"model": args.model, "input": args.input,
                                  "duration_s": args.duration_s, "runs": [],
                                  "machine": _machine()}
    try:
        with Progress(console=console, transient=True) as progress:
            sizes = [b for b in (1, 2, 4, 8, 16, 32, 64) if b <= config.max_batch_size]
            task = progress.add_task("in-process engine", total=len(sizes) + len(levels))
            in_process = {}
            for b in sizes:
                in_process[str(b)] = _in_process(model_file, config, b, args.duration_s / 2)
                progress.advance(task)
            results["in_process"] = in_process
            apis = args.api.split(",")
            progress.update(task, total=len(sizes) + len(levels) * len(apis))
            for c in levels:
                for api in apis:
                    progress.update(task, description=f"served via {api}, concurrency {c}")
                    run = _served(target, args.model, config, c, args.duration_s, args.input,
                                  api)
                    results["runs"].append(run)  # type: ignore[union-attr]
                    progress.advance(task)
    finally:
        if server is not None:
            server[0].terminate()
            server[0].wait(timeout=60)
    best = max(results["in_process"].values())  # type: ignore[union-attr]
    table = Table(title=f"{args.model}: served ({args.input} tensors) vs in-process engine "
                        f"(best batch {best:.1f} img/s)")
    for col in ("api", "concurrency", "img/s", "p50 ms", "p90 ms", "p99 ms", "p99.9 ms", "errors",
                "client CPU", "served / in-process"):
        table.add_column(col, justify="right")
    ratios = {}
    for run in results["runs"]:  # type: ignore[union-attr]
        ratio = run["images_per_s"] / best
        ratios[f"{run['api']}_c{run['concurrency']}_vs_in_process_best"] = round(ratio, 3)
        table.add_row(run["api"], str(run["concurrency"]), f"{run['images_per_s']:.1f}",
                      *(f"{run[k]:.1f}" for k in ("p50_ms", "p90_ms", "p99_ms", "p999_ms")),
                      str(run["errors"]), f"{run['client_cpu']:.2f}", f"{ratio:.2f}")
    results["ratios"] = ratios
    console.print(table)
    console.print("in-process img/s by batch: " + ", ".join(
        f"{b}: {v:.1f}" for b, v in results["in_process"].items()))  # type: ignore[union-attr]
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(results, indent=2) + "\n")
        console.print(f"wrote {args.json}")
    return 0


def _start_server(repo: Path) -> tuple[subprocess.Popen[bytes], int]:
    import tempfile

    log = Path(tempfile.mkstemp(prefix="visionserve-bench-", suffix=".log")[1])
    out = open(log, "wb")  # noqa: SIM115 - owned by the subprocess
    proc = subprocess.Popen([sys.executable, "-m", "visionserve.service.cli", "serve",
                             "--repo", str(repo), "--host", "127.0.0.1", "--grpc-port", "0",
                             "--metrics-port", "0"], stdout=out, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        match = READY.search(log.read_text(errors="replace"))
        if match:
            return proc, int(match[1])
        if proc.poll() is not None:
            raise SystemExit(f"server exited: {log.read_text()[-2000:]}")
        time.sleep(0.2)
    proc.kill()
    raise SystemExit("server did not become ready in 300 s")


def _in_process(model_file: Path, config: ModelConfig, batch: int, duration_s: float) -> float:
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = config.onnxruntime.intra_op_threads or cpu_count()
    opts.inter_op_num_threads = config.onnxruntime.inter_op_threads or 1
    session = ort.InferenceSession(str(model_file), opts, providers=["CPUExecutionProvider"])
    x = np.random.default_rng(0).standard_normal((batch, *config.input.shape),
                                                 dtype=np.float32)
    session.run(None, {config.input.name: x})  # warm-up
    images, start = 0, time.perf_counter()
    while (elapsed := time.perf_counter() - start) < duration_s or images < 3 * batch:
        session.run(None, {config.input.name: x})
        images += batch
    return images / elapsed


def _served(target: str, model: str, config: ModelConfig, concurrency: int, duration_s: float,
            input_kind: str, api: str) -> dict[str, object]:
    """One closed-loop level, from a fresh client process (which may import tritonclient:
    its `inference.*` protobufs never meet the server's)."""
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    proc = ctx.Process(target=_client_process, args=(queue, target, model, config.input,
                                                     concurrency, duration_s, input_kind, api))
    proc.start()
    result = queue.get(timeout=duration_s + 300)
    proc.join()
    return result  # type: ignore[no-any-return]


def _client_process(queue, target: str, model: str, spec: InputSpec,  # noqa: ANN001
                    concurrency: int, duration_s: float, input_kind: str, api: str) -> None:
    queue.put(asyncio.run(_closed_loop(target, model, spec, concurrency, duration_s,
                                       input_kind, api)))


def _classify_call(target: str, model: str, array: np.ndarray):  # noqa: ANN202
    """Our API: Classify with one raw-tensor image, top-5."""
    import grpc

    from visionserve.v1 import visionserve_pb2 as pb
    from visionserve.v1 import visionserve_pb2_grpc as pb_grpc

    from .client import MAX_MESSAGE_BYTES, numpy_to_image

    channel = grpc.aio.insecure_channel(target, options=[
        ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
        ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES)])
    stub = pb_grpc.VisionServiceStub(channel)
    request = pb.ClassifyRequest(model=model, images=[numpy_to_image(array)], top_k=5)
    return (lambda: stub.Classify(request, timeout=60)), channel.close, grpc.RpcError


def _kserve_call(target: str, model: str, array: np.ndarray, input_name: str):  # noqa: ANN202
    """KServe v2 through Triton's own client: ModelInfer, logits with class_count=5."""
    import tritonclient.grpc.aio as atc
    from tritonclient.utils import InferenceServerException

    client = atc.InferenceServerClient(target)
    batch = array[None]
    tensor = atc.InferInput(input_name, list(batch.shape),
                            "UINT8" if batch.dtype == np.uint8 else "FP32")
    tensor.set_data_from_numpy(batch)
    outputs = [atc.InferRequestedOutput("logits", class_count=5)]
    return (lambda: client.infer(model, [tensor], outputs=outputs, client_timeout=60)), \
        client.close, InferenceServerException


async def _closed_loop(target: str, model: str, spec: InputSpec, concurrency: int,
                       duration_s: float, input_kind: str, api: str) -> dict[str, object]:
    rng = np.random.default_rng(1)
    if input_kind == "uint8":
        array = rng.integers(0, 256, (spec.height, spec.width, spec.channels), dtype=np.uint8)
    else:
        array = rng.standard_normal(spec.shape, dtype=np.float32)
    if api == "kserve":
        call, close, error_type = _kserve_call(target, model, array, spec.name)
    else:
        call, close, error_type = _classify_call(target, model, array)
    try:
        warm_until = time.perf_counter() + min(2.0, duration_s / 4)
        latencies: list[float] = []
        errors = 0

        async def worker(stop_at: float, record: bool) -> None:
            nonlocal errors
            while time.perf_counter() < stop_at:
                t0 = time.perf_counter()
                try:
                    await call()
                except error_type:
                    errors += record
                    continue
                if record:
                    latencies.append(time.perf_counter() - t0)

        await asyncio.gather(*(worker(warm_until, False) for _ in range(concurrency)))
        cpu0 = _cpu_s()
        start = time.perf_counter()
        await asyncio.gather(*(worker(start + duration_s, True) for _ in range(concurrency)))
        elapsed = time.perf_counter() - start
        cpu = _cpu_s() - cpu0
    finally:
        await close()
    lat = np.array(latencies or [float("nan")]) * 1000
    return {"target": "visionserve", "api": api, "concurrency": concurrency,
            "input": input_kind,
            "batching": "on", "images_per_s": len(latencies) / elapsed,
            "p50_ms": float(np.percentile(lat, 50)), "p90_ms": float(np.percentile(lat, 90)),
            "p99_ms": float(np.percentile(lat, 99)), "p999_ms": float(np.percentile(lat, 99.9)),
            "errors": errors, "client_cpu": cpu / elapsed}


def _cpu_s() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def _machine() -> dict[str, object]:
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
            "onnxruntime": onnxruntime.__version__}
