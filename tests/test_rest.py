"""The HTTP/REST API of a server process: KServe v2 REST driven by Triton's unmodified
``tritonclient.http`` (JSON and binary tensor data, compared with the same server through
``tritonclient.grpc``; explicit model control), and what only the process shows: the ports it
opens with ``--no-http`` (its ready file), and its RSS under a 70 MB body of undeclared length.

The REST routes and statuses (the image endpoints compared with our own gRPC replies, what
clients get wrong, body, header and compression limits, deadlines and request ids, the token
on HTTP, readiness while a version swaps in) moved to tests/inprocess/test_rest_routes.py;
readiness while the models load is tests/inprocess/test_startup.py's.

Like test_kserve, this module must never import visionserve.inference (tritonclient's
``inference.*`` protobuf symbols live in this process).
"""

from __future__ import annotations

import http.client
import json
import socket

import numpy as np
import pytest

from conftest import encode, photo, start_server
from visionserve.service.format.model_format import EMBEDDING, INPUT, LOGITS

th = pytest.importorskip("tritonclient.http")
tg = pytest.importorskip("tritonclient.grpc")
from tritonclient.utils import InferenceServerException  # noqa: E402


@pytest.fixture(scope="module")
def rest(server):
    client = th.InferenceServerClient(f"127.0.0.1:{server.http_port}")
    yield client
    client.close()


@pytest.fixture(scope="module")
def grpc_kserve(server):
    client = tg.InferenceServerClient(server.address)
    yield client
    client.close()


@pytest.fixture(scope="module")
def cat() -> bytes:
    return encode(photo("chelsea"))


def call(server, method: str, path: str, body: bytes = b"",
         headers: dict[str, str] | None = None) -> tuple[int, dict[str, str], bytes]:
    """One raw HTTP request: (status, headers, body)."""
    conn = http.client.HTTPConnection("127.0.0.1", server.http_port, timeout=60)
    try:
        conn.request(method, path, body=body, headers=headers or {})
        reply = conn.getresponse()
        return reply.status, dict(reply.getheaders()), reply.read()
    finally:
        conn.close()


def infer_body(header: dict, binary: bytes = b"") -> tuple[bytes, dict[str, str]]:
    text = json.dumps(header).encode()
    headers = {"Inference-Header-Content-Length": str(len(text))} if binary else {}
    return text + binary, headers


def still_serving(server) -> None:
    status, _, body = call(server, "GET", "/v2/health/ready")
    assert status == 200 and json.loads(body) == {"ready": True}
    x = [[[[0.0] * 32] * 32]]
    body, _ = infer_body({"inputs": [{"name": INPUT, "shape": [1, 1, 32, 32], "datatype": "FP32",
                                      "data": x}]})
    status, _, reply = call(server, "POST", "/v2/models/lenet5/infer", body)
    assert status == 200, reply[:300]


# --- tritonclient.http, unmodified --------------------------------------------------------

def test_tritonclient_http_sees_health_metadata_config_stats_and_the_index(rest):
    assert rest.is_server_live() and rest.is_server_ready()
    assert rest.is_model_ready("resnet18") and rest.is_model_ready("resnet18", "1")
    assert not rest.is_model_ready("no_such_model")
    meta = rest.get_server_metadata()
    assert meta["name"] == "visionserve" and "binary_tensor_data" in meta["extensions"]
    model = rest.get_model_metadata("resnet18")
    assert model["versions"] == ["1"] and model["platform"] == "onnxruntime_onnx"
    assert model["inputs"][0] == {"name": INPUT, "datatype": "FP32", "shape": [-1, 3, 224, 224]}
    assert {o["name"]: o["shape"] for o in model["outputs"]} == {LOGITS: [-1, 1000],
                                                                 EMBEDDING: [-1, 512]}
    config = rest.get_model_config("resnet18")
    assert config["max_batch_size"] == 32 and config["input"][0]["dims"] == [3, 224, 224]
    stats = rest.get_inference_statistics("resnet18")["model_stats"][0]
    assert stats["name"] == "resnet18" and isinstance(stats["inference_count"], int)
    assert stats["inference_stats"]["fail"].keys() == {"count", "ns"}
    index = {(m["name"], m["version"]): m["state"] for m in rest.get_model_repository_index()}
    assert index[("resnet18", "1")] == "READY"
    with pytest.raises(InferenceServerException) as err:
        rest.get_model_metadata("no_such_model")
    assert err.value.status() == "404" and "no_such_model" in err.value.message()


