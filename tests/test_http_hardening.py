"""The HTTP ports hold against hostile clients as the gRPC port does (docs/security.md): each
class of attack against a real server process, and during it a health probe on a fresh
connection, another client's REST request and a gRPC call are answered. Every wait is bounded by
a deadline on the call (the hang guard); nothing asserts how long anything took.

Short forms here (a bound of 48 connections, a 1 MiB JSON limit); VISIONSERVE_LONG_TESTS=1 (as
`make test-all` runs it) attacks at the default bound of 1024 connections."""

from __future__ import annotations

import gzip
import json
import os
import re
import ssl

import grpc
import numpy as np
import pytest
from test_security import pki  # noqa: F401  (the certificates fixture)

from conftest import make_repo, tensor_image
from visionserve.bench.http_clients import (
    connect,
    error_message,
    exchange,
    held,
    probe,
    read_reply,
    replies,
    request,
    statuses,
)
from visionserve.bench.launch import rss_mb, start_visionserve
from visionserve.service.format.model_format import INPUT
from visionserve.v1 import visionserve_pb2 as pb
from visionserve.v1 import visionserve_pb2_grpc as pb_grpc

LONG = os.environ.get("VISIONSERVE_LONG_TESTS") == "1"
BOUND = 1024 if LONG else 48  # --http-max-connections
JSON_LIMIT = 1024 * 1024  # --max-json-bytes
BODY_LIMIT = 8 * 1024 * 1024  # --max-message-bytes
TOKEN = "hardening-token-0123456789"
DIGIT = np.zeros((32, 32, 1), np.uint8)


