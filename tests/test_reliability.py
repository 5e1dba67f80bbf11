"""Reliability under failure: a backend error inside a batch, and SIGTERM/SIGINT under load
(readiness off first, new calls UNAVAILABLE, every accepted request answered, exit within the
grace, a second signal exits at once)."""

from __future__ import annotations

import json
import re
import shutil
import signal
import threading
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from conftest import eventually, make_repo, run_cli, start_server, tensor_image
from visionserve.bench.launch import rss_mb
from visionserve.v1 import visionserve_pb2 as pb

onnx = pytest.importorskip("onnx")
from onnx import TensorProto, helper  # noqa: E402


def fragile_model(path: Path) -> None:
    """A LeNet-shaped ONNX model that ONNX Runtime fails on (Gather index out of bounds) for any
    batch holding an image whose largest value is >= 8: a poison pill inside a batch."""
    w = np.random.default_rng(0).standard_normal((1024, 10)).astype(np.float32)
    nodes = [
        helper.make_node("Flatten", ["input"], ["embedding"]),
        helper.make_node("MatMul", ["embedding", "w"], ["scores"]),
        helper.make_node("ReduceMax", ["input"], ["peak"], keepdims=0),
        helper.make_node("Cast", ["peak"], ["index"], to=TensorProto.INT64),
        helper.make_node("Gather", ["table", "index"], ["offset"]),
        helper.make_node("Add", ["scores", "offset"], ["logits"]),
    ]
    graph = helper.make_graph(
        nodes, "fragile",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["N", 1, 32, 32])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", 10]),
         helper.make_tensor_value_info("embedding", TensorProto.FLOAT, ["N", 1024])],
        [helper.make_tensor("w", TensorProto.FLOAT, w.shape, w.ravel()),
         helper.make_tensor("table", TensorProto.FLOAT, [8], [0.0] * 8)])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    onnx.checker.check_model(model)
    onnx.save(model, path)


def test_a_backend_error_fails_only_its_batch_and_logs_the_request_ids(exported_repo, tmp_path):
    repo = make_repo(exported_repo, tmp_path / "repo", ("lenet5",), {"lenet5": {
        # an idle instance waits for three images: the three calls batch together (the delay,
        # a minute, only bounds the wait should a call never come)
        "batching.max_queue_delay_ms": 60_000.0, "batching.preferred_batch_sizes": [3]}})
    shutil.move(repo / "lenet5", repo / "fragile")
    fragile_model(repo / "fragile" / "1" / "model.onnx")
    shutil.rmtree(repo / "fragile" / "1" / "golden")  # LeNet-5's: this model is another
    srv = start_server(repo, tmp_path / "server.log")
    good = np.zeros((1, 32, 32), np.float32)
    poison = np.full((1, 32, 32), 1000.0, np.float32)

    def call(rid: str, x: np.ndarray) -> grpc.StatusCode:
        try:
            srv.stub.Classify(pb.ClassifyRequest(model="fragile", request_id=rid,
                                                 images=[tensor_image(x)]), timeout=60)
        except grpc.RpcError as err:
            assert "Traceback" not in err.details() and ".py" not in err.details()
            return err.code()
        return grpc.StatusCode.OK

    try:
        with ThreadPoolExecutor(3) as pool:
            codes = list(pool.map(call, ["good-a", "poison-b", "good-c"], [good, poison, good]))
        assert codes == [grpc.StatusCode.INTERNAL] * 3  # one batch, one failure
        line = next(x for x in srv.log().splitlines() if "inference failed on a batch" in x)
        assert "model fragile version 1" in line and "batch of 3 images" in line
        assert "requests good-a, good-c, poison-b" in line
        with ThreadPoolExecutor(3) as pool:  # the next batch runs
            codes = list(pool.map(call, ["a", "b", "c"], [good] * 3))
        assert codes == [grpc.StatusCode.OK] * 3
        assert srv.metric("visionserve_batch_size_sum", model="fragile") == 3
    finally:
        srv.stop()


# --- shutdown ---------------------------------------------------------------------------------

class Load:
    """``clients`` threads calling Classify back to back, each until the server refuses it;
    every outcome is recorded."""

    def __init__(self, srv, model: str, image: pb.Image, clients: int) -> None:
        self.srv, self.codes = srv, Counter[str]()
        self._request = pb.ClassifyRequest(model=model, images=[image])
        self._lock = threading.Lock()
        self._threads = [threading.Thread(target=self._loop) for _ in range(clients)]
        for t in self._threads:
            t.start()

    def _loop(self) -> None:
        while True:
            try:
                self.srv.stub.Classify(self._request, timeout=120)
                code = "OK"
            except grpc.RpcError as err:
                code = err.code().name
            with self._lock:
                self.codes[code] += 1
            if code != "OK":
                return

    def join(self) -> Counter[str]:
        for t in self._threads:
            t.join(timeout=180)
        return self.codes