@pytest.mark.parametrize("binary", [True, False], ids=["binary", "json"])
def test_rest_infer_equals_grpc_model_infer_bit_for_bit(rest, grpc_kserve, binary):
    x = np.random.default_rng(3).standard_normal((2, 3, 224, 224)).astype(np.float32)
    tensor = th.InferInput(INPUT, list(x.shape), "FP32")
    tensor.set_data_from_numpy(x, binary_data=binary)
    got = rest.infer("resnet18", [tensor], outputs=[
        th.InferRequestedOutput(LOGITS, binary_data=binary),
        th.InferRequestedOutput(EMBEDDING, binary_data=binary)])
    same = tg.InferInput(INPUT, list(x.shape), "FP32")
    same.set_data_from_numpy(x)
    want = grpc_kserve.infer("resnet18", [same])
    for name in (LOGITS, EMBEDDING):
        assert got.as_numpy(name).dtype == np.float32
        assert got.as_numpy(name).tobytes() == want.as_numpy(name).tobytes(), name
    assert got.get_response()["model_version"] == "1"


def test_rest_classification_extension_and_jpeg_bytes_equal_grpc(rest, grpc_kserve, cat):
    images = np.array([cat, cat], dtype=np.object_)
    tensor = th.InferInput(INPUT, [2], "BYTES")
    tensor.set_data_from_numpy(images)
    got = rest.infer("resnet18", [tensor],
                     outputs=[th.InferRequestedOutput(LOGITS, class_count=3)]).as_numpy(LOGITS)
    same = tg.InferInput(INPUT, [2], "BYTES")
    same.set_data_from_numpy(images)
    want = grpc_kserve.infer("resnet18", [same], outputs=[
        tg.InferRequestedOutput(LOGITS, class_count=3)]).as_numpy(LOGITS)
    assert got.shape == (2, 3) and got.tolist() == want.tolist()


def test_compressed_requests_and_replies_through_tritonclient(rest, grpc_kserve):
    x = np.random.default_rng(4).standard_normal((1, 1, 32, 32)).astype(np.float32)
    tensor = th.InferInput(INPUT, list(x.shape), "FP32")
    tensor.set_data_from_numpy(x)
    for algorithm in ("gzip", "deflate"):
        got = rest.infer("lenet5", [tensor], request_compression_algorithm=algorithm,
                         response_compression_algorithm=algorithm)
        same = tg.InferInput(INPUT, list(x.shape), "FP32")
        same.set_data_from_numpy(x)
        assert got.as_numpy(LOGITS).tobytes() == \
            grpc_kserve.infer("lenet5", [same]).as_numpy(LOGITS).tobytes()


def test_tritonclient_http_loads_and_unloads_in_explicit_mode(exported_repo, tmp_path):
    from conftest import make_repo

    srv = start_server(make_repo(exported_repo, tmp_path / "repo", ("lenet5", "resnet18")),
                       tmp_path / "server.log", "--model-control", "explicit",
                       "--trust-network", "--load-model", "lenet5")
    client = th.InferenceServerClient(f"127.0.0.1:{srv.http_port}")
    try:
        assert client.is_model_ready("lenet5") and not client.is_model_ready("resnet18")
        client.load_model("resnet18")
        assert client.is_model_ready("resnet18")
        client.unload_model("lenet5")
        assert not client.is_model_ready("lenet5")
        states = {m["name"]: m.get("state") for m in client.get_model_repository_index()}
        assert states["resnet18"] == "READY" and states["lenet5"] != "READY"
        with pytest.raises(InferenceServerException) as err:
            client.load_model("lenet5", config='{"max_batch_size": 4}')
        assert err.value.status() == "400" and "not supported" in err.value.message()
    finally:
        client.close()
        srv.stop()


# --- what only the server process shows -------------------------------------------------------

def test_no_http_serves_grpc_only(exported_repo, tmp_path):
    from conftest import make_repo

    srv = start_server(make_repo(exported_repo, tmp_path / "repo", ("lenet5",)),
                       tmp_path / "server.log", "--no-http")
    try:
        assert srv.http_port == 0
        assert "HTTP (KServe v2 REST) listening" not in srv.log()
    finally:
        srv.stop()


def test_a_70mb_body_without_a_declared_length_is_cut_at_the_limit_and_memory_stays_bounded(
        server):
    from visionserve.bench.launch import rss_mb

    before = rss_mb(server.process.pid)
    chunk = b"[" * (1 << 20)
    with socket.create_connection(("127.0.0.1", server.http_port), timeout=60) as sock:
        sock.sendall(b"POST /v2/models/lenet5/infer HTTP/1.1\r\nHost: x\r\n"
                     b"Transfer-Encoding: chunked\r\n\r\n")
        try:
            for _ in range(70):
                sock.sendall(b"%x\r\n%s\r\n" % (len(chunk), chunk))
            sock.sendall(b"0\r\n\r\n")
        except (BrokenPipeError, ConnectionResetError):
            pass  # refused at the limit and closed: what we want
        reply = sock.recv(65536)
    assert reply.startswith(b"HTTP/1.1 413"), reply[:200]
    # what it held is at most the 64 MiB limit, and released
    assert rss_mb(server.process.pid) - before < 150
    still_serving(server)
