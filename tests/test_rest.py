"""The HTTP/REST API: KServe v2 REST driven by Triton's unmodified ``tritonclient.http`` (JSON
and binary tensor data), the image endpoints, and what clients get wrong, over raw HTTP.

Like test_kserve, this module must never import visionserve.inference (tritonclient's
``inference.*`` protobuf symbols live in this process).
"""

from __future__ import annotations

import gzip
import http.client
import json
import socket
import zlib

import numpy as np
import pytest

from conftest import encode, photo, start_server
from visionserve.service.model_format import EMBEDDING, INPUT, LOGITS
from visionserve.v1 import visionserve_pb2 as pb

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


def error_of(reply: tuple[int, dict[str, str], bytes]) -> tuple[int, str]:
    status, headers, body = reply
    assert headers["Content-Type"].startswith("application/json"), body[:200]
    return status, json.loads(body)["error"]


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


# --- images over plain HTTP -------------------------------------------------------------------

def test_a_photo_posted_as_the_body_classifies_as_grpc_classify_does(server, cat):
    want = server.stub.Classify(pb.ClassifyRequest(model="resnet18", top_k=3,
                                                   images=[pb.Image(encoded=cat)]))
    # curl --data-binary labels it a form; curl -T sends PUT; both are the file itself
    for method, headers in (("POST", {"Content-Type": "application/x-www-form-urlencoded"}),
                            ("PUT", {"Expect": "100-continue"})):
        status, reply_headers, body = call(server, method, "/v2/models/resnet18/classify?top_k=3",
                                           cat, {**headers, "X-Request-ID": "cat-1"})
        assert status == 200, body[:300]
        reply = json.loads(body)
        assert reply_headers["X-Request-ID"] == "cat-1"
        assert (reply["model"], reply["version"]) == ("resnet18", 1)
        classes = reply["results"][0]["classes"]
        assert [(c["index"], c["label"]) for c in classes] == \
            [(c.index, c.label) for c in want.results[0].classes]
        assert [np.float32(c["score"]) for c in classes] == \
            [np.float32(c.score) for c in want.results[0].classes]


def test_several_photos_as_multipart_and_embed_as_grpc_does(server, cat):
    other = encode(photo("astronaut"), "PNG")
    boundary = "visionserve-test"
    body = b"".join(
        f"--{boundary}\r\nContent-Disposition: form-data; name=\"image\"; filename=\"{n}\"\r\n"
        f"Content-Type: application/octet-stream\r\n\r\n".encode() + data + b"\r\n"
        for n, data in (("cat.jpg", cat), ("astronaut.png", other))) \
        + f"--{boundary}--\r\n".encode()
    headers = {"Content-Type": f"multipart/form-data; boundary={boundary}"}
    status, _, reply = call(server, "POST",
                            "/v2/models/resnet18/versions/1/embed?normalize=true", body, headers)
    assert status == 200, reply[:300]
    got = json.loads(reply)
    want = server.stub.Embed(pb.EmbedRequest(model="resnet18", normalize=True, images=[
        pb.Image(encoded=cat), pb.Image(encoded=other)]))
    vectors = np.frombuffer(want.embeddings.data, "<f4").reshape(tuple(want.embeddings.shape))
    assert got["shape"] == [2, 512]
    assert np.array(got["embeddings"], np.float32).tobytes() == vectors.tobytes()
    status, _, reply = call(server, "POST", "/v2/models/resnet18/classify", body, headers)
    assert status == 200 and len(json.loads(reply)["results"]) == 2
    # the same embeddings as binary data after the JSON reply
    status, reply_headers, reply = call(
        server, "POST", "/v2/models/resnet18/embed?normalize=true&binary_data=true", body,
        headers)
    split = int(reply_headers["Inference-Header-Content-Length"])
    header = json.loads(reply[:split])
    assert status == 200 and header["shape"] == [2, 512] and "embeddings" not in header
    assert header["parameters"]["binary_data_size"] == len(reply) - split
    assert reply[split:] == vectors.astype("<f4").tobytes()


# --- what clients get wrong -------------------------------------------------------------------

