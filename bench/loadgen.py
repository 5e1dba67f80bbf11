"""The load generator: its own process, grpc.aio, pre-built messages, closed or open loop.

Closed loop: N coroutines each keep one request in flight. Open loop: requests start at the
times of a Poisson schedule drawn up front, whether or not earlier ones have answered, and each
latency is measured from the request's *intended* send time — a server (or a client) that falls
behind is charged for it (no coordinated omission). Warm-up traffic is sent and discarded first.
The process reports its own CPU use (and the machine's), so a client-bound run is visible.

The client imports our ``visionserve.v1`` stubs and Triton's ``tritonclient`` (for KServe v2),
never ``visionserve.inference``: that package and tritonclient define the same protobuf names.
"""

from __future__ import annotations

import asyncio
import multiprocessing as mp
import resource
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

import numpy as np

from .schedule import latency_summary, poisson_offsets

CALL_TIMEOUT_S = 60.0


@dataclass(frozen=True)
class Job:
    """One measured level against one target."""

    target: str  # HOST:PORT
    label: str  # "visionserve" | "triton" (reported as-is)
    model: str
    # "classify" (our Classify, top-5) | "kserve" (ModelInfer, logits) | "rest" (the same over
    # HTTP, binary tensor data) | "rest-json" (JSON tensors) | "rest-classify" (the image as the
    # body of POST /v2/models/<m>/classify, top-5; jpeg input) | "health"
    api: str
    input: str  # "float32" | "uint8" | "jpeg"
    shape: tuple[int, int, int]  # C, H, W of the model input
    input_name: str = "input"
    concurrency: int = 0  # closed loop when > 0
    rate: float = 0.0  # open loop (requests/s) when > 0
    duration_s: float = 10.0
    warmup_s: float = 2.0
    images_per_request: int = 1
    jpegs: tuple[bytes, ...] = field(default=(), repr=False)
    seed: int = 0
    timeout_s: float = 0.0  # the deadline each call carries; 0 = CALL_TIMEOUT_S
    http_target: str = ""  # HOST:PORT of the REST API (the rest* apis)
    # extra gRPC channel arguments of the classify api, e.g. a service config that balances a
    # target of several replicas ("ipv4:127.0.0.1:A,127.0.0.1:B")
    channel_options: tuple[tuple[str, str | int], ...] = ()


def run_job(job: Job) -> dict[str, object]:
    """Run ``job`` in this process (the parent uses :class:`ClientProcess`)."""
    return asyncio.run(_run(job))


class ClientProcess:
    """One long-lived client process (spawned, so it shares nothing with the parent) that runs
    jobs one after another."""

    def __init__(self) -> None:
        ctx = mp.get_context("spawn")
        self._jobs: mp.Queue[Job | None] = ctx.Queue()
        self._results: mp.Queue[dict[str, object]] = ctx.Queue()
        self._process = ctx.Process(target=_serve_jobs, args=(self._jobs, self._results),
                                    daemon=True, name="visionserve-bench-client")
        self._process.start()

    def run(self, job: Job) -> dict[str, object]:
        self._jobs.put(job)
        result = self._results.get(timeout=job.duration_s + job.warmup_s + 600)
        if "exception" in result:
            raise RuntimeError(f"load generator failed on {job.label} {job.api}: "
                               f"{result['exception']}")
        return result

    def close(self) -> None:
        self._jobs.put(None)
        self._process.join(timeout=30)
        if self._process.is_alive():
            self._process.kill()

    def __enter__(self) -> ClientProcess:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _serve_jobs(jobs: mp.Queue, results: mp.Queue) -> None:  # type: ignore[type-arg]
    while (job := jobs.get()) is not None:
        try:
            results.put(run_job(job))
        except Exception as exc:  # noqa: BLE001 - reported to the parent, which raises
            results.put({"exception": f"{type(exc).__name__}: {exc}"})


# --------------------------------------------------------------------------- payloads and calls

def _arrays(job: Job) -> list[np.ndarray]:
    rng = np.random.default_rng(job.seed + 1)
    c, h, w = job.shape
    if job.input == "uint8":
        return [rng.integers(0, 256, (h, w, c), dtype=np.uint8)
                for _ in range(job.images_per_request)]
    return [rng.standard_normal((c, h, w), dtype=np.float32)
            for _ in range(job.images_per_request)]


def _jpegs(job: Job) -> list[bytes]:
    if not job.jpegs:
        raise ValueError("input jpeg needs encoded images in the job")
    return [job.jpegs[i % len(job.jpegs)] for i in range(job.images_per_request)]


Call = Callable[[], Awaitable[object]]


