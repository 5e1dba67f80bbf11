"""Model versions while the server runs, through the whole server in this process (on the fake
engine): hot reload by polling, zero-downtime swaps under load, broken versions that never take
down a working one, a removed version that drains first (its request held in the engine: a
state the test waits for), config changes and removed models, and explicit control.

Moved from tests/test_lifecycle.py, which keeps what only the server process shows: its memory
(RSS) over sixty load/unload cycles of a real model."""

from __future__ import annotations

import json
import shutil
import threading
import time
import urllib.request

import grpc
import numpy as np
from grpc_health.v1 import health_pb2, health_pb2_grpc

from conftest import Load, eventually, publish, tensor_image
from inprocess.harness import fake_repo, publish_fake
from visionserve.inference import grpc_service_pb2 as kpb
from visionserve.inference import grpc_service_pb2_grpc as kpb_grpc
from visionserve.v1 import visionserve_pb2 as pb

# every poll is a scan of the repository: a short interval is only what the waits wait for
POLL = ("--model-control", "poll", "--poll-interval-s", "0.1")
LENET = pb.ClassifyRequest(model="lenet5", images=[tensor_image(np.zeros((32, 32, 1), np.uint8))])


def test_publishing_under_load_swaps_versions_without_a_failed_request(server_factory,
                                                                       tmp_path):
    srv = server_factory(("lenet5",), None, *POLL)
    repo = srv.repo
    load = Load(srv, LENET)
    try:
        eventually(lambda: len(load.replies) > 200, what="steady traffic")
        failures_before = srv.metric("visionserve_model_load_failures_total", model="lenet5")
        publish_fake(repo / "lenet5", 2, seed=5)  # what `visionserve export --seed 5` publishes
        eventually(lambda: 2 in load.versions_seen(), what="version 2 serving")
        eventually(lambda: srv.metric("visionserve_model_state", model="lenet5", version="1",
                                      state="unloaded") == 1, what="version 1 to retire")
        # a corrupt version 3 must not take version 2 down
        (tmp_path / "broken").mkdir()
        (tmp_path / "broken" / "model.onnx").write_bytes(b"this is not an onnx model")
        publish(repo / "lenet5", 3, tmp_path / "broken")
        eventually(lambda: srv.stub.GetModel(pb.GetModelRequest(model="lenet5")).versions[0]
                   .state == pb.MODEL_STATE_FAILED, what="version 3 to fail")
        failed_at = len(load.replies)
        # every client answered again since version 3 failed (by version 2: 1 is retired)
        eventually(lambda: {c for c, _, _ in load.replies[failed_at:]} == set(range(16)),
                   what="every client's answers after version 3 failed")
    finally:
        load.stop()
    assert load.errors() == []
    assert load.versions_seen() == {1, 2}
    assert load.monotonic_per_client()
    assert [v for _, v, _ in load.replies[-16:]] == [2] * 16
    info = srv.stub.GetModel(pb.GetModelRequest(model="lenet5"))
    states = {v.version: (v.state, v.reason) for v in info.versions}
    assert states[3][0] == pb.MODEL_STATE_FAILED and "model.onnx" in states[3][1]
    assert states[2][0] == pb.MODEL_STATE_READY and info.state == pb.MODEL_STATE_READY
    assert 1 not in states  # retired: latest = 1
    assert srv.metric("visionserve_model_load_failures_total", model="lenet5",
                      version="3") - failures_before == 1
    assert srv.metric("visionserve_model_state", model="lenet5", version="1",
                      state="unloaded") == 1
    assert srv.stub.Classify(LENET).version == 2


