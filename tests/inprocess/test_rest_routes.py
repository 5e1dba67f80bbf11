"""The HTTP/REST API's routes and statuses, the whole server in this process on the fake engine:
the image endpoints over plain HTTP (their replies equal the same server's gRPC replies), what
clients get wrong (malformed bodies, binary data sizes, unknown routes and methods, declared
and compressed body limits, oversized headers, deadlines and request ids), the bearer token on
HTTP, and readiness while a new version loads and swaps in (the load held open by the test).

Moved from tests/test_rest.py, which keeps what Triton's tritonclient.http drives (and REST
compared with gRPC through tritonclient) and what only a process shows (its RSS under an
undeclared 70 MB body, the ports of ``--no-http``). Raw HTTP only: this tier never imports
tritonclient.
"""

from __future__ import annotations

import gzip
import http.client
import json
import socket
import zlib

import numpy as np
import pytest

from conftest import encode, eventually, photo
from inprocess.harness import publish_fake
from visionserve.service.format.model_format import INPUT, LOGITS
from visionserve.v1 import visionserve_pb2 as pb


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
        # a JSON body (no binary data): the JSON limit, and the way round it
        assert b"over the JSON limit" in reply and b"--max-json-bytes" in reply
        assert b"binary data" in reply
    still_serving(server)


def test_gzip_bombs_and_bad_encodings_are_refused_and_the_server_is_unharmed(server):
    bomb = gzip.compress(b"\0" * (80 * 1024 * 1024), 9)  # 80 MB in ~80 KB
    status, message = error_of(call(server, "POST", "/v2/models/lenet5/infer", bomb,
                                    {"Content-Encoding": "gzip"}))
    assert status == 413 and "decompresses to over the JSON limit" in message
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
    # not zeros: the fake engine answers zeros with all-zero outputs, a reply under the 1 KiB
    # from which replies are compressed
    x = np.full(1024, 0.5, "<f4").tobytes()
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


def test_the_token_guards_http_as_it_guards_grpc_and_probes_stay_open(server_factory,
                                                                      tmp_path, cat):
    token = tmp_path / "token"
    token.write_text("s3cret\n")
    srv = server_factory(("resnet18",), None, "--auth-token-file", str(token))
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


def test_readiness_stays_200_while_a_new_version_loads_and_swaps_in(server_factory):
    """Version 2's load is held open by the test: readiness is asked while it is loading (a
    state the test waits for, not a window it hopes to hit), and until it is served."""
    srv = server_factory(("lenet5",), None, "--model-control", "poll",
                         "--poll-interval-s", "0.3")
    answers = []

    def ready() -> int:
        answers.append(call(srv, "GET", "/v2/health/ready")[0])
        return answers[-1]

    srv.engines.hold_loads()
    publish_fake(srv.repo / "lenet5", 2)
    eventually(lambda: srv.metric("visionserve_model_state", model="lenet5", version="2",
                                  state="loading") == 1, "version 2 to be loading")
    ready()  # while version 2 is loading
    srv.engines.release_loads()

    def version_2_served() -> bool:
        ready()
        status, _, body = call(srv, "GET", "/v2/models/lenet5")
        return status == 200 and "2" in json.loads(body)["versions"]

    eventually(version_2_served, "version 2 to be served", interval=0.02)
    assert set(answers) == {200}, answers


def test_oversized_headers_are_refused_and_the_server_serves_on(server):
    status, _, _ = call(server, "GET", "/v2/health/ready", headers={"X-Big": "a" * 9000})
    assert status in (400, 431)
    still_serving(server)
