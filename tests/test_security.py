"""Security of the server as a process (docs/security.md): TLS and token flags refused at
start (exit code 2), a port in use, the token from the environment and its reload on SIGHUP,
thread counts under held connections, the HTTP/2 transport limits, and ONNX Runtime refusing
external data outside a model's folder. Certificates are generated at run time.

TLS and mutual TLS, bearer tokens and open classes, the metrics address, the access and audit
logs, refusals before any handler, the image parsers and the metadata limit run on the
in-process server: tests/inprocess/test_auth_and_access.py."""

from __future__ import annotations

import urllib.request
from dataclasses import dataclass
from pathlib import Path

import grpc
import numpy as np
import pytest

from conftest import ROOT, eventually, key_and_cert, make_repo, run_cli, tensor_image
from visionserve.bench.launch import start_visionserve
from visionserve.service.format.model_format import INPUT, LOGITS
from visionserve.v1 import visionserve_pb2 as pb
from visionserve.v1 import visionserve_pb2_grpc as pb_grpc

x509 = pytest.importorskip("cryptography.x509")

TOKEN = "s3cret-token-for-tests"
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


def serve(repo: Path, log: Path, *args: str, env: dict[str, str] | None = None):
    return start_visionserve(repo, *args, env=env, log_path=log, cwd=ROOT, ready_timeout_s=120)


def classify(channel: grpc.Channel, **kwargs: object) -> pb.ClassifyResponse:
    return pb_grpc.VisionServiceStub(channel).Classify(
        pb.ClassifyRequest(model="lenet5", images=[tensor_image(DIGIT)]), timeout=30, **kwargs)


def test_bad_tls_flags_fail_at_start_naming_the_flag(exported_repo, tmp_path, pki):
    repo = str(exported_repo)
    result = run_cli("serve", "--repo", repo, "--tls-cert", str(pki.server_cert))
    assert result.returncode == 2 and "--tls-cert and --tls-key go together" in result.stderr
    result = run_cli("serve", "--repo", repo, "--tls-cert", str(pki.server_cert),
                     "--tls-key", str(tmp_path / "missing.key"))
    assert result.returncode == 2 and "--tls-key" in result.stderr
    assert "cannot read it" in result.stderr


def test_a_model_whose_external_data_escapes_its_folder_fails_alone(exported_repo, tmp_path):
    """The onnxruntime floor (>= 1.24.1, docs/security.md): a version whose initializer points
    at a file outside its folder is refused at load; the file is never read into weights."""
    onnx = pytest.importorskip("onnx")
    from onnx import TensorProto, helper, numpy_helper

    repo = make_repo(exported_repo, tmp_path / "repo", ("lenet5",))
    secret = tmp_path / "secret.bin"
    np.arange(4, dtype=np.float32).tofile(secret)
    (repo / "escape" / "1").mkdir(parents=True)
    (repo / "escape" / "config.toml").write_text((repo / "lenet5" / "config.toml").read_text())
    weight = numpy_helper.from_array(np.zeros(4, np.float32), "W")
    weight.ClearField("raw_data")
    weight.data_location = TensorProto.EXTERNAL
    for key, value in (("location", "../../../secret.bin"), ("offset", "0"), ("length", "16")):
        entry = weight.external_data.add()
        entry.key, entry.value = key, value
    graph = helper.make_graph(
        [helper.make_node("Add", [INPUT, "W"], [LOGITS])], "escape",
        [helper.make_tensor_value_info(INPUT, TensorProto.FLOAT, [4])],
        [helper.make_tensor_value_info(LOGITS, TensorProto.FLOAT, [4])], initializer=[weight])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    onnx.save_model(model, repo / "escape" / "1" / "model.onnx")

    launched = start_visionserve(repo, "--model-control", "none", log_path=tmp_path / "s.log")
    try:
        with grpc.insecure_channel(launched.target) as channel:
            stub = pb_grpc.VisionServiceStub(channel)
            info = stub.GetModel(pb.GetModelRequest(model="escape"), timeout=30)
            (version,) = info.versions
            assert version.state == pb.MODEL_STATE_FAILED
            assert "External data path escapes model directory" in version.reason, \
                version.reason
            assert stub.Classify(pb.ClassifyRequest(model="lenet5", images=[
                tensor_image(np.zeros((1, 32, 32), np.float32))]), timeout=30).results
    finally:
        assert launched.stop() == 0


# --- exposure (issue 18): what starts, what binds, what parses ---------------------------------

