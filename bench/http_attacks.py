"""``visionserve bench-attacks --ports http``: each class of hostile HTTP client against a real
server's REST and metrics ports (issue 35), at the server's default limits.

Per class: what is sent, what it got, whether another client's REST inference sent during the
attack was answered, and — sampled from the server process every 20 ms — its peak RSS and
threads, and the slowest answer of a health probe (``GET /v2/health/ready``, or ``/metrics`` for
the metrics port) opened on a fresh connection every 100 ms, as a kubelet or Prometheus does.
Run it against an earlier commit with ``--server-checkout DIR`` (a ``git worktree``) for the
"before" column of docs/security.md.
"""

from __future__ import annotations

import collections
import gzip
import json
import time
from collections.abc import Callable
from dataclasses import dataclass

from visionserve.service.format.model_config import InputSpec

from .http_clients import (
    connect,
    exchange,
    held,
    probe,
    read_reply,
    replies,
    request,
    statuses,
)
from .launch import Launched
from .watch import Cost, Watch

MB = 1_000_000


@dataclass(frozen=True)
class HttpAttack:
    name: str  # the class
    sent: str
    port: str  # "http" | "metrics": the port attacked and probed
    run: Callable[[Launched, str, InputSpec, Callable[[], str]], str]  # -> what it got


def _counts(got: list[bytes]) -> str:
    seen = collections.Counter(str(statuses(r)[-1]) if statuses(r) else "closed" for r in got)
    return ", ".join(f"{k} ×{v}" for k, v in seen.most_common())


def _infer_body(spec: InputSpec, batch: int = 1) -> bytes:
    return json.dumps({"inputs": [{"name": spec.name, "shape": [batch, *spec.shape],
                                   "datatype": "FP32",
                                   "data": [0.5] * (batch * spec.channels * spec.height *
                                                    spec.width)}]}).encode()


def _upload_head(model: str, length: int, expect: bool = False) -> bytes:
    return request("POST", f"/v2/models/{model}/infer", headers={
        "Content-Type": "application/json", "Content-Length": str(length),
        **({"Expect": "100-continue"} if expect else {})})


def _stalled(count: int, expect: bool) -> Callable[[Launched, str, InputSpec,
                                                    Callable[[], str]], str]:
    def run(server: Launched, model: str, spec: InputSpec, other: Callable[[], str]) -> str:
        prefix = _upload_head(model, MB, expect) + (b"" if expect else b'{"inputs": [')
        with held(server.http_port, count, prefix) as socks:
            time.sleep(0.5)
            answer = other()
            got = replies(socks, 30)
        return f"other client: {answer}; held: {_counts(got)}"
    return run


def _half_heads(server: Launched, model: str, spec: InputSpec, other: Callable[[], str]) -> str:
    with held(server.http_port, 1100, b"GET /v2/health/ready HTTP/1.1\r\nHost: x\r\n") as socks:
        time.sleep(0.5)
        answer = other()
        got = replies(socks, 30)
    return f"other client: {answer}; held: {_counts(got)}"


def _metrics_trickle(server: Launched, model: str, spec: InputSpec,
                     other: Callable[[], str]) -> str:
    prefix = request("GET", "/metrics", headers={"Content-Length": str(MB)}) + b"x"
    with held(server.metrics_port, 100, prefix) as socks:
        time.sleep(2.0)  # the probe scrapes meanwhile
        got = replies(socks, 30)
    return f"held: {_counts(got)}"


def _send(server: Launched, body: bytes, path: str, headers: dict[str, str] | None = None,
          port: int = 0) -> str:
    reply = exchange(port or server.http_port, request("POST", path, body, {
        **(headers or {}), "Connection": "close"}), timeout=120)
    found = statuses(reply)
    return str(found[0]) if found else "no answer"


def _json_array(server: Launched, model: str, spec: InputSpec, other: Callable[[], str]) -> str:
    body = b'{"inputs": [{"name": "x", "shape": [1], "datatype": "FP32", "data": [' + \
        b"0.5," * (15 * MB) + b"0.5]}]}"  # 60 MB
    return f"{_send(server, body, f'/v2/models/{model}/infer')}; other client: {other()}"


def _json_under_cap(server: Launched, model: str, spec: InputSpec,
                    other: Callable[[], str]) -> str:
    body = b'{"inputs": [{"name": "x", "shape": [1], "datatype": "FP32", "data": [' + \
        b"0.5," * 2_000_000 + b"0.5]}]}"  # 8.0 MB: under the default JSON limit (8 MiB)
    return f"{_send(server, body, f'/v2/models/{model}/infer')}; other client: {other()}"


def _gzip_strings(server: Launched, model: str, spec: InputSpec,
                  other: Callable[[], str]) -> str:
    body = gzip.compress(b'{"inputs": [{"name": "x", "shape": [1], "datatype": "BYTES", '
                         b'"data": ["' + b'ab","' * 3_000_000 + b'ab"]}]}', 9)
    status = _send(server, body, f"/v2/models/{model}/infer", {"Content-Encoding": "gzip"})
    return f"{status} ({len(body) // 1000} KB sent); other client: {other()}"


def _outputs(server: Launched, model: str, spec: InputSpec, other: Callable[[], str]) -> str:
    body = json.loads(_infer_body(spec))
    body["outputs"] = [{"name": "logits"}] * 100_000
    data = json.dumps(body).encode()
    return f"{_send(server, data, f'/v2/models/{model}/infer')} ({len(data) // 1000} KB)"


