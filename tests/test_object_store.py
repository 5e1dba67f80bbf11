"""A model repository in object storage: export publishes into a bucket, servers serve from it.

The store is real: moto's S3 server (``moto_server``) on a loopback port, spoken to over HTTP by
the server, the export stage and these tests (obstore, the library the server uses, stands in
for `aws s3 cp` where a test plays an operator or an attacker). The tests run in file order
and share one bucket: the first exports into it, the next publish more versions beside it.
"""

from __future__ import annotations

import http.server
import json
import threading
from collections.abc import Iterator
from pathlib import Path

import obstore
import pytest
from obstore.store import from_url

from conftest import (
    ROOT,
    Load,
    Server,
    encode,
    eventually,
    key_and_cert,
    photo,
    run_cli,
    start_server,
)
from visionserve.bench.launch import free_port
from visionserve.bench.store import moto_s3
from visionserve.v1 import visionserve_pb2 as pb

SECRET = "test-secret-key-never-shown"
BUCKET = "models"
URI = f"s3://{BUCKET}/prod"


@pytest.fixture(scope="module")
def s3(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, str]]:
    """moto's S3 server on loopback with one bucket; yields the environment that points the
    server and the export stage at it (credentials by environment, never by flag)."""
    with moto_s3(tmp_path_factory.mktemp("moto"), BUCKET) as env:
        yield {**env, "AWS_ACCESS_KEY_ID": "test-key", "AWS_SECRET_ACCESS_KEY": SECRET}


@pytest.fixture(scope="module")
def bucket(s3: dict[str, str]):
    """The bucket's prefix as an obstore store (what an operator's tools would do)."""
    return from_url(URI, client_options={"allow_http": True},
                    config={"endpoint": s3["AWS_ENDPOINT_URL"], "access_key_id": "test-key",
                            "secret_access_key": SECRET, "region": "us-east-1"})


