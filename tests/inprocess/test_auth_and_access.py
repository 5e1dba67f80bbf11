"""Security of the ports, on the in-process server (docs/security.md): TLS and mutual TLS, bearer
tokens and the classes left open, the metrics address, the access and audit logs, refusals
before any handler, and what reaches the image parsers. Certificates are generated at run time.

Moved here from tests/test_security.py, whose subprocess tests keep what only a process shows:
flags refused at start (exit code 2), a port in use, the token from the environment, SIGHUP
reloading the token file, thread counts under held connections, the HTTP/2 transport limits,
and ONNX Runtime refusing external data outside a model's folder.
"""

from __future__ import annotations

import http.client
import ssl
import struct
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from conftest import key_and_cert, run_cli, tensor_image
from visionserve.inference import grpc_service_pb2 as kpb
from visionserve.inference import grpc_service_pb2_grpc as kpb_grpc
from visionserve.service.cli.client import open_channel
from visionserve.v1 import visionserve_pb2 as pb
from visionserve.v1 import visionserve_pb2_grpc as pb_grpc

x509 = pytest.importorskip("cryptography.x509")

TOKEN = "s3cret-token-for-tests"
AUTH = (("authorization", f"Bearer {TOKEN}"),)
DIGIT = np.zeros((32, 32, 1), np.uint8)


@dataclass
class Pki:
    ca: Path
    server_cert: Path
    server_key: Path
    client_cert: Path
    client_key: Path
    rogue_cert: Path  # a client certificate signed by another CA
    rogue_key: Path


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    d = tmp_path_factory.mktemp("pki")
    ca = key_and_cert(d, "ca", None, ca=True)
    rogue_ca = key_and_cert(d, "rogue-ca", None, ca=True)
    key_and_cert(d, "server", ca, server=True)
    key_and_cert(d, "client", ca)
    key_and_cert(d, "rogue", rogue_ca)
    return Pki(d / "ca.crt", d / "server.crt", d / "server.key", d / "client.crt",
               d / "client.key", d / "rogue.crt", d / "rogue.key")


@pytest.fixture
def token_file(tmp_path: Path) -> Path:
    """The bearer token in a file (--auth-token-file): the server under test reads no
    environment of this process."""
    path = tmp_path / "token"
    path.write_text(TOKEN + "\n")
    return path


def classify(channel: grpc.Channel, **kwargs: object) -> pb.ClassifyResponse:
    return pb_grpc.VisionServiceStub(channel).Classify(
        pb.ClassifyRequest(model="lenet5", images=[tensor_image(DIGIT)]), timeout=30, **kwargs)


def status_of(call, *args: object, **kwargs: object) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as info:
        call(*args, **kwargs)
    return info.value


def https_ready(port: int, context: ssl.SSLContext) -> int:
    conn = http.client.HTTPSConnection("localhost", port, context=context, timeout=10)
    try:
        conn.request("GET", "/v2/health/ready")
        return conn.getresponse().status
    finally:
        conn.close()


def test_tls_serves_tls_clients_and_refuses_plaintext(server_factory, pki):
    srv = server_factory(("lenet5",), None, "--tls-cert", str(pki.server_cert),
                         "--tls-key", str(pki.server_key))
    target = f"localhost:{srv.grpc_port}"
    with open_channel(target, tls_ca=pki.ca) as channel:
        assert classify(channel).version == 1
    with grpc.insecure_channel(target) as plaintext:
        assert status_of(classify, plaintext).code() == grpc.StatusCode.UNAVAILABLE
    probe = run_cli("health", "--server", target, "--tls-ca", str(pki.ca))
    assert probe.returncode == 0, probe.stderr
    assert "(TLS; no auth;" in srv.log()
    # the HTTP port: the same certificate; plaintext HTTP gets no answer
    assert https_ready(srv.http_port, ssl.create_default_context(cafile=pki.ca)) == 200
    with pytest.raises((http.client.HTTPException, OSError)):
        plain = http.client.HTTPConnection("localhost", srv.http_port, timeout=10)
        plain.request("GET", "/v2/health/ready")
        plain.getresponse()