def test_malformed_infer_requests_are_4xx_naming_the_field(server):
    path = "/v2/models/lenet5/infer"
    good = {"name": INPUT, "shape": [1, 1, 32, 32], "datatype": "FP32"}
    cases = [
        (b"{not json", "not JSON"),
        (json.dumps({"outputs": []}).encode(), "'inputs' is missing"),
        (json.dumps({"inputs": {"name": INPUT}}).encode(), "'inputs' must be an array"),
        (json.dumps({"inputs": [{**good, "shape": "1x32"}]}).encode(),
         "'shape' must be an array"),
        (json.dumps({"inputs": [{**good, "data": ["a"] * 1024}]}).encode(), "must be numbers"),
        (json.dumps({"inputs": [{**good, "data": [0.5] * 1000}]}).encode(),
         "holds 1000 values, but shape [1, 1, 32, 32] needs 1024"),
        (json.dumps({"inputs": [{**good, "data": [[0.5], [0.5, 0.5]]}]}).encode(),
         "unequal lengths"),
        (json.dumps({"inputs": [good]}).encode(), "'data' is missing"),
        (json.dumps({"inputs": [{**good, "datatype": 7, "data": []}]}).encode(),
         "'datatype' must be a string"),
        (b'{"inputs": [{"name": "\\ud800", "shape": [1], "datatype": "FP32", "data": [1]}]}',
         "unpaired surrogate"),
        (b'{"id": ' + b"9" * 5000 + b"}", "a number too long"),
        (b"[" * 5000 + b"]" * 5000, "nested too deeply"),
        (json.dumps({"inputs": [{**good, "data": [1e39] * 1024}]}).encode(), "finite"),
        (json.dumps({"inputs": [{**good, "data": [0.0] * 1024}],
                     "outputs": [{"name": LOGITS, "parameters": {"classification": 2**63}}]}
                    ).encode(), "parameters.classification"),
    ]
    for body, words in cases:
        status, message = error_of(call(server, "POST", path, body))
        assert status == 400 and words in message and "lenet5" in message, (body[:80], message)
    still_serving(server)


def test_binary_data_sizes_that_do_not_add_up_are_400(server):
    header = {"inputs": [{"name": INPUT, "shape": [1, 1, 32, 32], "datatype": "FP32",
                          "parameters": {"binary_data_size": 4096}}]}
    data = np.zeros(1024, "<f4").tobytes()
    body, headers = infer_body(header, data[:1000])  # truncated binary data
    status, message = error_of(call(server, "POST", "/v2/models/lenet5/infer", body, headers))
    assert status == 400 and "runs past the binary data" in message
    body, headers = infer_body(header, data + b"extra")
    status, message = error_of(call(server, "POST", "/v2/models/lenet5/infer", body, headers))
    assert status == 400 and "add up to 4096" in message
    body, _ = infer_body(header, data)
    status, message = error_of(call(server, "POST", "/v2/models/lenet5/infer", body,
                                    {"Inference-Header-Content-Length": str(len(body) + 10)}))
    assert status == 400 and "Inference-Header-Content-Length" in message
    body, headers = infer_body(header, data)
    assert call(server, "POST", "/v2/models/lenet5/infer", body, headers)[0] == 200


def test_unknown_models_routes_and_methods(server, cat):
    status, message = error_of(call(server, "POST", "/v2/models/nope/classify", cat))
    assert status == 404 and "nope" in message
    status, message = error_of(call(server, "GET", "/v2/models/resnet18/versions/9"))
    assert status == 404 and "version 9" in message
    status, message = error_of(call(server, "GET", "/v3/anything"))
    assert status == 404 and "docs/rest.md" in message
    status, headers, _ = call(server, "DELETE", "/v2/models/resnet18/infer")
    assert status == 405 and "POST" in headers["Allow"]
    status, message = error_of(call(server, "POST", "/v2/models/resnet18/classify", b"GIF89a.."))
    assert status == 400 and "not a JPEG, PNG or WebP" in message
    for top_k in ("-1", "%C2%B2", "9" * 5000):  # "²".isdigit() is true in Python
        status, message = error_of(call(server, "POST",
                                        f"/v2/models/resnet18/classify?top_k={top_k}", cat))
        assert status == 400 and "top_k" in message
    status, message = error_of(call(server, "POST", "/v2/models/lenet5/infer", b"{}",
                                    {"Inference-Header-Content-Length": "\u00b2"}))
    assert status == 400 and "Inference-Header-Content-Length" in message
    nested = (b"--b\r\nContent-Type: multipart/mixed; boundary=x\r\n\r\n--x--\r\n--b--\r\n")
    status, message = error_of(call(server, "POST", "/v2/models/resnet18/classify", nested,
                                    {"Content-Type": "multipart/form-data; boundary=b"}))
    assert status == 400 and "itself multipart" in message
    status, message = error_of(call(server, "POST", "/v2/repository/models/resnet18/unload"))
    assert status == 409 and "--model-control" in message  # the poll mode refuses it