@pytest.fixture(scope="module")
def served(s3: dict[str, str], tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    """Version 1 exported into the bucket, then a server of the bucket (polling every 0.5 s)."""
    result = run_cli("export", "lenet5", "--repo", URI, "--random-weights", env=s3, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"published lenet5 version 1 into {URI}" in result.stderr
    cache = tmp_path_factory.mktemp("cache")
    server = start_server(Path(URI), cache / "server.log", "--cache-dir", str(cache),
                          "--poll-interval-s", "0.5", env=s3)
    server.cache = cache  # type: ignore[attr-defined]
    yield server
    server.stop()


def keys(bucket, prefix: str) -> dict[str, int]:
    return {o["path"]: o["size"] for batch in obstore.list(bucket, prefix) for o in batch}


def copy_version(bucket, source: int, target: int, change=None) -> None:
    """Publish version ``target`` by copying ``source``'s objects, manifest last; ``change``
    (path → bytes, or None to leave a file out) alters files after the manifest was made."""
    objects = keys(bucket, f"lenet5/{source}/")
    manifest = f"lenet5/{source}/manifest.json"
    for key in sorted(objects.keys() - {manifest}):
        rel = key.split("/", 2)[2]
        data = bytes(obstore.get(bucket, key).bytes())
        if change and rel in change:
            data = change[rel](data)
            if data is None:
                continue
        obstore.put(bucket, f"lenet5/{target}/{rel}", data)
    for rel, data in (change or {}).get("extra", {}).items():
        obstore.put(bucket, f"lenet5/{target}/{rel}", data)
    obstore.put(bucket, f"lenet5/{target}/manifest.json",
                bytes(obstore.get(bucket, manifest).bytes()))


def version_state(server: Server, number: int) -> tuple[str, str]:
    """The version's state as GetModel shows it ("" when the server does not list it)."""
    reply = server.stub.GetModel(pb.GetModelRequest(model="lenet5"), timeout=10)
    for v in reply.versions:
        if v.version == number:
            return pb.ModelState.Name(v.state).removeprefix("MODEL_STATE_"), v.reason
    return "", ""


REQUEST = pb.ClassifyRequest(model="lenet5", images=[pb.Image(encoded=encode(photo("chelsea")))])


def classify(server: Server) -> pb.ClassifyResponse:
    return server.stub.Classify(REQUEST, timeout=30)


def test_export_publishes_into_the_bucket_with_a_manifest_and_the_server_serves_it(
        served: Server, bucket) -> None:
    objects = keys(bucket, "lenet5/")
    assert {"lenet5/config.toml", "lenet5/labels.txt", "lenet5/1/model.onnx",
            "lenet5/1/manifest.json"} <= objects.keys()
    listed = json.loads(bytes(obstore.get(bucket, "lenet5/1/manifest.json").bytes()))
    assert {f["path"] for f in listed["files"]} == \
        {k.split("/", 2)[2] for k in objects if k.startswith("lenet5/1/")
         and not k.rsplit("/", 1)[1].startswith(".")} - {"manifest.json"}
    assert classify(served).version == 1
    assert not list(ROOT.glob("s3:*")), "a URI became a local folder"


def test_a_version_published_under_load_serves_with_no_failed_request_and_an_unfinished_upload_is_not_a_version(  # noqa: E501
        served: Server, bucket) -> None:
    obstore.put(bucket, "lenet5/9/model.onnx", b"half an upload, no manifest yet")
    load = Load(served, REQUEST, clients=4)
    try:
        copy_version(bucket, 1, 2)
        # the scan that found version 2 listed version 9's files too
        eventually(lambda: 2 in load.versions_seen(), "version 2 to answer", timeout=120)
    finally:
        load.stop()
    assert load.errors() == []
    assert load.monotonic_per_client()
    assert version_state(served, 9) == ("", "")
    assert classify(served).version == 2
    obstore.delete(bucket, ["lenet5/9/model.onnx"])


@pytest.mark.parametrize(("number", "change", "says"), [
    (3, {"model.onnx": lambda b: b[:100] + bytes([b[100] ^ 1]) + b[101:]},
     "model.onnx does not match its sha256 in manifest.json (altered or corrupted in the "
     "store); refused"),
    (4, {"labels.txt": lambda b: None}, "labels.txt is listed in manifest.json but missing"),
    (5, {"extra": {"payload.so": b"\x7fELF"}}, "payload.so is not listed in manifest.json"),
    (6, {"export.json": lambda b: b + b" "}, "export.json is"),
], ids=["flipped-byte", "missing-file", "extra-file", "size-off"])
def test_a_version_that_does_not_match_its_manifest_is_refused_and_the_last_good_one_serves(
        served: Server, bucket, number: int, change, says: str) -> None:
    copy_version(bucket, 2, number, change)
    state, reason = eventually(lambda: (s := version_state(served, number))[0] == "FAILED"
                               and s, f"version {number} to be refused", timeout=60)
    assert f"model lenet5 version {number}: " in reason and says in reason, reason
    assert "/tmp" not in reason and "127.0.0.1" not in reason and SECRET not in reason
    assert classify(served).version == 2
    assert not (served.cache / "s3" / BUCKET / "prod" / "lenet5" / str(number)).exists()
    obstore.delete(bucket, [k for k in keys(bucket, f"lenet5/{number}/")])


def test_a_restart_fetches_only_what_changed_and_serves_the_cache_when_the_store_is_down(
        served: Server, s3: dict[str, str], tmp_path: Path) -> None:
    cache = served.cache  # type: ignore[attr-defined]
    served.stop()
    again = start_server(Path(URI), tmp_path / "again.log", "--cache-dir", str(cache), env=s3)
    try:
        assert classify(again).version == 2
        assert "copied into the cache" not in again.log()  # the ETags did not change
    finally:
        again.stop()
    closed = {**s3, "AWS_ENDPOINT_URL": f"http://127.0.0.1:{free_port()}"}
    offline = start_server(Path(URI), tmp_path / "offline.log", "--cache-dir", str(cache),
                           env=closed)
    try:
        assert classify(offline).version == 2
        assert "serving the cached copy" in offline.log()
        assert SECRET not in offline.log()
    finally:
        offline.stop()


class _Failing(http.server.BaseHTTPRequestHandler):
    """A store endpoint that refuses every request with ``answer`` (status, body)."""

    answer: tuple[int, bytes] = (500, b"")

    def do_GET(self) -> None:
        status, body = self.answer
        self.send_response(status)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: object) -> None:
        pass


@pytest.mark.parametrize(("answer", "says"), [
    ((500, b""), "the store answered HTTP 500 Internal Server Error"),
    ((403, b"<Error><Code>ExpiredToken</Code><Message>The provided token has expired."
           b"</Message></Error>"), "the credentials were refused (expired or wrong?)"),
], ids=["500", "expired-credentials"])
def test_a_store_that_fails_with_an_empty_cache_is_a_clear_start_up_error(
        s3: dict[str, str], tmp_path: Path, answer: tuple[int, bytes], says: str) -> None:
    handler = type("Answer", (_Failing,), {"answer": answer})
    failing = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=failing.serve_forever, daemon=True).start()
    try:
        env = {**s3, "AWS_ENDPOINT_URL": f"http://127.0.0.1:{failing.server_address[1]}"}
        result = run_cli("serve", "--repo", URI, "--cache-dir", str(tmp_path / "empty"),
                         "--grpc-port", "0", "--http-port", "0", "--metrics-port", "0",
                         env=env, timeout=180)
    finally:
        failing.shutdown()
    assert result.returncode != 0
    assert f"{URI}: the store cannot be listed ({says})" in result.stderr, result.stderr[-2000:]
    assert "and the cache holds no version to serve meanwhile; check the store's endpoint and " \
        "credentials (AWS_* environment variables: docs/deploy.md)" in result.stderr
    assert SECRET not in result.stderr and "Traceback" not in result.stderr
    assert "127.0.0.1" not in result.stderr.split("the store cannot be listed")[1][:200]