def test_mutual_tls_needs_a_client_certificate_from_the_configured_ca(server_factory, pki):
    srv = server_factory(("lenet5",), None, "--tls-cert", str(pki.server_cert),
                         "--tls-key", str(pki.server_key), "--tls-client-ca", str(pki.ca))
    target = f"localhost:{srv.grpc_port}"
    with open_channel(target, pki.ca, pki.client_cert, pki.client_key) as channel:
        assert classify(channel).version == 1
    with open_channel(target, tls_ca=pki.ca) as anonymous:
        assert status_of(classify, anonymous).code() == grpc.StatusCode.UNAVAILABLE
    with open_channel(target, pki.ca, pki.rogue_cert, pki.rogue_key) as rogue:
        assert status_of(classify, rogue).code() == grpc.StatusCode.UNAVAILABLE
    models = run_cli("models", "--server", target, "--tls-ca", str(pki.ca),
                     "--tls-client-cert", str(pki.client_cert),
                     "--tls-client-key", str(pki.client_key))
    assert models.returncode == 0 and "lenet5" in models.stdout, models.stderr
    # HTTPS too needs a client certificate from the CA
    mutual = ssl.create_default_context(cafile=pki.ca)
    mutual.load_cert_chain(pki.client_cert, pki.client_key)
    assert https_ready(srv.http_port, mutual) == 200
    with pytest.raises((ssl.SSLError, OSError, http.client.HTTPException)):
        https_ready(srv.http_port, ssl.create_default_context(cafile=pki.ca))


def test_bearer_token_protects_everything_but_health(server_factory, token_file):
    srv = server_factory(("lenet5",), None, "--model-control", "explicit",
                         "--load-model", "lenet5", "--auth-token-file", str(token_file))
    with grpc.insecure_channel(srv.address) as channel:
        err = status_of(classify, channel)
        assert err.code() == grpc.StatusCode.UNAUTHENTICATED
        assert "Classify needs a bearer token" in err.details()
        assert "authorization: Bearer <token>" in err.details()
        err = status_of(classify, channel, metadata=(("authorization", "Bearer nope"),))
        assert err.code() == grpc.StatusCode.UNAUTHENTICATED
        assert "the token is not valid" in err.details()
        assert classify(channel, metadata=(("authorization", f"Bearer {TOKEN}"),)).version == 1
        assert classify(channel, metadata=(("authorization", f"bearer {TOKEN}"),)).version == 1
        stream = pb_grpc.VisionServiceStub(channel).ClassifyStream(iter([pb.ClassifyRequest(
            model="lenet5", images=[tensor_image(DIGIT)])]), timeout=30)
        assert status_of(list, stream).code() == grpc.StatusCode.UNAUTHENTICATED

        health = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest())
        assert health.status == health_pb2.HealthCheckResponse.SERVING
        kserve = kpb_grpc.GRPCInferenceServiceStub(channel)
        assert kserve.ServerReady(kpb.ServerReadyRequest()).ready
        err = status_of(kserve.RepositoryModelUnload,
                        kpb.RepositoryModelUnloadRequest(model_name="lenet5"))
        assert err.code() == grpc.StatusCode.UNAUTHENTICATED
        err = status_of(kserve.ModelMetadata, kpb.ModelMetadataRequest(name="lenet5"))
        assert err.code() == grpc.StatusCode.UNAUTHENTICATED
        err = status_of(kserve.ModelStatistics, kpb.ModelStatisticsRequest(name="lenet5"))
        assert err.code() == grpc.StatusCode.UNAUTHENTICATED
        # a model name is a folder of the repository, never a path out of it
        err = status_of(kserve.RepositoryModelLoad, kpb.RepositoryModelLoadRequest(
            model_name="../repo/lenet5"), metadata=(("authorization", f"Bearer {TOKEN}"),))
        assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "no path separators" in err.details()
    assert "bearer token required except for health" in srv.log()