def _classify(job: Job) -> tuple[Call, Callable[[], Awaitable[None]], type[Exception]]:
    import grpc

    from visionserve.service.cli.client import MAX_MESSAGE_BYTES, numpy_to_image
    from visionserve.v1 import visionserve_pb2 as pb
    from visionserve.v1 import visionserve_pb2_grpc as pb_grpc

    channel = grpc.aio.insecure_channel(job.target, options=[
        ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
        ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES), *job.channel_options])
    stub = pb_grpc.VisionServiceStub(channel)
    if job.input == "jpeg":
        images = [pb.Image(encoded=data) for data in _jpegs(job)]
    else:
        images = [numpy_to_image(a) for a in _arrays(job)]
    request = pb.ClassifyRequest(model=job.model, images=images, top_k=5)

    def call() -> Awaitable[object]:
        return stub.Classify(request, timeout=job.timeout_s or CALL_TIMEOUT_S)

    return call, channel.close, grpc.RpcError


def _kserve(job: Job) -> tuple[Call, Callable[[], Awaitable[None]], type[Exception]]:
    import tritonclient.grpc.aio as atc
    from tritonclient.utils import InferenceServerException

    client = atc.InferenceServerClient(job.target)
    if job.input == "jpeg":
        batch = np.array(_jpegs(job), dtype=np.object_)
        tensor = atc.InferInput(job.input_name, [len(batch)], "BYTES")
    else:
        batch = np.stack(_arrays(job))
        tensor = atc.InferInput(job.input_name, list(batch.shape),
                                "UINT8" if batch.dtype == np.uint8 else "FP32")
    tensor.set_data_from_numpy(batch)
    outputs = [atc.InferRequestedOutput("logits")]

    def call() -> Awaitable[object]:
        return client.infer(job.model, [tensor], outputs=outputs,
                            client_timeout=job.timeout_s or CALL_TIMEOUT_S)

    return call, client.close, InferenceServerException


def _rest(job: Job) -> tuple[Call, Callable[[], Awaitable[None]], type[Exception]]:
    """KServe v2 REST through tritonclient.http.aio: binary tensor data, or JSON (rest-json)."""
    import tritonclient.http.aio as ahc
    from tritonclient.utils import InferenceServerException

    if not job.http_target:
        raise ValueError(f"api {job.api} needs the server's HTTP address")
    binary = job.api == "rest"
    client = ahc.InferenceServerClient(job.http_target, conn_limit=max(job.concurrency, 100),
                                       conn_timeout=job.timeout_s or CALL_TIMEOUT_S)
    if job.input == "jpeg":
        if not binary:
            raise ValueError("JSON cannot carry image files: use --api rest or rest-classify")
        batch = np.array(_jpegs(job), dtype=np.object_)
        tensor = ahc.InferInput(job.input_name, [len(batch)], "BYTES")
    else:
        batch = np.stack(_arrays(job))
        tensor = ahc.InferInput(job.input_name, list(batch.shape),
                                "UINT8" if batch.dtype == np.uint8 else "FP32")
    tensor.set_data_from_numpy(batch, binary_data=binary)
    outputs = [ahc.InferRequestedOutput("logits", binary_data=binary)]

    def call() -> Awaitable[object]:
        return client.infer(job.model, [tensor], outputs=outputs)

    return call, client.close, InferenceServerException


def _rest_classify(job: Job) -> tuple[Call, Callable[[], Awaitable[None]], type[Exception]]:
    """The plain-HTTP image endpoint: one JPEG as the body, top-5 as JSON."""
    import aiohttp

    if not job.http_target or job.input != "jpeg" or job.images_per_request != 1:
        raise ValueError("rest-classify takes one jpeg per request and the HTTP address")
    session = aiohttp.ClientSession(
        connector=aiohttp.TCPConnector(limit=max(job.concurrency, 100)),
        timeout=aiohttp.ClientTimeout(total=job.timeout_s or CALL_TIMEOUT_S))
    url = f"http://{job.http_target}/v2/models/{job.model}/classify?top_k=5"
    body = _jpegs(job)[0]

    async def call() -> object:
        async with session.post(url, data=body) as reply:
            if reply.status != 200:
                raise _HttpStatus(reply.status)
            return await reply.json()

    return call, session.close, Exception


class _HttpStatus(Exception):
    def __init__(self, status: int) -> None:
        super().__init__(f"HTTP {status}")
        self.status_text = f"HTTP_{status}"


def _health(job: Job) -> tuple[Call, Callable[[], Awaitable[None]], type[Exception]]:
    """A round trip through the server's gRPC stack with no model: the floor of any call."""
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    channel = grpc.aio.insecure_channel(job.target)
    stub = health_pb2_grpc.HealthStub(channel)
    request = health_pb2.HealthCheckRequest(service="")

    def call() -> Awaitable[object]:
        return stub.Check(request, timeout=CALL_TIMEOUT_S)

    return call, channel.close, grpc.RpcError


class Errors:
    """Failed calls by status name, and the first message seen for each (which says why)."""

    def __init__(self) -> None:
        self.counts: Counter[str] = Counter()
        self.examples: dict[str, str] = {}

    def add(self, exc: Exception) -> None:
        name = _error_name(exc)
        self.counts[name] += 1
        self.examples.setdefault(name, _error_message(exc)[:500])


