"""The server as a process: metrics over HTTP, health, reflection, no PyTorch, bad configs,
graceful shutdown, and the CLI a user types."""

from __future__ import annotations

import json
import re
import signal
import subprocess
import sys
import threading
from pathlib import Path

import grpc
import numpy as np
from grpc_health.v1 import health_pb2, health_pb2_grpc

from conftest import (
    ROOT,
    encode,
    eventually,
    make_repo,
    photo,
    run_cli,
    start_server,
    tensor_image,
)
from visionserve.v1 import visionserve_pb2 as pb


def test_metrics_endpoint_has_request_histograms_with_model_version_method_code(server):
    server.stub.Classify(pb.ClassifyRequest(model="lenet5", images=[
        pb.Image(encoded=encode(photo("camera"), "PNG"))]))
    text = server.metrics_text()
    assert re.search(r'visionserve_request_duration_seconds_bucket\{code="OK",le="0\.005",'
                     r'method="Classify",model="lenet5",version="1"\} \d', text)
    for family in ("visionserve_queue_duration_seconds_bucket",
                   "visionserve_preprocess_duration_seconds_bucket",
                   "visionserve_compute_duration_seconds_bucket",
                   "visionserve_batch_size_bucket"):
        assert re.search(family + r'\{le="[^"]+",model="lenet5",version="1"\}', text), family
    assert 'visionserve_queue_capacity{model="lenet5",version="1"}' in text
    assert 'visionserve_model_state{model="lenet5",state="ready",version="1"} 1.0' in text


def test_every_exported_metric_is_documented(server):
    documented = set(re.findall(r"`(visionserve_\w+)`", (ROOT / "docs/metrics.md").read_text()))
    exported = set(re.findall(r"^# TYPE (visionserve_\w+)", server.metrics_text(), re.M))
    assert exported
    missing = {m for m in exported if m not in documented and m + "_total" not in documented}
    assert not missing, f"undocumented metrics: {missing}"


def test_unknown_model_names_do_not_create_metric_series(server):
    for i in range(3):
        try:
            server.stub.Classify(pb.ClassifyRequest(model=f"junk{i}"))
        except grpc.RpcError:
            pass
    assert "junk" not in server.metrics_text()


def test_health_and_reflection_are_served(server):
    from grpc_health.v1 import health_pb2, health_pb2_grpc
    from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

    health = health_pb2_grpc.HealthStub(server.channel)
    assert health.Check(health_pb2.HealthCheckRequest()).status == \
        health_pb2.HealthCheckResponse.SERVING
    stub = reflection_pb2_grpc.ServerReflectionStub(server.channel)
    reply = next(stub.ServerReflectionInfo(iter([
        reflection_pb2.ServerReflectionRequest(list_services="")])))
    names = {s.name for s in reply.list_services_response.service}
    assert "visionserve.v1.VisionService" in names and "grpc.health.v1.Health" in names


def test_the_serving_path_runs_with_torch_unimportable(exported_repo, tmp_path):
    blocker = tmp_path / "blocker" / "torch"
    blocker.mkdir(parents=True)
    (blocker / "__init__.py").write_text("raise ImportError('torch is blocked in this test')\n")
    srv = start_server(make_repo(exported_repo, tmp_path / "repo", ("lenet5",)),
                       tmp_path / "server.log", env={"PYTHONPATH": str(blocker.parent)})
    try:
        reply = srv.stub.Classify(pb.ClassifyRequest(model="lenet5", images=[
            pb.Image(encoded=encode(photo("camera"), "PNG"))]))
        assert len(reply.results[0].classes) == 5
    finally:
        srv.stop()
    assert "torch is blocked" not in srv.log()