@pytest.fixture(scope="module")
def srv(exported_repo, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("hardening")
    token = tmp / "token"
    token.write_text(TOKEN)
    server = start_visionserve(
        make_repo(exported_repo, tmp / "repo", ("lenet5",)), "--model-control", "none",
        "--max-inflight-requests", "4", "--max-json-bytes", str(JSON_LIMIT),
        "--max-message-bytes", str(BODY_LIMIT),
        *(() if LONG else ("--http-max-connections", str(BOUND))),
        "--auth-token-file", str(token), "--auth-open", "inference,metadata,statistics",
        log_path=tmp / "server.log", ready_timeout_s=120)
    yield server
    server.stop()


def infer_json(batch: int = 1) -> bytes:
    return json.dumps({"inputs": [{"name": INPUT, "shape": [batch, 1, 32, 32],
                                   "datatype": "FP32", "data": [0.5] * (1024 * batch)}]}
                      ).encode()


def rest(srv, method: str, path: str, body: bytes = b"",
         headers: dict[str, str] | None = None) -> tuple[int, str]:
    reply = exchange(srv.http_port, request(method, path, body,
                                            {**(headers or {}), "Connection": "close"}))
    found = statuses(reply)
    return (found[0] if found else 0), error_message(reply)


def still_answering(srv) -> None:
    """A health probe on a fresh connection, another client's REST inference and a gRPC call
    are answered."""
    assert probe(srv.http_port)[0] == 200
    assert rest(srv, "POST", "/v2/models/lenet5/infer", infer_json())[0] == 200
    with grpc.insecure_channel(srv.target) as channel:
        reply = pb_grpc.VisionServiceStub(channel).Classify(
            pb.ClassifyRequest(model="lenet5", images=[tensor_image(DIGIT)]), timeout=30)
    assert reply.version == 1


def upload_head(length: int, expect: bool = False) -> bytes:
    return request("POST", "/v2/models/lenet5/infer", headers={
        "Content-Type": "application/json", "Content-Length": str(length),
        **({"Expect": "100-continue"} if expect else {})})


# --- slow and stalled clients ----------------------------------------------------------------

def test_stalled_uploads_hold_no_inference_slot_and_cannot_lock_out_a_probe(srv):
    """More uploads than the connection bound start and stall (and Expect: 100-continue heads
    whose body never comes): other clients' calls are answered, the stalled ones get a 408 (or
    were evicted for fresh connections) and the server is as it was."""
    before = rss_mb(srv.process.pid)
    stalled = upload_head(JSON_LIMIT // 2) + b'{"inputs": ['
    with held(srv.http_port, BOUND + 8, stalled) as uploads, \
            held(srv.http_port, 8, upload_head(JSON_LIMIT // 2, expect=True)) as waiting:
        still_answering(srv)  # 4 inference slots, 56 stalled uploads: none holds a slot
        got = replies(uploads + waiting)
    assert all(statuses(r)[-1:] in ([408], []) for r in got), got[:3]  # cut, or evicted
    timed_out = [r for r in got if statuses(r)[-1:] == [408]]
    assert timed_out and all("request body" in error_message(r) for r in timed_out)
    assert any(r.startswith(b"HTTP/1.1 100 Continue") for r in got[-8:])
    still_answering(srv)
    assert rss_mb(srv.process.pid) < before + 100


def test_half_sent_heads_beyond_the_bound_evict_the_stalest_not_the_probe(srv):
    with held(srv.http_port, BOUND * 2, b"GET /v2/health/ready HTTP/1.1\r\nHost: x\r\n") as socks:
        still_answering(srv)
        got = replies(socks)
    assert all(statuses(r) in ([408], []) for r in got)


def test_a_malformed_chunked_trailer_is_answered_at_once_not_at_a_timeout(srv):
    reply = exchange(srv.http_port, request(
        "POST", "/v2/repository/index", headers={"Transfer-Encoding": "chunked"}) +
        b"2\r\n{}\r\n0\r\nnot a field\r\n")  # and no blank line: the server must not wait
    assert statuses(reply) == [400] and "trailer" in error_message(reply)


def test_the_metrics_port_takes_no_bodies_and_held_connections_cannot_lock_out_a_scrape(srv):
    trickle = request("GET", "/metrics", headers={"Content-Length": "1000000"}) + b"x"
    with held(srv.metrics_port, 70, trickle) as bodies, \
            held(srv.metrics_port, 70, b"GET /metrics HTTP/1.1\r\n") as heads:
        assert probe(srv.metrics_port, "/metrics")[0] == 200
        got = replies(bodies)
        replies(heads)
    assert all(statuses(r) in ([400], []) for r in got)
    # the refusal's reason, on a connection of its own (under load the held ones may all have
    # been closed by their timers before their heads were read)
    alone = exchange(srv.metrics_port, trickle)
    assert statuses(alone) == [400] and "takes no request body" in error_message(alone)


def test_tls_handshakes_count_from_accept_and_stalled_ones_are_evicted(exported_repo, tmp_path,
                                                                      pki):  # noqa: F811
    server = start_visionserve(make_repo(exported_repo, tmp_path / "repo", ("lenet5",)),
                               "--model-control", "none", "--http-max-connections", "8",
                               "--tls-cert", str(pki.server_cert), "--tls-key",
                               str(pki.server_key), log_path=tmp_path / "s.log",
                               ready_timeout_s=120)
    context = ssl.create_default_context(cafile=pki.ca)
    try:
        with held(server.http_port, 20, b"") as silent:  # TCP only: never a ClientHello
            assert probe(server.http_port, context=context)[0] == 200
            assert sum(read_reply(s, 30) == b"" for s in silent) == 20  # closed, not answered
    finally:
        server.stop()


# --- unbounded work before any limit ---------------------------------------------------------

def test_json_bodies_are_bounded_before_they_are_parsed(srv):
    status, message = rest(srv, "POST", "/v2/models/lenet5/infer", b" " * (JSON_LIMIT + 1))
    assert status == 413 and "--max-json-bytes" in message and "binary data" in message
    containers = b"[" + b"[]," * 300_000 + b"[]]"  # 900 KB: 300,000 lists if parsed
    status, message = rest(srv, "POST", "/v2/models/lenet5/infer", containers)
    assert status == 413 and "arrays and objects" in message
    bomb = gzip.compress(b'["' + b'a","' * 3_000_000 + b'a"]', 9)  # ~12 KB → 12 MB
    status, message = rest(srv, "POST", "/v2/models/lenet5/infer", bomb,
                           {"Content-Encoding": "gzip"})
    assert status == 413 and "decompresses to over the JSON limit" in message
    assert len(bomb) < 64 * 1024
    still_answering(srv)


def test_json_counts_are_the_grpc_wire_limits_checked_before_conversion(srv):
    base = json.loads(infer_json())
    for extra, field in (({"outputs": [{"name": "logits"}] * 1000}, "outputs"),
                         ({"parameters": {f"p{i}": i for i in range(100)}}, "parameters"),
                         ({"inputs": base["inputs"] * 17}, "inputs")):
        status, message = rest(srv, "POST", "/v2/models/lenet5/infer",
                               json.dumps({**base, **extra}).encode())
        assert status == 400 and f"{field}: more than" in message, message
    strings = {"inputs": [{"name": INPUT, "shape": [1000], "datatype": "BYTES",
                           "data": ["ab"] * 1000}]}
    status, message = rest(srv, "POST", "/v2/models/lenet5/infer", json.dumps(strings).encode())
    assert status == 413 and "BYTES elements" in message
    twice = b'{"inputs": [], "inputs": ' + json.dumps(base["inputs"]).encode() + b"}"
    status, message = rest(srv, "POST", "/v2/models/lenet5/infer", twice)
    assert status == 400 and "'inputs' twice" in message


def test_large_tensors_go_as_binary_data_past_the_json_limit(srv):
    batch = 256  # lenet5's max batch: 1 MiB of FP32, over the JSON limit as JSON
    data = np.full((batch, 1, 32, 32), 0.5, "<f4").tobytes()
    header = json.dumps({"inputs": [{"name": INPUT, "shape": [batch, 1, 32, 32],
                                     "datatype": "FP32",
                                     "parameters": {"binary_data_size": len(data)}}]}).encode()
    status, _ = rest(srv, "POST", "/v2/models/lenet5/infer", header + data,
                     {"Inference-Header-Content-Length": str(len(header))})
    assert len(header + data) > JSON_LIMIT and status == 200


def test_request_heads_are_capped_as_a_whole(srv):
    fields = {f"X-Field-{i}": "v" * 1000 for i in range(100)}  # 100 KB, each field small
    reply = exchange(srv.http_port, request("GET", "/v2/health/ready", headers=fields))
    assert statuses(reply) == [431] and "64 KiB" in error_message(reply)
    fields = {f"X-Field-{i}": "v" * 1000 for i in range(60)}  # 60 KB: within the cap
    assert rest(srv, "GET", "/v2/health/ready", headers=fields)[0] == 200


def test_a_multipart_body_is_read_within_the_body_limit_before_it_is_parsed(srv):
    """A multipart body with no boundary at all, sent chunked (no declared length): refused
    once it passes the body limit, not read on as a preamble."""
    chunk = b"%x\r\n%s\r\n" % (1 << 20, b"p" * (1 << 20))
    with connect(srv.http_port) as sock:
        sock.sendall(request("POST", "/v2/models/lenet5/classify", headers={
            "Content-Type": "multipart/form-data; boundary=never-sent",
            "Transfer-Encoding": "chunked"}))
        try:
            for _ in range(BODY_LIMIT // (1 << 20) + 4):
                sock.sendall(chunk)
        except OSError:  # the server answered and closed while we were sending
            pass
        reply = read_reply(sock)
    assert statuses(reply) == [413] and "--max-message-bytes" in error_message(reply)
    still_answering(srv)


# --- framing, versions and names -------------------------------------------------------------

def test_http_1_0_with_transfer_encoding_is_refused_and_nothing_is_smuggled(srv):
    smuggled = request("GET", "/v2/health/live")
    reply = exchange(srv.http_port, request(
        "POST", "/v2/repository/index", version="HTTP/1.0",
        headers={"Connection": "keep-alive", "Transfer-Encoding": "chunked"}) +
        b"0\r\n\r\n" + smuggled)
    assert statuses(reply) == [400] and "HTTP/1.0" in error_message(reply)
    reply = exchange(srv.http_port, request("POST", "/v2/repository/index", b"{}", {
        "Transfer-Encoding": "chunked"}) + smuggled)
    assert statuses(reply) == [400] and "both Transfer-Encoding and Content-Length" in \
        error_message(reply)


@pytest.mark.parametrize("version", ["HTTP/1.2", "HTTP/2.0", "HTTP/3.0"])
def test_other_http_versions_get_505_in_http_1_1(srv, version):
    reply = exchange(srv.http_port, request("GET", "/v2/health/live", version=version))
    assert reply.startswith(b"HTTP/1.1 505 ") and version in error_message(reply)


@pytest.mark.parametrize("host", ["a b", "x/y", "[zz]", "h@st"])
def test_an_invalid_host_is_a_400(srv, host):
    reply = exchange(srv.http_port, request("GET", "/v2/health/live", headers={"Host": host}))
    assert statuses(reply) == [400] and "Host" in error_message(reply)


def test_a_request_pipelined_behind_an_h2c_upgrade_is_answered(srv):
    reply = exchange(srv.http_port, request("GET", "/v2/health/live", headers={
        "Connection": "Upgrade, HTTP2-Settings", "Upgrade": "h2c",
        "HTTP2-Settings": "AAMAAABkAARAAAAAAAIAAAAA"}) +
        request("GET", "/v2/health/ready", headers={"Connection": "close"}))
    assert statuses(reply) == [200, 200] and b'{"ready":true}' in reply


@pytest.mark.parametrize("version", ["%EF%BC%91", "%201", "1%20", "1_0", "+1", "0x1",
                                     "%D9%A1"])
def test_model_versions_are_ascii_digits(srv, version):
    status, message = rest(srv, "GET", f"/v2/models/lenet5/versions/{version}/ready")
    assert status == 400 and "ASCII digits" in message
    assert rest(srv, "GET", "/v2/models/lenet5/versions/1/ready")[0] == 200


def test_a_non_utf8_authorization_header_is_a_401_not_a_500(srv):
    reply = exchange(srv.http_port, b"POST /v2/repository/index HTTP/1.1\r\nHost: x\r\n"
                     b"Authorization: Bearer \xff\xfe\xfd\r\nConnection: close\r\n\r\n")
    assert statuses(reply) == [401]
    status, _ = rest(srv, "POST", "/v2/repository/index", b"{}",
                     {"Authorization": f"Bearer {TOKEN}"})
    assert status == 200


# --- logs and errors under attack ------------------------------------------------------------

def test_malformed_and_abandoned_requests_log_a_bounded_number_of_lines(srv):
    log_before = srv.log_path.read_text(errors="replace")
    for _ in range(200):  # what aiohttp itself refuses: a target with a control character
        exchange(srv.http_port, b"GET /v2/\x01health HTTP/1.1\r\nHost: x\r\n\r\n", timeout=10)
    for expect in (False, True):  # clients that leave mid-body, or during 100-continue
        for _ in range(20):
            with connect(srv.http_port) as sock:
                sock.sendall(upload_head(10_000, expect) + (b"" if expect else b'{"in'))
                if expect:
                    assert read_reply_until(sock, b"100 Continue")
    still_answering(srv)
    added = srv.log_path.read_text(errors="replace")[len(log_before):]
    assert "Traceback" not in added and len(added.splitlines()) < 60, added[-3000:]
    metrics = exchange(srv.metrics_port, request("GET", "/metrics",
                                                 headers={"Connection": "close"})).decode()
    assert re.search(r'code="CANCELLED",[^}]*method="http.ModelInfer"', metrics)
    assert 'code="INTERNAL"' not in metrics


def read_reply_until(sock, marker: bytes) -> bytes:
    sock.settimeout(30)
    got = b""
    while marker not in got and (chunk := sock.recv(4096)):
        got += chunk
    return got


def test_bench_attacks_measures_an_attack_and_the_probes_during_it(srv):
    """`visionserve bench-attacks --ports http` (docs/security.md's table) on one class."""
    from visionserve.bench.http_attacks import HTTP_ATTACKS, run_http_attack
    from visionserve.service.format.model_config import InputSpec

    smuggling = next(a for a in HTTP_ATTACKS if a.name == "framing")
    spec = InputSpec(channels=1, height=32, width=32, color="L", resize=32, mean=(0.5,),
                     std=(0.5,))  # lenet5's
    outcome = run_http_attack(srv, smuggling, "lenet5", spec)
    assert outcome.got.startswith("statuses [400]")
    assert outcome.cost.probe_failures == 0 and outcome.cost.threads_after > 0