def test_latest_two_keeps_two_versions_and_a_removed_one_drains_first(start, engines,
                                                                     tmp_path):
    repo = fake_repo(tmp_path / "repo", ("resnet18",),
                     {"resnet18": {"version_policy.latest": 2}})
    publish_fake(repo / "resnet18", 2)
    srv = start(repo, *POLL)
    image = tensor_image(np.zeros((3, 224, 224), np.float32))
    for version in (1, 2):
        assert srv.stub.Classify(pb.ClassifyRequest(model="resnet18", version=version,
                                                    images=[image])).version == version
    result: dict[str, object] = {}

    def pinned() -> None:
        result["reply"] = srv.stub.Classify(pb.ClassifyRequest(
            model="resnet18", version=1, images=[image] * 96), timeout=120)

    engines.hold("resnet18")  # the pinned request's batches wait in the engine until released
    thread = threading.Thread(target=pinned)
    thread.start()
    try:
        eventually(lambda: engines.waiting("resnet18") > 0, what="the pinned request to compute")
        shutil.rmtree(repo / "resnet18" / "1")
        eventually(lambda: srv.metric("visionserve_model_state", model="resnet18", version="1",
                                      state="draining") == 1, what="version 1 to drain")
        assert thread.is_alive()  # the removed version waits for its request
    finally:
        engines.release("resnet18")
        thread.join(timeout=120)
    assert result["reply"].version == 1 and len(result["reply"].results) == 96
    eventually(lambda: srv.metric("visionserve_model_state", model="resnet18", version="1",
                                  state="unloaded") == 1, what="version 1 to unload")

    def version_1_code() -> grpc.StatusCode:
        try:
            srv.stub.Classify(pb.ClassifyRequest(model="resnet18", version=1, images=[image]))
        except grpc.RpcError as err:
            return err.code()
        return grpc.StatusCode.OK

    # a poll during the deletion may see the folder without its model file (that version
    # then reads as failed): the next poll, with the folder gone, forgets it
    eventually(lambda: version_1_code() == grpc.StatusCode.NOT_FOUND,
               what="requests for the removed version 1 to get NOT_FOUND")
    assert srv.stub.Classify(pb.ClassifyRequest(model="resnet18", images=[image])).version == 2


def test_config_changes_reload_and_removed_models_unload(server_factory):
    srv = server_factory(("lenet5", "mobilenet_v3_small"), None, *POLL)
    repo = srv.repo
    health = health_pb2_grpc.HealthStub(srv.channel)

    def healthy(name: str) -> int:
        return health.Check(health_pb2.HealthCheckRequest(service=name), timeout=10).status

    assert healthy("lenet5") == health_pb2.HealthCheckResponse.SERVING
    assert healthy("") == health_pb2.HealthCheckResponse.SERVING
    config = repo / "lenet5" / "config.toml"
    config.write_text(config.read_text().replace("max_batch_size = 256",
                                                 "max_batch_size = 8"))
    eventually(lambda: srv.stub.GetModel(pb.GetModelRequest(model="lenet5"))
               .max_batch_size == 8, what="the config change to apply")
    assert srv.stub.Classify(LENET).version == 1
    shutil.rmtree(repo / "mobilenet_v3_small")
    eventually(lambda: [m.name for m in srv.stub.ListModels(pb.ListModelsRequest()).models]
               == ["lenet5"], what="the removed model to unload")
    assert healthy("mobilenet_v3_small") == health_pb2.HealthCheckResponse.NOT_SERVING
    assert healthy("") == health_pb2.HealthCheckResponse.SERVING
    # a broken config.toml leaves the loaded model serving, and says why (in place of its
    # reason until then: the fake engine's files have no golden set, which it notes)
    before = srv.stub.GetModel(pb.GetModelRequest(model="lenet5")).reason
    config.write_text("max_batch_size = 'eight'\n")
    eventually(lambda: srv.stub.GetModel(pb.GetModelRequest(model="lenet5")).reason != before,
               what="the bad config to be reported")
    assert "max_batch_size must be int" in srv.stub.GetModel(
        pb.GetModelRequest(model="lenet5")).reason
    assert srv.stub.Classify(LENET).version == 1