def test_the_ready_file_appears_once_serving_and_goes_when_shutdown_starts(exported_repo,
                                                                          tmp_path):
    """--ready-file: how a script learns the ports of --grpc-port 0 and that models are up."""
    ready_file = tmp_path / "state" / "ready.json"
    ready_file.parent.mkdir()
    process = subprocess.Popen(
        [sys.executable, "-m", "visionserve.service.cli", "serve", "--repo",
         str(make_repo(exported_repo, tmp_path / "repo", ("lenet5",))), "--host", "127.0.0.1",
         "--grpc-port", "0", "--metrics-port", "0", "--http-port", "0", "--ready-file",
         str(ready_file)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        assert eventually(lambda: ready_file.exists() or process.poll() is not None,
                          "the ready file", timeout=120) and process.poll() is None
        ready = json.loads(ready_file.read_text())
        assert set(ready) == {"grpc_port", "http_port", "metrics_port", "pid", "models_ready",
                              "models_failed"}
        assert ready["pid"] == process.pid and ready["grpc_port"] > 0 and ready["http_port"] > 0
        assert (ready["models_ready"], ready["models_failed"]) == (["lenet5"], [])
        with grpc.insecure_channel(f"127.0.0.1:{ready['grpc_port']}") as channel:
            assert health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(), timeout=10).status == \
                health_pb2.HealthCheckResponse.SERVING
    finally:
        process.terminate()
        assert process.wait(timeout=60) == 0
    assert list(ready_file.parent.iterdir()) == []  # removed at shutdown, no temp file left


def test_a_ready_file_in_a_folder_that_cannot_be_written_is_a_usage_error(tmp_path):
    result = run_cli("serve", "--repo", str(tmp_path), "--ready-file",
                     str(tmp_path / "missing" / "ready.json"))
    assert result.returncode == 2 and "--ready-file" in result.stderr


def test_a_bad_config_fails_that_model_only_naming_the_file_and_key(exported_repo, tmp_path):
    repo = make_repo(exported_repo, tmp_path / "repo", ("lenet5", "mobilenet_v3_small"),
                     {"mobilenet_v3_small": {"batching.max_queue_delay_ms": "soon"}})
    srv = start_server(repo, tmp_path / "server.log")
    try:
        info = srv.stub.GetModel(pb.GetModelRequest(model="mobilenet_v3_small"))
        assert info.state == pb.MODEL_STATE_FAILED
        assert info.reason.startswith("mobilenet_v3_small/config.toml: ")  # repository-relative
        assert str(tmp_path) not in info.reason  # never the server's own directories
        assert "batching.max_queue_delay_ms must be a number" in info.reason
        try:
            srv.stub.Classify(pb.ClassifyRequest(model="mobilenet_v3_small", images=[
                pb.Image(encoded=b"x")]))
        except grpc.RpcError as err:
            assert err.code() == grpc.StatusCode.FAILED_PRECONDITION
            assert "config.toml" in err.details()
        else:
            raise AssertionError("a failed model answered")
        models = {m.name: m.state for m in srv.stub.ListModels(pb.ListModelsRequest()).models}
        assert models == {"lenet5": pb.MODEL_STATE_READY,
                          "mobilenet_v3_small": pb.MODEL_STATE_FAILED}
        assert srv.metric("visionserve_model_load_failures_total",
                          model="mobilenet_v3_small") == 1
    finally:
        srv.stop()


def test_only_the_newest_version_is_served_by_default(exported_repo, tmp_path):
    import shutil

    repo = make_repo(exported_repo, tmp_path / "repo", ("lenet5",))
    shutil.copytree(repo / "lenet5" / "1", repo / "lenet5" / "2")
    (repo / "lenet5" / "2" / "labels.txt").write_text(
        "\n".join(f"digit-{i}" for i in range(10)) + "\n")
    shutil.rmtree(repo / "lenet5" / "2" / "golden")  # hand-made: labels of its own
    srv = start_server(repo, tmp_path / "server.log")
    try:
        reply = srv.stub.Classify(pb.ClassifyRequest(model="lenet5", images=[
            tensor_image(np.zeros((32, 32, 1), np.uint8))]))
        assert reply.version == 2
        assert all(c.label.startswith("digit-") for c in reply.results[0].classes)
    finally:
        srv.stop()


def test_sigterm_finishes_in_flight_requests_then_exits_cleanly(exported_repo, tmp_path):
    srv = start_server(make_repo(exported_repo, tmp_path / "repo", ("resnet18",)),
                       tmp_path / "server.log")
    x = np.zeros((3, 224, 224), np.float32)
    result: dict[str, object] = {}

    def call() -> None:
        try:
            result["reply"] = srv.stub.Classify(pb.ClassifyRequest(
                model="resnet18", images=[tensor_image(x)] * 48), timeout=120)
        except grpc.RpcError as err:
            result["error"] = err

    thread = threading.Thread(target=call)
    thread.start()
    eventually(lambda: srv.metric("visionserve_inflight_requests", method="Classify") > 0,
               "the 48-image request in flight", interval=0.005)
    srv.process.send_signal(signal.SIGTERM)
    thread.join()
    assert "error" not in result, result.get("error")
    assert len(result["reply"].results) == 48  # type: ignore[union-attr]
    assert srv.process.wait(timeout=60) == 0
    assert "stopped" in srv.log()


def test_cli_classify_prints_a_table_and_models_lists_what_is_loaded(server):
    image = Path(server.log_path).with_name("chelsea.jpg")
    image.write_bytes(encode(photo("chelsea")))
    out = run_cli("classify", str(image), "--model", "resnet18", "--top-k", "3",
                  "--server", server.address)
    assert out.returncode == 0, out.stderr
    assert "resnet18 v1" in out.stdout and "score" in out.stdout
    assert len(re.findall(r"│ [123] │", out.stdout)) == 3
    out = run_cli("models", env={"VISIONSERVE_SERVER": server.address, "COLUMNS": "200"})
    assert out.returncode == 0, out.stderr
    for name in ("lenet5", "mobilenet_v3_small", "resnet18"):
        assert name in out.stdout
    out = run_cli("classify", str(image), "--model", "nope", "--server", server.address)
    assert out.returncode == 1 and "NOT_FOUND" in out.stderr


def test_help_explains_every_command():
    out = run_cli("--help")
    assert out.returncode == 0
    for command in ("serve", "export", "classify", "models", "bench"):
        assert command in out.stdout
    serve = run_cli("serve", "--help").stdout
    assert "VISIONSERVE_GRPC_PORT" in serve and "--metrics-port" in serve