def _large_heads(server: Launched, model: str, spec: InputSpec, other: Callable[[], str]) -> str:
    head = request("GET", "/v2/health/live", headers={
        f"X-Field-{i}": "v" * 8000 for i in range(100)})  # 800 KB, each field within 8 KiB
    results: list[bytes] = []
    with held(server.http_port, 300, head) as socks:
        answer = other()
        results = replies(socks, 30)
    return f"other client: {answer}; heads: {_counts(results)}"


def _multipart(server: Launched, model: str, spec: InputSpec, other: Callable[[], str]) -> str:
    chunk = b"%x\r\n%s\r\n" % (1 << 20, b"p" * (1 << 20))
    with connect(server.http_port) as sock:
        sock.sendall(request("POST", f"/v2/models/{model}/classify", headers={
            "Content-Type": "multipart/form-data; boundary=never-sent",
            "Transfer-Encoding": "chunked"}))
        try:
            for _ in range(80):  # 80 MiB, no boundary anywhere
                sock.sendall(chunk)
            sock.sendall(b"0\r\n\r\n")
        except OSError:
            pass
        found = statuses(read_reply(sock, 60))
    return f"{found[0] if found else 'no answer'}; other client: {other()}"


def _smuggling(server: Launched, model: str, spec: InputSpec, other: Callable[[], str]) -> str:
    reply = exchange(server.http_port, request(
        "POST", "/v2/repository/index", version="HTTP/1.0",
        headers={"Connection": "keep-alive", "Transfer-Encoding": "chunked"}) +
        b"0\r\n\r\n" + request("GET", "/v2/health/live"), timeout=10)
    return f"statuses {statuses(reply)} (two: the smuggled request was answered too)"


def _malformed_flood(server: Launched, model: str, spec: InputSpec,
                     other: Callable[[], str]) -> str:
    before = server.log_path.read_text(errors="replace")
    for _ in range(500):
        exchange(server.http_port, b"GET /v2/\x01health HTTP/1.1\r\nHost: x\r\n\r\n", timeout=10)
    for _ in range(100):  # and clients that leave mid-body
        with connect(server.http_port) as sock:
            sock.sendall(_upload_head(model, 10_000) + b'{"in')
    time.sleep(0.5)
    added = server.log_path.read_text(errors="replace")[len(before):]
    return (f"log +{len(added.splitlines())} lines, {added.count('Traceback')} tracebacks; "
            f"other client: {other()}")


HTTP_ATTACKS = (
    HttpAttack("stalled uploads", "1,100 uploads (over the 1,024 bound) that stall after "
               "their head", "http", _stalled(1100, expect=False)),
    HttpAttack("stalled uploads", "300 `Expect: 100-continue` heads whose body never comes",
               "http", _stalled(300, expect=True)),
    HttpAttack("stalled heads", "1,100 connections with half a request head", "http",
               _half_heads),
    HttpAttack("metrics bodies", "100 `/metrics` requests that declare 1 MB and trickle it",
               "metrics", _metrics_trickle),
    HttpAttack("JSON size", "a 60 MB JSON array in one infer request", "http", _json_array),
    HttpAttack("JSON size", "an 8.0 MB JSON array (under the JSON limit)", "http",
               _json_under_cap),
    HttpAttack("JSON counts", "gzip of 3 M JSON strings (12 MB)", "http", _gzip_strings),
    HttpAttack("JSON counts", "100,000 requested outputs", "http", _outputs),
    HttpAttack("request heads", "300 heads of 100 × 8 KB fields", "http", _large_heads),
    HttpAttack("multipart", "80 MiB multipart body with no boundary, chunked", "http",
               _multipart),
    HttpAttack("framing", "HTTP/1.0 + Transfer-Encoding with a request smuggled behind",
               "http", _smuggling),
    HttpAttack("logs", "500 malformed requests and 100 clients leaving mid-body", "http",
               _malformed_flood),
)


@dataclass
class HttpOutcome:
    attack: HttpAttack
    got: str
    seconds: float
    cost: Cost  # its probe: GET on a fresh connection every 100 ms


def run_http_attack(server: Launched, attack: HttpAttack, model: str,
                    spec: InputSpec) -> HttpOutcome:
    pid = server.process.pid
    port = server.http_port if attack.port == "http" else server.metrics_port
    path = "/v2/health/ready" if attack.port == "http" else "/metrics"

    def other() -> str:
        try:
            return _send(server, _infer_body(spec), f"/v2/models/{model}/infer")
        except OSError as exc:
            return f"refused ({exc.__class__.__name__})"

    time.sleep(1.0)  # the previous attack's connections are gone
    with Watch(pid, lambda: probe(port, path, timeout=10)[0] == 200, every_s=0.1) as watch:
        start = time.monotonic()
        got = attack.run(server, model, spec, other)
        seconds = time.monotonic() - start
        time.sleep(0.3)
        time.sleep(1.0)
        return HttpOutcome(attack, got, seconds, watch.cost())


def http_markdown(outcomes: list[HttpOutcome]) -> str:
    lines = ["| class | sent | got | RSS before → peak → after (MB) | threads | "
             "slowest probe |", "|---|---|---|---|---|---|"]
    for o in outcomes:
        lines.append(f"| {o.attack.name} | {o.attack.sent} | {o.got} | {o.cost.cells()} |")
    return "\n".join(lines) + "\n"
