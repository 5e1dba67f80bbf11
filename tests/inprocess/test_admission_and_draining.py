"""Admission and the graceful drain, decided by events rather than clocks: the fake engine holds
a batch until the test releases it, so "while a request is computing" is a state the test
waits for, not a window it hopes to hit. (Signals and exit codes, which only a process shows,
stay in tests/test_reliability.py and tests/test_server_process.py.)"""

from __future__ import annotations

from concurrent.futures import Future, ThreadPoolExecutor

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from conftest import eventually, tensor_image
from visionserve.v1 import visionserve_pb2 as pb

GOOD = pb.ClassifyRequest(model="lenet5", images=[tensor_image(np.zeros((1, 32, 32),
                                                                        np.float32))])


def code_of(call, request, **kw) -> tuple[grpc.StatusCode, str]:
    try:
        call(request, **kw)
    except grpc.RpcError as err:
        return err.code(), err.details()
    return grpc.StatusCode.OK, ""


def computing(srv, pool: ThreadPoolExecutor, request: pb.ClassifyRequest = GOOD) -> Future:
    """Start ``request`` and return once its batch is inside the (held) engine."""
    srv.engines.hold(request.model)
    held = srv.engines.waiting(request.model)
    future = pool.submit(srv.stub.Classify, request, timeout=120)
    eventually(lambda: srv.engines.waiting(request.model) > held, "the request computing")
    return future


def health(srv) -> int:
    return health_pb2_grpc.HealthStub(srv.channel).Check(
        health_pb2.HealthCheckRequest(service=""), timeout=10).status


def test_past_max_inflight_requests_inference_is_refused_but_metadata_and_health_pass(
        server_factory):
    srv = server_factory(("lenet5",), None, "--max-inflight-requests", "1")
    with ThreadPoolExecutor(2) as pool:
        first = computing(srv, pool)
        code, details = code_of(srv.stub.Classify, GOOD, timeout=30)
        assert code == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "server busy: 1 inference requests are in progress" in details
        assert "--max-inflight-requests" in details
        assert srv.stub.GetModel(pb.GetModelRequest(model="lenet5")).state == \
            pb.MODEL_STATE_READY
        assert health(srv) == health_pb2.HealthCheckResponse.SERVING
        srv.engines.release("lenet5")
        assert len(first.result(60).results) == 1
    assert code_of(srv.stub.Classify, GOOD, timeout=30)[0] == grpc.StatusCode.OK
    assert srv.metric("visionserve_request_duration_seconds_count", model="lenet5",
                      code="RESOURCE_EXHAUSTED") == 1


def test_a_shutdown_finishes_accepted_requests_and_refuses_new_ones_unavailable(server):
    with ThreadPoolExecutor(1) as pool:
        accepted = computing(server, pool)
        server.begin_stop()
        # readiness goes first, then new calls are refused with a status that says to retry
        eventually(lambda: code_of(server.stub.Classify, GOOD, timeout=30)[0]
                   == grpc.StatusCode.UNAVAILABLE, "new calls refused")
        code, details = code_of(server.stub.Classify, GOOD, timeout=30)
        assert "the server is shutting down and takes no new requests; retry" in details
        assert server.alive() and not accepted.done()  # still draining: it waits for this one
        server.engines.release("lenet5")
        assert len(accepted.result(60).results) == 1  # the accepted request is answered
    assert server.wait_stopped(60)
    # engines are released only after the drain, every loaded one
    assert sorted(server.engines.closed) == sorted(server.engines.loaded)
    assert "stopped" in server.log()


def test_readiness_is_off_during_the_shutdown_delay_while_calls_are_still_served(
        server_factory):
    srv = server_factory(("lenet5",), None, "--shutdown-delay-s", "600")
    with ThreadPoolExecutor(1) as pool:
        accepted = computing(srv, pool)
        srv.begin_stop()
        # the server is in its delay (600 s: it ends when the test says): readiness is off...
        eventually(lambda: health(srv) == health_pb2.HealthCheckResponse.NOT_SERVING,
                   "readiness off")
        assert "still serving for 600.0 s (--shutdown-delay-s)" in srv.log()
        # ...and a load balancer that has not caught up yet is still answered
        srv.engines.release("lenet5")
        assert code_of(srv.stub.Classify, GOOD, timeout=30)[0] == grpc.StatusCode.OK
        assert len(accepted.result(60).results) == 1
        srv.end_shutdown_delay()
    assert srv.wait_stopped(60)


def test_an_engine_fault_fails_its_batch_internal_without_a_traceback_and_the_next_runs(
        server):
    server.engines.fail("lenet5")
    code, details = code_of(server.stub.Classify, GOOD, timeout=30)
    assert code == grpc.StatusCode.INTERNAL
    assert "model lenet5 version 1" in details
    assert "Traceback" not in details and ".py" not in details
    assert "fake engine fault" not in details  # the engine's own words stay in the log
    line = next(x for x in server.log().splitlines() if "inference failed on a batch" in x)
    assert "model lenet5 version 1" in line
    server.engines.fail("lenet5", False)
    assert code_of(server.stub.Classify, GOOD, timeout=30)[0] == grpc.StatusCode.OK


@pytest.mark.parametrize("name", ["../lenet5", "a/b", "..", "x" * 300, "bad\nname"])
def test_a_model_name_that_cannot_name_a_folder_is_invalid_argument(server, name):
    code, details = code_of(server.stub.Classify, pb.ClassifyRequest(
        model=name, images=GOOD.images), timeout=30)
    assert code == grpc.StatusCode.INVALID_ARGUMENT
    assert "is not a model name" in details and "\n" not in details