def _error_message(exc: Exception) -> str:
    details = getattr(exc, "details", None)  # grpc.aio.AioRpcError
    if callable(details):
        return str(details())
    message = getattr(exc, "message", None)  # tritonclient's InferenceServerException
    if callable(message):
        return str(message())
    return str(exc)


def _error_name(exc: Exception) -> str:
    if isinstance(exc, _HttpStatus):
        return exc.status_text
    code = getattr(exc, "code", None)
    if callable(code):  # grpc.aio.AioRpcError
        return str(code().name)
    status = getattr(exc, "status", None)  # tritonclient: "StatusCode.RESOURCE_EXHAUSTED"
    if callable(status):
        return str(status() or type(exc).__name__).removeprefix("StatusCode.")
    return type(exc).__name__


# --------------------------------------------------------------------------- the loops

async def _run(job: Job) -> dict[str, object]:
    call, close, error_type = {"kserve": _kserve, "health": _health, "rest": _rest,
                               "rest-json": _rest, "rest-classify": _rest_classify
                               }.get(job.api, _classify)(job)
    try:
        await _closed(call, error_type, max(1, job.concurrency or 4), job.warmup_s)  # warm-up
        cpu0, busy0, start = _cpu_s(), _machine_busy(), time.perf_counter()
        failed: list[float] = []
        if job.concurrency > 0:
            latencies, errors, end = await _closed(call, error_type, job.concurrency,
                                                   job.duration_s)
        else:
            latencies, errors, end = await _open(call, error_type, job.rate, job.duration_s,
                                                 job.seed, failed)
        elapsed = max(end - start, 1e-9)
        cpu = _cpu_s() - cpu0
        busy = _machine_busy()
    finally:
        await close()
    row: dict[str, object] = {
        "target": job.label, "api": job.api, "input": job.input,
        "images_per_request": job.images_per_request,
        "requests": len(latencies), "requests_per_s": len(latencies) / elapsed,
        "images_per_s": len(latencies) * job.images_per_request / elapsed,
        **latency_summary(latencies),
        "errors": sum(errors.counts.values()), "error_codes": dict(errors.counts),
        "error_examples": errors.examples,  # the first message of each code
        "client_cpu": cpu / elapsed,
        "machine_cpu": _busy_fraction(busy0, busy),
    }
    if job.concurrency > 0:
        row["concurrency"] = job.concurrency
    else:
        row["rate"] = job.rate
        row["offered_per_s"] = len(poisson_offsets(job.rate, job.duration_s, job.seed)) \
            / job.duration_s
        row["error_latency"] = latency_summary(failed)  # how fast refusals come back
    return row


async def _closed(call: Call, error_type: type[Exception], concurrency: int,
                  duration_s: float) -> tuple[list[float], Errors, float]:
    latencies: list[float] = []
    errors = Errors()
    stop_at = time.perf_counter() + duration_s
    last = [time.perf_counter()]

    async def worker() -> None:
        while time.perf_counter() < stop_at:
            t0 = time.perf_counter()
            try:
                await call()
            except error_type as exc:
                errors.add(exc)
                continue
            last[0] = time.perf_counter()
            latencies.append(last[0] - t0)

    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return latencies, errors, max(last[0], stop_at)


async def _open(call: Call, error_type: type[Exception], rate: float, duration_s: float,
                seed: int, failed: list[float] | None = None
                ) -> tuple[list[float], Errors, float]:
    """Poisson arrivals; each latency counts from the intended send time (that of each failed
    call goes to ``failed``)."""
    latencies: list[float] = []
    errors = Errors()
    offsets = poisson_offsets(rate, duration_s, seed)
    start = time.perf_counter() + 0.01
    last = [start]

    async def one(intended: float) -> None:
        try:
            await call()
        except error_type as exc:
            errors.add(exc)
            if failed is not None:
                failed.append(time.perf_counter() - intended)
            return
        now = time.perf_counter()
        last[0] = max(last[0], now)
        latencies.append(now - intended)

    tasks = []
    for offset in offsets:
        intended = start + float(offset)
        delay = intended - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        tasks.append(asyncio.ensure_future(one(intended)))
    await asyncio.gather(*tasks)
    return latencies, errors, max(last[0], start + duration_s)


def _cpu_s() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def _machine_busy() -> tuple[int, int]:
    try:
        with open("/proc/stat") as f:
            values = [int(x) for x in f.readline().split()[1:]]
    except OSError:
        return 0, 0
    return sum(values), values[3] + values[4]  # total, idle + iowait


def _busy_fraction(before: tuple[int, int], after: tuple[int, int]) -> float:
    total, idle = after[0] - before[0], after[1] - before[1]
    return (total - idle) / total if total > 0 else float("nan")