def test_tls_material_that_does_not_parse_or_match_fails_at_start_naming_the_flag(
        exported_repo, tmp_path, pki):
    garbage = tmp_path / "garbage.pem"
    garbage.write_text("-----BEGIN CERTIFICATE-----\nnot base64\n-----END CERTIFICATE-----\n")
    other = tmp_path / "other"
    other.mkdir()
    key_and_cert(other, "other", None)
    for flags, named in (
            (("--tls-cert", str(garbage), "--tls-key", str(pki.server_key)), "--tls-cert"),
            (("--tls-cert", str(pki.server_cert), "--tls-key", str(other / "other.key")),
             "its matching private key"),
            (("--tls-cert", str(pki.server_cert), "--tls-key", str(pki.server_key),
              "--tls-client-ca", str(garbage)), "--tls-client-ca")):
        result = run_cli("serve", "--repo", str(exported_repo), *flags)
        assert result.returncode == 2, (flags, result.stderr[-2000:])
        assert named in result.stderr and "Traceback" not in result.stderr, result.stderr


def test_a_port_in_use_is_a_start_up_error_and_the_first_server_keeps_it(exported_repo,
                                                                        tmp_path):
    srv = serve(make_repo(exported_repo, tmp_path / "repo", ("lenet5",)), tmp_path / "s.log")
    try:
        second = run_cli("serve", "--repo", str(tmp_path / "repo"), "--host", "127.0.0.1",
                         "--grpc-port", str(srv.grpc_port), "--metrics-port", "0",
                         "--http-port", "0")
        assert second.returncode == 2, second.stderr[-2000:]
        assert f"--grpc-port {srv.grpc_port}: cannot listen on 127.0.0.1:{srv.grpc_port}: the " \
               "port is in use" in second.stderr
        assert "--reuse-port" in second.stderr and "Traceback" not in second.stderr
        metrics = run_cli("serve", "--repo", str(tmp_path / "repo"), "--host", "127.0.0.1",
                          "--grpc-port", "0", "--metrics-port", str(srv.metrics_port),
                          "--http-port", "0")
        assert metrics.returncode == 2 and f"--metrics-port {srv.metrics_port}: cannot listen" \
            in metrics.stderr
        with grpc.insecure_channel(srv.target) as channel:  # every call still lands here
            for _ in range(20):
                assert classify(channel).version == 1
    finally:
        srv.stop()


def test_a_token_is_trimmed_the_same_way_from_the_environment_and_from_a_file(exported_repo,
                                                                             tmp_path):
    repo = make_repo(exported_repo, tmp_path / "repo", ("lenet5",))
    token_file = tmp_path / "token"
    token_file.write_text(f"  {TOKEN}  \n")
    for args, env in ((("--auth-token-file", str(token_file)), {}),
                      ((), {"VISIONSERVE_AUTH_TOKEN": f"{TOKEN}\n"})):  # echo's newline
        srv = serve(repo, tmp_path / "s.log", *args, env=env)
        try:
            with grpc.insecure_channel(srv.target) as channel:
                assert classify(channel, metadata=(("authorization", f"Bearer {TOKEN}"),))
        finally:
            srv.stop()
    empty = run_cli("serve", "--repo", str(repo), env={"VISIONSERVE_AUTH_TOKEN": " \n"})
    assert empty.returncode == 2 and "VISIONSERVE_AUTH_TOKEN is set but empty" in empty.stderr


def test_explicit_model_control_without_a_token_needs_trust_network_to_start(exported_repo):
    result = run_cli("serve", "--repo", str(exported_repo), "--model-control", "explicit")
    assert result.returncode == 2
    assert "--model-control explicit without a token lets any client that reaches the port " \
           "unload every model" in result.stderr
    assert "--trust-network" in result.stderr


def test_a_rotated_token_file_is_reloaded_without_a_restart(exported_repo, tmp_path):
    """The file changes (a rotated secret): the new token works and the old one stops working;
    a SIGHUP reloads even a change the file's watch cannot see; an emptied file keeps the token
    in use."""
    import os
    import signal

    token_file = tmp_path / "token"
    token_file.write_text("first-token\n")
    srv = serve(make_repo(exported_repo, tmp_path / "repo", ("lenet5",)), tmp_path / "s.log",
                "--auth-token-file", str(token_file))

    def accepted(token: str) -> bool:
        try:
            classify(channel, metadata=(("authorization", f"Bearer {token}"),))
        except grpc.RpcError as err:
            assert err.code() == grpc.StatusCode.UNAUTHENTICATED
            return False
        return True

    try:
        with grpc.insecure_channel(srv.target) as channel:
            assert accepted("first-token")
            token_file.write_text("second-token\n")
            eventually(lambda: accepted("second-token"), "the rotated token to be accepted")
            assert not accepted("first-token")
            # a change the watch cannot see (same file, size and mtime), so that only the
            # SIGHUP can be what reloads it: no race of the signal against the watch's period
            seen = token_file.stat()
            token_file.write_text("third--token\n")  # the size of "second-token\n"
            os.utime(token_file, ns=(seen.st_atime_ns, seen.st_mtime_ns))
            assert token_file.stat().st_size == seen.st_size
            srv.process.send_signal(signal.SIGHUP)
            eventually(lambda: accepted("third--token"), "SIGHUP to reload the token")
            token_file.write_text("")
            srv.process.send_signal(signal.SIGHUP)
            eventually(lambda: "auth token not reloaded" in srv.log_tail(), "the refusal logged")
            assert accepted("third--token")
        assert srv.process.poll() is None
    finally:
        srv.stop()