def test_export_never_reuses_a_number_claimed_in_the_store(s3: dict[str, str], bucket) -> None:
    obstore.put(bucket, "lenet5/8/.claim", b"")  # an export that died after claiming 8
    result = run_cli("export", "lenet5", "--repo", URI, "--random-weights", "--version", "8",
                     env=s3, timeout=600)
    assert result.returncode != 0
    assert f"{URI}/lenet5/8 exists already; versions are immutable" in result.stderr


def test_export_if_missing_skips_a_model_the_bucket_holds(served: Server,
                                                         s3: dict[str, str]) -> None:
    result = run_cli("export", "lenet5", "--repo", URI, "--if-missing", env=s3, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"lenet5: already in {URI}, skipped (--if-missing)" in result.stderr


def test_an_https_endpoint_is_trusted_through_aws_ca_bundle_and_refused_without_it(
        exported_repo: Path, tmp_path: Path) -> None:
    ca = key_and_cert(tmp_path, "ca", None, ca=True)
    key_and_cert(tmp_path, "store", ca, server=True)
    tls = (tmp_path / "store.crt", tmp_path / "store.key", tmp_path / "ca.crt")
    with moto_s3(tmp_path, BUCKET, tls=tls) as env:
        store = from_url(URI, client_options={"root_certificate": tls[2].read_bytes()},
                         config={"endpoint": env["AWS_ENDPOINT_URL"], "access_key_id": "k",
                                 "secret_access_key": "s", "region": "us-east-1"})
        source = exported_repo / "lenet5"
        for path in sorted(p for p in source.rglob("*") if p.is_file()):
            if path.name != "manifest.json":
                obstore.put(store, f"lenet5/{path.relative_to(source).as_posix()}", path)
        obstore.put(store, "lenet5/1/manifest.json", source / "1" / "manifest.json")
        server = start_server(Path(URI), tmp_path / "tls.log", "--cache-dir",
                              str(tmp_path / "cache"), env=env)
        try:
            assert classify(server).version == 1
        finally:
            server.stop()
        untrusted = {k: v for k, v in env.items() if k != "AWS_CA_BUNDLE"}
        result = run_cli("serve", "--repo", URI, "--cache-dir", str(tmp_path / "other"),
                         "--grpc-port", "0", "--http-port", "0", "--metrics-port", "0",
                         env=untrusted, timeout=180)
    assert result.returncode != 0
    assert (f"{URI}: the store cannot be listed (the store's TLS certificate is not trusted"
            in result.stderr), result.stderr[-2000:]