def test_opened_classes_need_no_token_but_repository_calls_always_do(server_factory, tmp_path):
    token_file = tmp_path / "token"
    token_file.write_text(TOKEN + "\n# rotated 2026-11-24: only the first line is the token\n")
    srv = server_factory(("lenet5",), None, "--model-control", "explicit",
                         "--load-model", "lenet5", "--auth-token-file", str(token_file),
                         "--auth-open", "inference,metadata,statistics")
    with grpc.insecure_channel(srv.address) as channel:
        assert classify(channel).version == 1
        kserve = kpb_grpc.GRPCInferenceServiceStub(channel)
        assert kserve.ModelMetadata(kpb.ModelMetadataRequest(name="lenet5")).name
        unload = kpb.RepositoryModelUnloadRequest(model_name="lenet5")
        assert status_of(kserve.RepositoryModelUnload, unload).code() == \
            grpc.StatusCode.UNAUTHENTICATED
        kserve.RepositoryModelUnload(unload, metadata=AUTH)
    cli = run_cli("models", "--server", srv.address, "--auth-token-file", str(token_file))
    assert cli.returncode == 0, cli.stderr
    refused = run_cli("serve", "--repo", str(srv.repo), "--auth-token-file",
                      str(token_file), "--auth-open", "repository")
    assert refused.returncode == 2
    assert "--auth-open 'repository' is not allowed" in refused.stderr


def test_metrics_can_bind_to_another_address(server_factory):
    srv = server_factory(("lenet5",), None, "--host", "127.0.0.1", "--metrics-host",
                         "127.0.0.2")
    url = f"http://{{}}:{srv.metrics_port}/metrics"
    with urllib.request.urlopen(url.format("127.0.0.2"), timeout=10) as reply:
        assert b"visionserve_inflight_requests" in reply.read()
    with pytest.raises(urllib.error.URLError):
        urllib.request.urlopen(url.format("127.0.0.1"), timeout=10)
    assert f"metrics on http://127.0.0.2:{srv.metrics_port}/metrics" in srv.log()


def test_access_log_carries_the_request_id_and_never_payload_bytes(server_factory):
    srv = server_factory(("lenet5",), None, "--access-log", "all")
    marker = b"PAYLOAD-MARKER-7f3a"
    stub = srv.stub
    stub.Classify(pb.ClassifyRequest(model="lenet5", request_id="req-ok-1",
                                     images=[tensor_image(DIGIT)]), timeout=30)
    err = status_of(stub.Classify, pb.ClassifyRequest(
        model="lenet5", request_id="req-bad-2\nFORGED LINE",
        images=[pb.Image(encoded=marker * 100)]), timeout=30)
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "Traceback" not in err.details() and ".py" not in err.details()
    stub.Classify(pb.ClassifyRequest(model="lenet5", images=[tensor_image(DIGIT)]),
                  timeout=30, metadata=(("x-request-id", "mesh-id-3"),))
    err = status_of(stub.Classify, pb.ClassifyRequest(model="x code=OK", images=[
        tensor_image(DIGIT)]), timeout=30)
    assert err.code() == grpc.StatusCode.NOT_FOUND
    log = srv.log()
    assert "[req req-ok-1] Classify model=lenet5 version=1 code=OK duration_ms=" in log
    assert '[req "req-bad-2\\nFORGED LINE"] Classify model=lenet5 version=- ' \
           "code=INVALID_ARGUMENT" in log
    assert "\nFORGED LINE" not in log
    assert "[req mesh-id-3] Classify model=lenet5 version=1 code=OK" in log
    assert 'Classify model="x code=OK" version=- code=NOT_FOUND' in log  # quoted: no field
    assert marker.decode() not in log