def test_held_metrics_connections_cost_no_threads_and_are_closed(exported_repo, tmp_path):
    """200 connections that send half a request head and wait (slowloris): the server's thread
    count does not move, a scrape still answers, the connections beyond the bound are closed at
    once and the others once their head is overdue."""
    import socket

    from visionserve.bench.launch import threads

    srv = serve(make_repo(exported_repo, tmp_path / "repo", ("lenet5",)), tmp_path / "s.log")
    held: list[socket.socket] = []
    try:
        before = threads(srv.process.pid)
        for _ in range(200):
            s = socket.create_connection(("127.0.0.1", srv.metrics_port), timeout=30)
            s.sendall(b"GET /metrics HTTP/1.1\r\nHost: x\r\n")  # and never the blank line
            held.append(s)
        # a scrape on a connection opened after the 200: the server accepts in order, so by its
        # answer it has taken every held one in (a thread per connection would exist by now)
        with urllib.request.urlopen(f"http://127.0.0.1:{srv.metrics_port}/metrics",
                                    timeout=10) as reply:
            assert b"visionserve_model_state" in reply.read()
        assert threads(srv.process.pid) <= before + 1
        for s in held:  # every one is closed by the server: at once, or after its deadline
            try:
                assert s.recv(1024) == b""
            except ConnectionResetError:  # closed with our unread bytes: a reset
                pass
    finally:
        for s in held:
            s.close()
        srv.stop()


# --- HTTP/2 transport limits -----------------------------------------------------------------

def watch_states(channel: grpc.Channel) -> list[grpc.ChannelConnectivity]:
    seen: list[grpc.ChannelConnectivity] = []
    channel.subscribe(seen.append, try_to_connect=False)
    return seen


def test_an_idle_connection_is_closed_and_the_client_reconnects(exported_repo, tmp_path):
    srv = serve(make_repo(exported_repo, tmp_path / "repo", ("lenet5",)), tmp_path / "s.log",
                "--connection-idle-s", "1")
    try:
        with grpc.insecure_channel(srv.target) as channel:
            states = watch_states(channel)
            assert classify(channel).version == 1
            # READY is recorded by the channel's watcher thread, possibly after the call
            # returned: until it is there, nothing after it can be
            eventually(lambda: grpc.ChannelConnectivity.READY in states
                       and grpc.ChannelConnectivity.IDLE in states[states.index(
                           grpc.ChannelConnectivity.READY):],
                       "the server to close the idle connection", timeout=15)
            assert classify(channel).version == 1  # a new connection, transparently
    finally:
        srv.stop()


def test_connections_are_recycled_at_their_age_without_failing_calls(exported_repo, tmp_path):
    srv = serve(make_repo(exported_repo, tmp_path / "repo", ("lenet5",)), tmp_path / "s.log",
                "--connection-age-s", "1", "--connection-age-grace-s", "1")
    try:
        with grpc.insecure_channel(srv.target) as channel:
            states = watch_states(channel)

            def reconnected() -> bool:
                assert classify(channel).version == 1  # every call succeeds meanwhile
                return states.count(grpc.ChannelConnectivity.READY) >= 2

            eventually(reconnected, "a second connection after the first aged out",
                       timeout=20, interval=0.1)
    finally:
        srv.stop()