def accepted(log: str) -> Counter[str]:
    """Requests the server answered, by code, from its access log (UNAVAILABLE: refused while
    shutting down)."""
    return Counter(re.findall(r"Classify model=\S+ version=\S+ code=(\w+)", log))


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_a_signal_under_load_answers_every_accepted_request_then_exits(exported_repo, tmp_path,
                                                                        sig):
    repo = make_repo(exported_repo, tmp_path / "repo", ("mobilenet_v3_small",),
                     {"mobilenet_v3_small": {"max_batch_size": 8}})
    srv = start_server(repo, tmp_path / "server.log", "--access-log", "all",
                       "--shutdown-delay-s", "2", "--shutdown-grace-s", "60")
    health = health_pb2_grpc.HealthStub(srv.channel)
    try:
        load = Load(srv, "mobilenet_v3_small", tensor_image(np.zeros((224, 224, 3), np.uint8)),
                    16)
        eventually(lambda: load.codes["OK"] >= 32, "the load's first answers")  # under load
        srv.process.send_signal(sig)
        eventually(lambda: health.Check(health_pb2.HealthCheckRequest(), timeout=5).status
                   == health_pb2.HealthCheckResponse.NOT_SERVING, "readiness off")
        codes = load.join()
        assert srv.process.wait(timeout=90) == 0
    finally:
        srv.stop()
    log = srv.log()
    # readiness went off first while requests were still served (the 2 s delay), then new
    # calls were refused with UNAVAILABLE, and every request the server accepted was answered
    during_delay = log.split("readiness is off")[1].split("now refusing new calls")[0]
    assert accepted(during_delay)["OK"] > 0
    assert set(codes) == {"OK", "UNAVAILABLE"}, codes
    assert codes["UNAVAILABLE"] == 16
    assert accepted(log) == Counter({"OK": codes["OK"], "UNAVAILABLE": 16}), (accepted(log),
                                                                              codes)
    assert codes["OK"] > 16
    assert f"{sig.name} received" in log and "stopped" in log
    print(json.dumps({"signal": sig.name, "client": dict(codes),  # noqa: T201 - for the note
                      "server_access_log": dict(accepted(log)),
                      "answered_ok_during_delay": accepted(during_delay)["OK"]}))


@contextmanager
def a_long_request_in_flight(exported_repo, tmp_path, grace_s: str):
    """A server (grace ``grace_s``) computing a 200-image request at batch 1: yields the server
    and the request's future; the server is stopped afterwards whatever happened."""
    repo = make_repo(exported_repo, tmp_path / "repo", ("resnet18",),
                     {"resnet18": {"max_batch_size": 1}})
    srv = start_server(repo, tmp_path / "server.log", "--shutdown-grace-s", grace_s)
    x = tensor_image(np.zeros((224, 224, 3), np.uint8))
    with ThreadPoolExecutor(1) as pool:
        try:
            slow = pool.submit(srv.stub.Classify, pb.ClassifyRequest(
                model="resnet18", images=[x] * 200), timeout=300)
            eventually(lambda: srv.metric("visionserve_inflight_requests", method="Classify") > 0,
                       "the 200-image request in flight")
            yield srv, slow
        finally:
            srv.stop()


def test_exit_within_the_grace_period_cuts_what_is_still_running(exported_repo, tmp_path):
    """A clock is the subject here: the 1 s grace. That the request was still running when it
    ended is no bet on compute speed but read from the server's log."""
    with a_long_request_in_flight(exported_repo, tmp_path, "1") as (srv, slow):
        srv.process.send_signal(signal.SIGTERM)
        assert srv.process.wait(timeout=30) == 0  # a hang guard, not a timing
    with pytest.raises(grpc.RpcError) as info:
        slow.result()
    assert info.value.code() in (grpc.StatusCode.CANCELLED, grpc.StatusCode.UNAVAILABLE)
    assert "requests still running after the 1 s grace are cancelled" in srv.log()


