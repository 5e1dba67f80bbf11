"""Start-up, with the models' loading held open by the test: the server listens at once, says
it is not ready (gRPC health, REST readiness), answers inference only with codes a client
retries, and turns ready when the last model has loaded. (What only a process shows, the
ready file and the exit codes, stays in tests/test_server_process.py.)"""

from __future__ import annotations

import http.client
import threading
from collections import Counter

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from conftest import encode, eventually, photo
from inprocess.harness import InProcessServer, fake_repo
from visionserve.v1 import visionserve_pb2 as pb

MODELS = ("lenet5", "mobilenet_v3_small", "resnet18")
JPEG = encode(photo("chelsea")[::4, ::4])


def get(srv, path: str) -> tuple[int, bytes]:
    conn = http.client.HTTPConnection("127.0.0.1", srv.http_port, timeout=10)
    try:
        conn.request("GET", path)
        reply = conn.getresponse()
        return reply.status, reply.read()
    finally:
        conn.close()


def health(srv, name: str = "") -> int:
    return health_pb2_grpc.HealthStub(srv.channel).Check(
        health_pb2.HealthCheckRequest(service=name), timeout=10).status


def test_while_models_load_it_listens_not_ready_then_ready_once_all_have_loaded(
        tmp_path, engines):
    engines.hold_loads()
    srv = InProcessServer(fake_repo(tmp_path / "repo", MODELS), engines=engines,
                          wait_ready=False)
    try:
        assert get(srv, "/v2/health/ready") == (503, b'{"ready":false}')
        assert health(srv) == health_pb2.HealthCheckResponse.NOT_SERVING
        assert get(srv, "/v2/health/live")[0] == 200  # alive: no restart while loading
        engines.release_loads()
        eventually(lambda: get(srv, "/v2/health/ready")[0] == 200,
                   "readiness once the models loaded")
        assert health(srv) == health_pb2.HealthCheckResponse.SERVING
        assert {n: health(srv, n) for n in MODELS} == dict.fromkeys(
            MODELS, health_pb2.HealthCheckResponse.SERVING)
    finally:
        srv.stop()


def test_calls_during_start_up_get_only_codes_a_client_retries(tmp_path, engines):
    """Clients call from the moment the port opens, while the loads are held: every answer is
    OK or UNAVAILABLE (retry), never FAILED_PRECONDITION or NOT_FOUND; once the loads finish,
    each client gets its 20 answers."""
    engines.hold_loads()
    srv = InProcessServer(fake_repo(tmp_path / "repo", MODELS), engines=engines,
                          wait_ready=False)
    codes: Counter[str] = Counter()
    refused_while_loading = threading.Barrier(len(MODELS) * 2 + 1)

    def client(name: str) -> None:
        request = pb.ClassifyRequest(model=name, images=[pb.Image(encoded=JPEG)])
        ok, first = 0, True
        while ok < 20:
            try:
                srv.stub.Classify(request, timeout=60)
                codes["OK"] += 1
                ok += 1
            except grpc.RpcError as err:
                codes[err.code().name] += 1
                if err.code() != grpc.StatusCode.UNAVAILABLE:
                    break
            if first:  # every client has met the loading server once before it may finish
                first = False
                refused_while_loading.wait(60)

    threads = [threading.Thread(target=client, args=(n,)) for n in MODELS for _ in range(2)]
    try:
        for t in threads:
            t.start()
        refused_while_loading.wait(60)
        engines.release_loads()
        for t in threads:
            t.join(timeout=120)
    finally:
        srv.stop()
    assert set(codes) <= {"OK", "UNAVAILABLE"}, codes
    assert codes["OK"] == 20 * len(threads), codes
    assert codes["UNAVAILABLE"] >= len(threads), codes  # each client met the loading server