def test_a_declared_70mb_body_is_refused_before_it_is_sent(server):
    head = (f"POST /v2/models/resnet18/infer HTTP/1.1\r\nHost: x\r\n"
            f"Content-Length: {70 * 1024 * 1024}\r\nExpect: 100-continue\r\n\r\n").encode()
    for expect in (True, False):
        with socket.create_connection(("127.0.0.1", server.http_port), timeout=30) as sock:
            sock.sendall(head if expect else head.replace(b"Expect: 100-continue\r\n", b""))
            sock.sendall(b"" if expect else b"{" * 65536)  # a little of the body, not 70 MB
            reply = b""
            while b"\r\n\r\n" not in reply or not reply.rstrip().endswith(b"}"):
                chunk = sock.recv(65536)
                if not chunk:
                    break
                reply += chunk
        assert reply.startswith(b"HTTP/1.1 413"), reply[:200]
        assert b"over the limit" in reply and b"--max-message-bytes" in reply
    still_serving(server)


def test_gzip_bombs_and_bad_encodings_are_refused_and_the_server_is_unharmed(server):
    bomb = gzip.compress(b"\0" * (80 * 1024 * 1024), 9)  # 80 MB in ~80 KB
    status, message = error_of(call(server, "POST", "/v2/models/lenet5/infer", bomb,
                                    {"Content-Encoding": "gzip"}))
    assert status == 413 and "decompresses to over the limit" in message
    status, message = error_of(call(server, "POST", "/v2/models/lenet5/infer", bomb[:5000],
                                    {"Content-Encoding": "gzip"}))
    assert status == 400 and "truncated" in message
    status, message = error_of(call(server, "POST", "/v2/models/lenet5/infer",
                                    gzip.compress(b"{}") + b"junk", {"Content-Encoding": "gzip"}))
    assert status == 400 and "after its compressed stream" in message
    status, message = error_of(call(server, "POST", "/v2/models/lenet5/infer", b"xx",
                                    {"Content-Encoding": "br"}))
    assert status == 415 and "gzip, deflate" in message
    zipped = zlib.compress(json.dumps({"inputs": [{"name": INPUT, "shape": [1, 1, 32, 32],
                                                   "datatype": "FP32",
                                                   "data": [0.0] * 1024}]}).encode())
    status, _, body = call(server, "POST", "/v2/models/lenet5/infer", zipped,
                           {"Content-Encoding": "deflate", "Accept-Encoding": "gzip"})
    assert status == 200
    still_serving(server)


def test_request_ids_deadlines_and_compressed_replies(server):
    x = np.zeros(1024, "<f4").tobytes()
    header = {"id": "mine", "inputs": [{"name": INPUT, "shape": [1, 1, 32, 32], "datatype": "FP32",
                                        "parameters": {"binary_data_size": len(x)}}]}
    body, headers = infer_body(header, x)
    status, reply_headers, reply = call(server, "POST", "/v2/models/lenet5/infer", body,
                                        {**headers, "Accept-Encoding": "gzip"})
    assert status == 200 and reply_headers["X-Request-ID"] == "mine"
    assert reply_headers.get("Content-Encoding") == "gzip"
    assert json.loads(gzip.decompress(reply))["id"] == "mine"
    # a deadline already past when the request reaches the batcher: its work is dropped
    status, message = error_of(call(server, "POST", "/v2/models/lenet5/infer", body,
                                    {**headers, "X-Timeout-Ms": "0.001"}))
    assert status == 504 and "deadline" in message.lower()
    header["parameters"] = {"timeout": 1}  # Triton's own: microseconds
    body, headers = infer_body(header, x)
    assert error_of(call(server, "POST", "/v2/models/lenet5/infer", body, headers))[0] == 504
    status, message = error_of(call(server, "POST", "/v2/models/lenet5/infer", body,
                                    {**headers, "X-Timeout-Ms": "soon"}))
    assert status == 400 and "X-Timeout-Ms" in message


