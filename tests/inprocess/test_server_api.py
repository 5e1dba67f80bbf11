"""What the server answers, on the in-process server: the metrics endpoint (request histograms,
documented families, no series for unknown names), health and reflection, a bad config failing
its model only, the newest version served by default; and failures inside the batcher, decided
by the fake engine's holds rather than by slow models: an engine fault fails its batch only,
cancelled and expired work is never computed, a deadline the queue cannot meet is refused at
once.

Moved here from tests/test_server_process.py and tests/test_reliability.py, which keep what only
a process shows: signals, exit codes, the ready file, PyTorch unimportable, the CLI's output.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import re
from collections import Counter
from concurrent.futures import ThreadPoolExecutor

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from conftest import ROOT, encode, eventually, photo, tensor_image
from inprocess.harness import InProcessServer, fake_repo, publish_fake
from visionserve.bench.launch import rss_mb
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
    health = health_pb2_grpc.HealthStub(server.channel)
    assert health.Check(health_pb2.HealthCheckRequest()).status == \
        health_pb2.HealthCheckResponse.SERVING
    stub = reflection_pb2_grpc.ServerReflectionStub(server.channel)
    reply = next(stub.ServerReflectionInfo(iter([
        reflection_pb2.ServerReflectionRequest(list_services="")])))
    names = {s.name for s in reply.list_services_response.service}
    assert "visionserve.v1.VisionService" in names and "grpc.health.v1.Health" in names


def test_a_bad_config_fails_that_model_only_naming_the_file_and_key(server_factory, tmp_path):
    srv = server_factory(("lenet5", "mobilenet_v3_small"),
                         {"mobilenet_v3_small": {"batching.max_queue_delay_ms": "soon"}})
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


def test_only_the_newest_version_is_served_by_default(tmp_path, engines):
    repo = fake_repo(tmp_path / "repo", ("lenet5",))
    version = publish_fake(repo / "lenet5", 2)
    (version / "labels.txt").write_text(  # hand-made: labels of its own
        "\n".join(f"digit-{i}" for i in range(10)) + "\n")
    srv = InProcessServer(repo, engines=engines)
    try:
        reply = srv.stub.Classify(pb.ClassifyRequest(model="lenet5", images=[
            tensor_image(np.zeros((32, 32, 1), np.uint8))]))
        assert reply.version == 2
        assert all(c.label.startswith("digit-") for c in reply.results[0].classes)
    finally:
        srv.stop()


# --- failures inside the batcher ----------------------------------------------------------------

def test_a_backend_error_fails_only_its_batch_and_logs_the_request_ids(server_factory):
    srv = server_factory(("lenet5",), {"lenet5": {
        # an idle instance waits for three images: the three calls batch together (the delay,
        # a minute, only bounds the wait should a call never come)
        "batching.max_queue_delay_ms": 60_000.0, "batching.preferred_batch_sizes": [3]}})
    good = np.zeros((1, 32, 32), np.float32)
    poison = np.full((1, 32, 32), 1000.0, np.float32)

    def call(rid: str, x: np.ndarray) -> grpc.StatusCode:
        try:
            srv.stub.Classify(pb.ClassifyRequest(model="lenet5", request_id=rid,
                                                 images=[tensor_image(x)]), timeout=60)
        except grpc.RpcError as err:
            assert "Traceback" not in err.details() and ".py" not in err.details()
            return err.code()
        return grpc.StatusCode.OK

    srv.engines.fail("lenet5")  # the engine faults on the batch (a poison pill inside it)
    with ThreadPoolExecutor(3) as pool:
        codes = list(pool.map(call, ["good-a", "poison-b", "good-c"], [good, poison, good]))
    assert codes == [grpc.StatusCode.INTERNAL] * 3  # one batch, one failure
    line = next(x for x in srv.log().splitlines() if "inference failed on a batch" in x)
    assert "model lenet5 version 1" in line and "batch of 3 images" in line
    assert "requests good-a, good-c, poison-b" in line
    srv.engines.fail("lenet5", False)
    with ThreadPoolExecutor(3) as pool:  # the next batch runs
        codes = list(pool.map(call, ["a", "b", "c"], [good] * 3))
    assert codes == [grpc.StatusCode.OK] * 3
    assert srv.metric("visionserve_batch_size_sum", model="lenet5") == 3
    assert srv.engines.batches["lenet5"] == [1, 3, 3]  # warm-up, the failed batch, the next


def _code(future) -> str:
    try:
        future.result()
    except grpc.FutureCancelledError:
        return "CANCELLED"
    except grpc.RpcError as err:
        return err.code().name
    return "OK"


def held_rss_mb() -> float:
    """Resident memory of this process (the server and its clients), in MB, once the C heap
    has handed its free pages back (glibc's malloc_trim): what is still held, not the freed
    pages the allocator keeps for reuse (after this storm, ~200 MB in the one process that
    holds the server, its clients and the decoded images)."""
    ctypes.CDLL(ctypes.util.find_library("c")).malloc_trim(0)
    return rss_mb(os.getpid())


def test_a_storm_of_cancellations_and_short_deadlines_computes_none_of_them(server_factory):
    srv = server_factory(("resnet18",), {"resnet18": {
        "max_batch_size": 1,
        # admit the short deadlines (see the next test) to show that the queue drops them
        "batching.reject_unreachable_deadlines": False}},
        # ... and the whole storm in flight at once, past the default in-flight limit, on one
        # connection: past its default 256 streams too (more would wait in the client)
        "--max-inflight-requests", "1000", "--max-streams-per-connection", "1000")
    x = tensor_image(np.zeros((224, 224, 3), np.uint8))
    one = pb.ClassifyRequest(model="resnet18", images=[x])
    rss_before = held_rss_mb()
    # 30 images at batch 1, the first held in the engine: everything behind them waits
    srv.engines.hold("resnet18")
    busy = srv.stub.Classify.future(pb.ClassifyRequest(model="resnet18", images=[x] * 30),
                                    timeout=300)
    eventually(lambda: srv.engines.waiting("resnet18") == 1 and srv.metric(
        "visionserve_queue_depth", model="resnet18") == 29, "the busy request to queue")
    cancelled = [srv.stub.Classify.future(one, timeout=120) for _ in range(150)]
    # cancelled only once the server holds them all (queued behind the busy request), so the
    # batcher, not the transport, is what drops them
    eventually(lambda: srv.metric("visionserve_queue_depth", model="resnet18")
               == 29 + len(cancelled), "the server to queue every cancellable request")
    # the short deadlines (5-55 ms: a clock, the subject) pass while the engine is held
    short = [srv.stub.Classify.future(one, timeout=0.005 + 0.001 * (i % 50))
             for i in range(150)]
    for f in cancelled:
        f.cancel()
    codes = Counter(_code(f) for f in short + cancelled)
    srv.engines.release("resnet18")
    assert len(busy.result().results) == 30
    assert codes == Counter({"DEADLINE_EXCEEDED": 150, "CANCELLED": 150}), codes
    # the server proves it: the images it computed are exactly the 30 answered, while it
    # counted the dropped ones by reason; queue and in-flight gauges are back to zero
    eventually(lambda: srv.metric("visionserve_queue_depth", model="resnet18") == 0,
               "an empty queue")
    eventually(lambda: srv.metric("visionserve_inflight_requests") == 0, "no call in flight")
    assert srv.metric("visionserve_batch_size_sum", model="resnet18") == 30
    assert srv.engines.batches["resnet18"] == [1] * 31  # the warm-up's, then the 30
    dropped = {r: srv.metric("visionserve_requests_expired_total", model="resnet18",
                             reason=r) for r in ("deadline", "cancelled")}
    # which reason counts a short-deadline request (its deadline seen by the batcher, or
    # the transport cancelling the call first) is a race; that none was computed is not
    assert dropped["cancelled"] > 0 and 0 < dropped["deadline"] + dropped["cancelled"] <= 300, \
        dropped
    assert len(srv.stub.Classify(one, timeout=30).results) == 1
    assert srv.metric("visionserve_batch_size_sum", model="resnet18") == 31
    # 300 requests of 150 KB were held at once; what must not happen is growth beyond that
    assert held_rss_mb() - rss_before < 200


def test_a_deadline_the_queue_cannot_meet_is_refused_at_once(server_factory):
    """The deadline is a clock (the subject): it is set from the server's own compute rate, a
    third of what the images queued ahead need, not a fixed 100 ms raced against compute. The
    rate is learnt from one batch held in the engine while the busy request queues behind it,
    so the queue is full and still when the short deadline arrives."""
    srv = server_factory(("resnet18",), {"resnet18": {"max_batch_size": 1}})
    x = tensor_image(np.zeros((224, 224, 3), np.uint8))
    one = pb.ClassifyRequest(model="resnet18", images=[x])
    srv.engines.hold("resnet18")
    with ThreadPoolExecutor(1) as pool:
        learn = pool.submit(srv.stub.Classify, one, timeout=120)  # the batcher learns its rate
        eventually(lambda: srv.engines.waiting("resnet18") == 1, "the first request held")
        busy = srv.stub.Classify.future(pb.ClassifyRequest(model="resnet18", images=[x] * 30),
                                        timeout=300)
        eventually(lambda: srv.metric("visionserve_queue_depth", model="resnet18") == 30,
                   "the busy request to queue")
        srv.engines.step("resnet18")
        assert len(learn.result(60).results) == 1
    queued = eventually(lambda: (n := srv.metric("visionserve_queue_depth",
                                                 model="resnet18")) == 29
                        and srv.engines.waiting("resnet18") == 1 and n,
                        "the busy request's first image held, the rest queued")
    per_image_s = (srv.metric("visionserve_compute_duration_seconds_sum", model="resnet18")
                   / srv.metric("visionserve_batch_size_sum", model="resnet18"))
    timeout = queued * per_image_s / 3
    with pytest.raises(grpc.RpcError) as info:
        srv.stub.Classify(one, timeout=timeout)
    assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, \
        (info.value.details(), queued, per_image_s)
    assert "model resnet18 version 1: overloaded for this deadline" in info.value.details()
    assert "refused now rather than dropped later" in info.value.details()
    late = srv.stub.Classify.future(one, timeout=120)  # a deadline it can meet: admitted
    eventually(lambda: srv.metric("visionserve_queue_depth", model="resnet18") == 30,
               "the late request queued")
    srv.engines.release("resnet18")
    assert len(busy.result().results) == 30 and len(late.result().results) == 1
    assert srv.metric("visionserve_requests_rejected_total", model="resnet18",
                      reason="deadline_unreachable") == 1
    assert srv.metric("visionserve_batch_size_sum", model="resnet18") == 32
