"""The server as a process: no PyTorch, the ready file, SIGTERM's graceful shutdown and exit
code, and the CLI a user types. (The metrics endpoint, health and reflection, a bad config and
the newest version run on the in-process server: tests/inprocess/test_server_api.py.)"""

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
    encode,
    eventually,
    make_repo,
    photo,
    run_cli,
    start_server,
    tensor_image,
)
from visionserve.v1 import visionserve_pb2 as pb


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