def test_the_token_guards_http_as_it_guards_grpc_and_probes_stay_open(exported_repo, tmp_path,
                                                                      cat):
    from conftest import make_repo

    srv = start_server(make_repo(exported_repo, tmp_path / "repo", ("resnet18",)),
                       tmp_path / "server.log", env={"VISIONSERVE_AUTH_TOKEN": "s3cret"})
    try:
        assert call(srv, "GET", "/v2/health/ready")[0] == 200
        status, headers, body = call(srv, "POST", "/v2/models/resnet18/classify", cat)
        assert status == 401 and headers["WWW-Authenticate"] == "Bearer"
        assert "bearer token" in json.loads(body)["error"]
        assert call(srv, "POST", "/v2/models/resnet18/classify", cat,
                    {"Authorization": "Bearer wrong"})[0] == 401
        assert call(srv, "POST", "/v2/models/resnet18/classify", cat,
                    {"Authorization": "Bearer s3cret"})[0] == 200
        assert srv.metric("visionserve_requests_refused_total", method="http.Classify",
                          reason="unauthenticated") == 2
        # no "100 Continue" for a client without the token: it is refused before its upload
        with socket.create_connection(("127.0.0.1", srv.http_port), timeout=30) as sock:
            sock.sendall(b"POST /v2/models/resnet18/classify HTTP/1.1\r\nHost: x\r\n"
                         b"Content-Length: 5000000\r\nExpect: 100-continue\r\n\r\n")
            assert sock.recv(65536).startswith(b"HTTP/1.1 401")
    finally:
        srv.stop()


def test_no_http_serves_grpc_only(exported_repo, tmp_path):
    from conftest import make_repo

    srv = start_server(make_repo(exported_repo, tmp_path / "repo", ("lenet5",)),
                       tmp_path / "server.log", "--no-http")
    try:
        assert srv.http_port == 0
        assert "HTTP (KServe v2 REST) listening" not in srv.log()
    finally:
        srv.stop()


def test_readiness_stays_200_while_a_new_version_loads_and_swaps_in(exported_repo, tmp_path):
    from conftest import make_repo, publish

    repo = make_repo(exported_repo, tmp_path / "repo", ("lenet5",))
    srv = start_server(repo, tmp_path / "server.log", "--model-control", "poll",
                       "--poll-interval-s", "0.3")
    try:
        publish(repo / "lenet5", 2, repo / "lenet5" / "1")
        answers = []

        def version_2_served() -> bool:
            answers.append(call(srv, "GET", "/v2/health/ready")[0])
            status, _, body = call(srv, "GET", "/v2/models/lenet5")
            return status == 200 and "2" in json.loads(body)["versions"]

        from conftest import eventually

        eventually(version_2_served, "version 2 to be served", interval=0.02)
        assert set(answers) == {200}, answers
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


def test_oversized_headers_are_refused_and_the_server_serves_on(server):
    status, _, _ = call(server, "GET", "/v2/health/ready", headers={"X-Big": "a" * 9000})
    assert status in (400, 431)
    still_serving(server)


def test_readiness_is_503_while_models_load_then_200(exported_repo, tmp_path):
    import re
    import shutil
    import subprocess
    import sys

    from conftest import ROOT, eventually, make_repo

    repo = make_repo(exported_repo, tmp_path / "repo", ("resnet18",))
    for i in range(4):  # several models: loading (and their golden checks) takes a while
        shutil.copytree(repo / "resnet18", repo / f"resnet18_{i}", symlinks=True)
    log_path = tmp_path / "server.log"
    with open(log_path, "wb") as log:
        process = subprocess.Popen(
            [sys.executable, "-m", "visionserve.service.cli", "serve", "--repo", str(repo),
             "--host", "127.0.0.1", "--grpc-port", "0", "--metrics-port", "0", "--http-port",
             "0"], stdout=log, stderr=subprocess.STDOUT, cwd=ROOT)
    answers: list[tuple[int, bytes]] = []

    def listening() -> re.Match | None:
        assert process.poll() is None, log_path.read_text(errors="replace")[-3000:]
        return re.search(r"HTTP \(KServe v2 REST\) listening on 127\.0\.0\.1:(\d+)",
                         log_path.read_text())

    def ready(port: int) -> bool:
        assert process.poll() is None
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
        conn.request("GET", "/v2/health/ready")
        reply = conn.getresponse()
        answers.append((reply.status, reply.read()))
        conn.close()
        return answers[-1][0] == 200

    try:
        # the port it bound (0: any free one) is logged once it listens, before the models
        # load (the ready file comes only once they have): the first probe follows that event
        port = int(eventually(listening, "the HTTP port to open", timeout=120)[1])
        loading = "serving gRPC on" not in log_path.read_text()
        eventually(lambda: ready(port), "the server to be ready", timeout=120, interval=0.02)
        # listening while it loads, saying so: 503 until every model is loaded, then 200
        assert loading and answers[0] == (503, b'{"ready":false}'), (loading, answers[:3])
        assert all(status == 503 for status, _ in answers[:-1]), answers
    finally:
        process.terminate()
        assert process.wait(timeout=60) == 0