def test_the_state_metric_follows_the_instance_that_serves_after_a_config_edit_and_revert(
        server_factory):
    """A config edit reloads version 1 as a new instance; the old one retires after the swap.
    Its retirement must not write over its successor's state (a user found the metric reading
    ``unloaded`` for a model that served)."""
    srv = server_factory(("lenet5", "mobilenet_v3_small"), None, *POLL)
    config = srv.repo / "lenet5" / "config.toml"
    original = config.read_text()

    def state(name: str) -> dict[str, float]:
        return {s: srv.metric("visionserve_model_state", model=name, version="1", state=s)
                for s in ("loading", "ready", "failed", "draining", "unloaded")}

    for batch in (8, 256):  # the edit, then its revert: the same version reloaded twice
        config.write_text(original.replace("max_batch_size = 256", f"max_batch_size = {batch}"))
        eventually(lambda b=batch: srv.stub.GetModel(pb.GetModelRequest(model="lenet5"))
                   .max_batch_size == b, what=f"max_batch_size {batch} to apply")
    # the second retired instance is released: nothing after this can change the state
    eventually(lambda: srv.log().count("unloaded model lenet5 version 1") == 2,
               what="both replaced instances to be released")
    assert srv.stub.Classify(LENET).version == 1
    assert state("lenet5") == {"loading": 0, "ready": 1, "failed": 0, "draining": 0,
                               "unloaded": 0}
    # a model whose folder is removed reads unloaded once it is released
    shutil.rmtree(srv.repo / "mobilenet_v3_small")
    eventually(lambda: state("mobilenet_v3_small")["unloaded"] == 1,
               what="the removed model to read unloaded")
    assert state("mobilenet_v3_small")["ready"] == 0


def test_explicit_mode_changes_nothing_until_asked(server_factory):
    # a poll interval far below the wait: if explicit mode polled, version 2 would be served
    srv = server_factory(("lenet5",), None, "--model-control", "explicit", "--trust-network",
                         "--load-model", "lenet5", "--poll-interval-s", "0.1")
    publish_fake(srv.repo / "lenet5", 2)
    # a claim only a clock can make (that nothing happens): explicit mode runs no poller,
    # so there is no event to wait for
    time.sleep(1.5)  # the subject: fifteen poll intervals of the flag above, and no change
    assert srv.stub.Classify(LENET).version == 1
    kpb_grpc.GRPCInferenceServiceStub(srv.channel).RepositoryModelLoad(
        kpb.RepositoryModelLoadRequest(model_name="lenet5"), timeout=60)
    assert srv.stub.Classify(LENET).version == 2


def test_the_repository_index_lists_every_model_folder_loaded_or_not(server_factory):
    """As Triton's: in explicit mode a client finds what it may load in the index; a folder
    not loaded has no version and no state. Hidden folders (an export's staging) never show."""
    srv = server_factory(("lenet5", "resnet18"), None, "--model-control", "explicit",
                         "--trust-network", "--load-model", "lenet5")
    (srv.repo / ".staging-abc" / "mobilenet_v3_small").mkdir(parents=True)
    index = kpb_grpc.GRPCInferenceServiceStub(srv.channel).RepositoryIndex(
        kpb.RepositoryIndexRequest(), timeout=30).models
    assert [(m.name, m.version, m.state) for m in index] == [("lenet5", "1", "READY"),
                                                             ("resnet18", "", "")]
    request = urllib.request.Request(f"http://127.0.0.1:{srv.http_port}/v2/repository/index",
                                     data=b"{}", method="POST")
    with urllib.request.urlopen(request, timeout=30) as reply:
        rest = json.load(reply)
    assert [(m["name"], m["version"], m["state"]) for m in rest] == [("lenet5", "1", "READY"),
                                                                     ("resnet18", "", "")]
    ready = kpb_grpc.GRPCInferenceServiceStub(srv.channel).RepositoryIndex(
        kpb.RepositoryIndexRequest(ready=True), timeout=30).models
    assert [m.name for m in ready] == ["lenet5"]