def test_calls_beyond_the_streams_per_connection_wait_for_a_free_stream(exported_repo,
                                                                       tmp_path):
    """Two streams may be open on one connection: of three opened at once, two are answered and
    the third (whichever the client queued) only once one of the two ends."""
    import queue
    from concurrent.futures import ThreadPoolExecutor

    srv = serve(make_repo(exported_repo, tmp_path / "repo", ("lenet5",)), tmp_path / "s.log",
                "--max-streams-per-connection", "2")
    request = pb.ClassifyRequest(model="lenet5", images=[tensor_image(DIGIT)])
    try:
        with grpc.insecure_channel(srv.target) as channel, ThreadPoolExecutor(3) as pool:
            stub = pb_grpc.VisionServiceStub(channel)
            inputs = [queue.Queue() for _ in range(3)]
            streams = []
            for q in inputs:
                q.put(request)
                streams.append(stub.ClassifyStream(iter(q.get, None), timeout=60))
            first = [pool.submit(next, s) for s in streams]
            eventually(lambda: sum(f.done() for f in first) >= 2, "two streams answered",
                       timeout=30)
            waiting = [i for i, f in enumerate(first) if not f.done()]
            assert len(waiting) == 1, [f.done() for f in first]
            answered = [i for i in range(3) if i != waiting[0]]
            assert all(first[i].result().response.results for i in answered)
            # no sleep to give the third a chance: a round trip on an open stream instead. Had
            # the third been admitted, its request would have left with the first two, long
            # before this one, on the same connection; this one is answered, the third is not
            inputs[answered[0]].put(request)
            assert next(streams[answered[0]]).response.results
            assert not first[waiting[0]].done()
            inputs[answered[0]].put(None)  # one stream ends: its HTTP/2 stream is freed
            assert list(streams[answered[0]]) == []
            assert first[waiting[0]].result(timeout=30).response.results
            for i in (answered[1], waiting[0]):
                inputs[i].put(None)
    finally:
        srv.stop()


def test_a_burst_past_the_streams_per_connection_is_answered_by_the_server_not_reset(
        exported_repo, tmp_path):
    """300 calls at once on one connection that may hold 4 streams, to a server that admits one
    inference at a time: each call ends OK or RESOURCE_EXHAUSTED with the server's own message.
    None is reset by the transport (UNAVAILABLE "Stream removed", REFUSED_STREAM), which gRPC's
    overload protection does when it still counts streams the server has answered but not yet
    freed (seen in CI under overload)."""
    srv = serve(make_repo(exported_repo, tmp_path / "repo", ("lenet5",)), tmp_path / "s.log",
                "--max-streams-per-connection", "4", "--max-inflight-requests", "1")
    request = pb.ClassifyRequest(model="lenet5", images=[tensor_image(DIGIT)])
    try:
        with grpc.insecure_channel(srv.target) as channel:
            stub = pb_grpc.VisionServiceStub(channel)
            stub.Classify(request, timeout=30)  # connected, settings exchanged
            calls = [stub.Classify.future(request, timeout=120) for _ in range(300)]
            outcomes: dict[str, int] = {}
            messages = set()
            for call in calls:
                code = call.code()
                outcomes[code.name] = outcomes.get(code.name, 0) + 1
                if code != grpc.StatusCode.OK:
                    messages.add(call.details())
        assert set(outcomes) <= {"OK", "RESOURCE_EXHAUSTED"}, (outcomes, messages)
        assert outcomes.get("OK", 0) > 0
        assert all(m.startswith("server busy: 1 inference requests are in progress")
                   for m in messages), messages
    finally:
        srv.stop()


def test_a_client_that_floods_keepalive_pings_is_disconnected(exported_repo, tmp_path):
    """Pings every 100 ms on an open call, where the server allows one per 5 min: after two
    strikes the server closes the connection (GOAWAY too_many_pings) and the call fails; the
    server serves on."""
    import queue

    srv = serve(make_repo(exported_repo, tmp_path / "repo", ("lenet5",)), tmp_path / "s.log")
    flood = grpc.insecure_channel(srv.target, options=[
        ("grpc.keepalive_time_ms", 100), ("grpc.keepalive_timeout_ms", 1000),
        ("grpc.keepalive_permit_without_calls", 1), ("grpc.http2.max_pings_without_data", 0)])
    try:
        inputs: queue.Queue = queue.Queue()
        inputs.put(pb.ClassifyRequest(model="lenet5", images=[tensor_image(DIGIT)]))
        stream = pb_grpc.VisionServiceStub(flood).ClassifyStream(iter(inputs.get, None),
                                                                 timeout=60)
        assert next(stream).response.results
        with pytest.raises(grpc.RpcError) as err:  # nothing else is sent: only pings
            next(stream)
        assert err.value.code() == grpc.StatusCode.UNAVAILABLE, err.value.details()
        assert "Too many pings" in err.value.details()
        with grpc.insecure_channel(srv.target) as channel:
            assert classify(channel).version == 1
    finally:
        flood.close()
        srv.stop()