def test_a_second_signal_exits_at_once(exported_repo, tmp_path):
    with a_long_request_in_flight(exported_repo, tmp_path, "600") as (srv, slow):
        srv.process.send_signal(signal.SIGTERM)
        eventually(lambda: "shutting down" in srv.log(), "the first signal's shutdown")
        srv.process.send_signal(signal.SIGTERM)
        assert srv.process.wait(timeout=30) == 128 + signal.SIGTERM
    with pytest.raises(grpc.RpcError):
        slow.result()
    assert "second SIGTERM during shutdown: exiting now" in srv.log()


# --- cancellation and deadline storm ----------------------------------------------------------

def test_a_storm_of_cancellations_and_short_deadlines_computes_none_of_them(exported_repo,
                                                                            tmp_path):
    repo = make_repo(exported_repo, tmp_path / "repo", ("resnet18",), {"resnet18": {
        "max_batch_size": 1,
        # admit the short deadlines (see the next test) to show that the queue drops them
        "batching.reject_unreachable_deadlines": False}})
    # ... and the whole storm in flight at once, past the default in-flight limit, on one
    # connection: past its default 256 streams too (more would wait in the client)
    srv = start_server(repo, tmp_path / "server.log", "--max-inflight-requests", "1000",
                       "--max-streams-per-connection", "1000")
    x = tensor_image(np.zeros((224, 224, 3), np.uint8))
    one = pb.ClassifyRequest(model="resnet18", images=[x])
    rss_before = rss_mb(srv.process.pid)
    try:
        # 30 images at batch 1 occupy the model for a while; everything behind them waits
        busy = srv.stub.Classify.future(pb.ClassifyRequest(model="resnet18", images=[x] * 30),
                                        timeout=300)
        eventually(lambda: srv.metric("visionserve_queue_depth", model="resnet18") > 0,
                   "the busy request to queue", interval=0.005)
        cancelled = [srv.stub.Classify.future(one, timeout=120) for _ in range(150)]

        def all_held() -> bool:
            assert not busy.done(), "the busy request ended before the storm was held"
            return srv.metric("visionserve_inflight_requests") >= 1 + len(cancelled)

        # cancelled only once the server holds them all (queued behind the busy request), so
        # the batcher, not the transport, is what drops them: an event, no race on a sleep
        eventually(all_held, "the server to hold every cancellable request", interval=0.005)
        # the short deadlines (5-55 ms: a clock, the subject) pass while the busy request's
        # images still queued ahead of them compute (23 of its 30 here, measured)
        ahead = srv.metric("visionserve_queue_depth", model="resnet18") - len(cancelled)
        short = [srv.stub.Classify.future(one, timeout=0.005 + 0.001 * (i % 50))
                 for i in range(150)]
        for f in cancelled:
            f.cancel()
        codes = Counter(_code(f) for f in short + cancelled)
        assert len(busy.result().results) == 30
        assert codes == Counter({"DEADLINE_EXCEEDED": 150, "CANCELLED": 150}), (codes, ahead)
        # the server proves it: the images it computed are exactly the 30 answered, while it
        # counted the dropped ones by reason; queue and in-flight gauges are back to zero
        eventually(lambda: srv.metric("visionserve_queue_depth", model="resnet18") == 0,
                   "an empty queue")
        eventually(lambda: srv.metric("visionserve_inflight_requests") == 0, "no call in flight")
        assert srv.metric("visionserve_batch_size_sum", model="resnet18") == 30
        dropped = {r: srv.metric("visionserve_requests_expired_total", model="resnet18",
                                 reason=r) for r in ("deadline", "cancelled")}
        # which reason counts a short-deadline request (its deadline seen by the batcher, or
        # the transport cancelling the call first) is a race; that none was computed is not
        assert dropped["cancelled"] > 0 and 0 < dropped["deadline"] + dropped["cancelled"] <= 300, \
            dropped
        assert len(srv.stub.Classify(one, timeout=30).results) == 1
        assert srv.metric("visionserve_batch_size_sum", model="resnet18") == 31
        # 300 requests of 150 KB were held at once; what must not happen is growth beyond that
        assert rss_mb(srv.process.pid) - rss_before < 200
    finally:
        srv.stop()