def test_only_the_accepted_formats_parsers_read_client_bytes(server_factory):
    """A PSD header declaring 30000 x 30000 pixels: Pillow's PSD parser would read it and refuse
    it as a decompression bomb; it never runs, the file is refused as what it is."""
    psd = b"8BPS" + struct.pack(">H6xHIIHH", 1, 3, 30000, 30000, 8, 3) + bytes(64)
    srv = server_factory(("lenet5",))
    err = status_of(srv.stub.Classify, pb.ClassifyRequest(
        model="lenet5", images=[pb.Image(encoded=psd)]), timeout=30)
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "images[0] is a PSD image; send JPEG, PNG or WebP" in err.details()
    assert "pixels" not in err.details()


def test_request_metadata_over_its_limit_is_refused_and_the_server_serves_on(server_factory):
    srv = server_factory(("lenet5",))
    with grpc.insecure_channel(srv.address) as channel:
        err = status_of(classify, channel, metadata=(("x-padding", "x" * 32 * 1024),))
        assert err.code() != grpc.StatusCode.OK
        assert classify(channel).version == 1


def test_every_load_and_unload_is_audited_and_rate_limited_per_model(server_factory,
                                                                     token_file):
    srv = server_factory(("lenet5", "resnet18"), None, "--model-control", "explicit",
                         "--load-model", "lenet5", "--load-interval-s", "60",
                         "--auth-token-file", str(token_file))
    kserve = kpb_grpc.GRPCInferenceServiceStub(srv.channel)
    load = kpb.RepositoryModelLoadRequest(model_name="lenet5")
    for _ in range(4):  # the burst
        kserve.RepositoryModelLoad(load, metadata=AUTH, timeout=60)
    err = status_of(kserve.RepositoryModelLoad, load, metadata=AUTH, timeout=60)
    assert err.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "model lenet5: RepositoryModelLoad refused: at most 4 loads or unloads" in \
        err.details() and "--load-interval-s" in err.details()
    # per model: another one is not held back, and lenet5 still serves
    kserve.RepositoryModelLoad(kpb.RepositoryModelLoadRequest(model_name="resnet18"),
                               metadata=AUTH, timeout=60)
    assert classify(srv.channel, metadata=AUTH).version == 1
    audit = [line for line in srv.log().splitlines() if "visionserve.audit" in line]
    assert len(audit) == 6, audit
    assert "RepositoryModelLoad model=lenet5 peer=ipv4:127.0.0.1:" in audit[0]
    assert "identity=bearer token" in audit[0]
    assert audit[4].endswith("refused=rate-limited")


def test_calls_refused_before_any_handler_are_counted_and_logged(server_factory, token_file):
    """Refused by the token check, by strict decoding, by a wire limit: no handler runs, but
    each is counted by reason and has its access-log line."""
    srv = server_factory(("lenet5",), None, "--auth-token-file", str(token_file))
    assert status_of(classify, srv.channel).code() == grpc.StatusCode.UNAUTHENTICATED
    raw = srv.channel.unary_unary("/visionserve.v1.VisionService/Classify",
                                  request_serializer=None, response_deserializer=None)
    assert status_of(raw, b"\xff\xff\xff", metadata=AUTH, timeout=30).code() == \
        grpc.StatusCode.INVALID_ARGUMENT
    assert status_of(raw, b"\x1a\x00" * 300, metadata=AUTH, timeout=30).code() == \
        grpc.StatusCode.RESOURCE_EXHAUSTED  # 300 images: over 256
    scrape = srv.metrics_text()
    for reason in ("unauthenticated", "undecodable", "wire_limit"):
        assert f'visionserve_requests_refused_total{{method="Classify",reason="{reason}"}} ' \
               "1.0" in scrape, reason
    log = srv.log()
    assert "Classify model= version=- code=UNAUTHENTICATED (unauthenticated)" in log
    assert "code=INVALID_ARGUMENT (undecodable)" in log
    assert "code=RESOURCE_EXHAUSTED (wire_limit)" in log