def test_a_deadline_the_queue_cannot_meet_is_refused_at_once(exported_repo, tmp_path):
    """The deadline is a clock (the subject): it is set from the server's own compute rate, a
    third of what the images queued ahead need, not a fixed 100 ms raced against compute."""
    repo = make_repo(exported_repo, tmp_path / "repo", ("resnet18",),
                     {"resnet18": {"max_batch_size": 1}})
    srv = start_server(repo, tmp_path / "server.log")
    x = tensor_image(np.zeros((224, 224, 3), np.uint8))
    one = pb.ClassifyRequest(model="resnet18", images=[x])
    try:
        srv.stub.Classify(one, timeout=30)  # the batcher learns the compute rate
        per_image_s = (srv.metric("visionserve_compute_duration_seconds_sum", model="resnet18")
                       / srv.metric("visionserve_batch_size_sum", model="resnet18"))
        busy = srv.stub.Classify.future(pb.ClassifyRequest(model="resnet18", images=[x] * 30),
                                        timeout=300)
        queued = eventually(lambda: (n := srv.metric("visionserve_queue_depth",
                                                     model="resnet18")) >= 20 and n,
                            "the busy request to queue", interval=0.005)
        timeout = queued * per_image_s / 3
        with pytest.raises(grpc.RpcError) as info:
            srv.stub.Classify(one, timeout=timeout)
        assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, \
            (info.value.details(), queued, per_image_s)
        assert "model resnet18 version 1: overloaded for this deadline" in info.value.details()
        assert "refused now rather than dropped later" in info.value.details()
        late = srv.stub.Classify.future(one, timeout=120)  # a deadline it can meet: admitted
        assert len(busy.result().results) == 30 and len(late.result().results) == 1
        assert srv.metric("visionserve_requests_rejected_total", model="resnet18",
                          reason="deadline_unreachable") == 1
        assert srv.metric("visionserve_batch_size_sum", model="resnet18") == 32
    finally:
        srv.stop()


def _code(future) -> str:
    try:
        future.result()
    except grpc.FutureCancelledError:
        return "CANCELLED"
    except grpc.RpcError as err:
        return err.code().name
    return "OK"



# --- overload ---------------------------------------------------------------------------------

def test_over_the_inflight_limit_inference_is_refused_but_probes_still_pass(exported_repo,
                                                                            tmp_path):
    repo = make_repo(exported_repo, tmp_path / "repo", ("resnet18",),
                     {"resnet18": {"max_batch_size": 1}})
    srv = start_server(repo, tmp_path / "server.log", "--max-inflight-requests", "2")
    x = tensor_image(np.zeros((224, 224, 3), np.uint8))
    try:
        busy = [srv.stub.Classify.future(pb.ClassifyRequest(model="resnet18", images=[x] * 20),
                                         timeout=300) for _ in range(2)]
        eventually(lambda: srv.metric("visionserve_inflight_requests", method="Classify") == 2,
                   "both busy requests in flight")
        with pytest.raises(grpc.RpcError) as info:
            srv.stub.Classify(pb.ClassifyRequest(model="resnet18", images=[x]), timeout=30)
        assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "server busy: 2 inference requests are in progress" in info.value.details()
        health = health_pb2_grpc.HealthStub(srv.channel)
        assert health.Check(health_pb2.HealthCheckRequest(), timeout=5).status == \
            health_pb2.HealthCheckResponse.SERVING
        assert srv.stub.ListModels(pb.ListModelsRequest(), timeout=5).models
        assert all(len(f.result().results) == 20 for f in busy)
        assert len(srv.stub.Classify(pb.ClassifyRequest(model="resnet18", images=[x]),
                                     timeout=30).results) == 1
    finally:
        srv.stop()


@pytest.mark.slow
def test_twice_the_capacity_is_shed_quickly_with_bounded_queue_and_memory(exported_repo,
                                                                          tmp_path):
    """`visionserve bench-overload` for a few seconds: the figures themselves (docs/
    benchmarks.md) are measured, not asserted; the invariants are."""
    out = tmp_path / "overload.json"
    result = run_cli("bench-overload", "--model", "mobilenet_v3_small", "--repo",
                     str(exported_repo), "--duration-s", "6", "--calm-s", "3",
                     "--set", "batching.max_queue_size=256", "--json", str(out))
    assert result.returncode == 0, result.stderr[-3000:]
    phases = {p["phase"]: p for p in json.loads(out.read_text())["phases"]}
    overload = phases["overload"]
    assert set(overload["error_codes"]) == {"RESOURCE_EXHAUSTED"}, overload["error_examples"]
    assert overload["requests"] > 0  # admitted work kept flowing
    assert overload["max_queue_images"] <= 256
    assert overload["rss_max_mb"] < 2000
    assert phases["before"]["errors"] == 0 and phases["after"]["errors"] == 0  # recovered
