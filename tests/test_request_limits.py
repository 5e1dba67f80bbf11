"""One request cannot make the server do unbounded work (issue 16), through the public gRPC APIs of
a real server process, where what only the process shows is measured: its RSS and threads
while each class of hostile input gets a clear status at once (an output named thousands of
times, repeated fields over their limit, every request of `visionserve bench-attacks`), the
replies a stream client that never reads can make it hold, and the exit codes of limits that
could never admit a request.

The refusals that need no process (outputs named twice, raw and typed contents together,
client strings never echoed unbounded, the per-request pixel budget, the deadline checked
between decodes, the full decode queue) moved to tests/inprocess/test_wire_limits.py."""

from __future__ import annotations

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from tritonclient.grpc import service_pb2 as kpb
from tritonclient.grpc import service_pb2_grpc as kpb_grpc

from conftest import encode, eventually, make_repo, photo, run_cli, start_server
from visionserve.bench.attacks import ATTACKS, send
from visionserve.bench.launch import Launched, rss_mb
from visionserve.service.format.model_config import InputSpec
from visionserve.service.format.model_format import EMBEDDING, INPUT, LOGITS

LENET_X = np.zeros((1, 1, 32, 32), np.float32)


@pytest.fixture(scope="module")
def srv(exported_repo, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("limits")
    server = start_server(make_repo(exported_repo, tmp / "repo", ("lenet5", "resnet18")),
                          tmp / "server.log", "--max-stream-inflight", "4")
    yield server
    server.stop()


def kserve(srv) -> kpb_grpc.GRPCInferenceServiceStub:
    return kpb_grpc.GRPCInferenceServiceStub(srv.channel)


def lenet_request(**fields: object) -> kpb.ModelInferRequest:
    request = kpb.ModelInferRequest(model_name="lenet5", inputs=[
        kpb.ModelInferRequest.InferInputTensor(name=INPUT, datatype="FP32", shape=[1, 1, 32, 32])],
        raw_input_contents=[LENET_X.tobytes()])
    for key, value in fields.items():
        getattr(request, key).extend(value)
    return request


def refused(call, request) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as info:
        call(request, timeout=30)
    return info.value


def healthy(srv) -> bool:
    health = health_pb2_grpc.HealthStub(srv.channel)
    return health.Check(health_pb2.HealthCheckRequest(), timeout=5).status == \
        health_pb2.HealthCheckResponse.SERVING


def test_an_output_named_thousands_of_times_is_refused_before_any_work(srv):
    request = lenet_request(outputs=[kpb.ModelInferRequest.InferRequestedOutputTensor(
        name=EMBEDDING)] * 5000)
    rss_before = rss_mb(srv.process.pid)
    err = refused(kserve(srv).ModelInfer, request)
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "model lenet5: outputs: more than 16 entries" in err.details()
    # the 64 MiB message itself may be held twice (gRPC's buffer, Python's bytes); parsed, its
    # 33.5 million entries would take gigabytes
    assert rss_mb(srv.process.pid) - rss_before < 256
    assert healthy(srv)
    # within the wire's bound, the core still refuses more names than the model has outputs
    three = lenet_request(outputs=[kpb.ModelInferRequest.InferRequestedOutputTensor(
        name=EMBEDDING)] * 3)
    err = refused(kserve(srv).ModelInfer, three)
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "model lenet5 version 1: 3 outputs requested; the model has 2" in err.details()


def stream_requests(n: int, image: bytes):
    for i in range(n):
        yield kpb.ModelInferRequest(
            model_name="resnet18", id=str(i),
            inputs=[kpb.ModelInferRequest.InferInputTensor(name=INPUT, datatype="BYTES",
                                                           shape=[1])],
            outputs=[kpb.ModelInferRequest.InferRequestedOutputTensor(name=EMBEDDING),
                     kpb.ModelInferRequest.InferRequestedOutputTensor(name=LOGITS)],
            raw_input_contents=[len(image).to_bytes(4, "little") + image])


def answered(srv) -> float:
    return srv.metric("visionserve_request_duration_seconds_count", method="ModelStreamInfer")


@pytest.mark.slow  # an export or `export --list` process: `make test` runs it
def test_a_stream_client_that_never_reads_holds_a_bounded_number_of_replies(srv):
    """600 requests whose replies (ResNet-18 logits and embedding, 6 KB each) the client does
    not read: the server stops reading the stream at its bound instead of answering them all
    into memory; once the client reads, every request is answered exactly once."""
    image = encode(photo("chelsea")[::8, ::8])
    n = 600
    before = answered(srv)
    # no BDP probing: the client's receive window stays at 64 KB, so what is not yet read is
    # held by the server, not by this client's transport (the server's memory is what counts)
    channel = grpc.insecure_channel(srv.address, options=[("grpc.http2.bdp_probe", 0)])
    replies = kpb_grpc.GRPCInferenceServiceStub(channel).ModelStreamInfer(
        stream_requests(n, image), timeout=600)
    # the server works until its bound and the transport's buffers are full, then stops. That
    # it stopped is a claim only a clock can make (no event says "nothing more will happen"):
    # the count of answers stays the same over a second (the polling interval)
    settled: list[float] = []

    def stopped_moving() -> bool:
        settled.append(answered(srv) - before)
        return len(settled) > 1 and settled[-1] == settled[-2] and settled[-1] > 0

    eventually(stopped_moving, "the stream's work to stop while nobody reads", timeout=120,
               interval=1.0)
    assert settled[-1] < n / 2, f"the server answered {settled[-1]} of {n} unread requests"
    assert healthy(srv)
    ids = []
    for reply in replies:
        assert reply.error_message == ""
        ids.append(reply.infer_response.id)
        assert [o.name for o in reply.infer_response.outputs] == [EMBEDDING, LOGITS]
    assert sorted(ids, key=int) == [str(i) for i in range(n)]
    channel.close()


def test_a_stream_bound_below_one_is_refused_at_start(tmp_path):
    result = run_cli("serve", "--repo", str(tmp_path), "--max-stream-inflight", "0")
    assert result.returncode == 2
    assert "--max-stream-inflight must be >= 1, got 0" in result.stderr


def raw_call(srv, method: str):
    """A unary call that sends bytes as they are (no client-side protobuf)."""
    channel = grpc.insecure_channel(srv.address, options=[
        ("grpc.max_send_message_length", 65 * 1024 * 1024)])
    return channel, channel.unary_unary(method, request_serializer=None,
                                        response_deserializer=None)


@pytest.mark.parametrize(("method", "body", "field"), [
    # 64 MiB: the model name, then 33.5 million empty images
    ("/visionserve.v1.VisionService/Classify",
     b"\n\x08resnet18" + b"\x1a\x00" * (32 * 1024 * 1024 - 8), "images"),
    # one BYTES input of a million empty elements (2 MB)
    ("/inference.GRPCInferenceService/ModelInfer",
     kpb.ModelInferRequest(model_name="resnet18", inputs=[
         kpb.ModelInferRequest.InferInputTensor(
             name=INPUT, datatype="BYTES", shape=[1],
             contents=kpb.InferTensorContents(bytes_contents=[b""] * 1_000_000))])
     .SerializeToString(), "contents.bytes_contents"),
])
def test_a_repeated_field_over_its_limit_is_refused_before_parsing(srv, method, body, field):
    channel, call = raw_call(srv, method)
    rss_before = rss_mb(srv.process.pid)
    with pytest.raises(grpc.RpcError) as info:
        call(body, timeout=60)
    assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert f"model resnet18: {field}: more than 256 entries" in info.value.details()
    # the message is held at most twice (gRPC's buffer, Python's bytes): 64 MiB each; parsed,
    # 33.5 million images would take gigabytes
    assert rss_mb(srv.process.pid) - rss_before < 200
    channel.close()
    assert healthy(srv)  # its 5 s deadline is the bound against a stalled loop


@pytest.mark.parametrize(("flags", "message"), [
    (("--max-request-pixels", "1000"), "--max-request-pixels 1000 is below --max-image-pixels"),
    (("--max-decode-queue-pixels", "1000"),
     "--max-decode-queue-pixels 1000 is below --max-request-pixels"),
])
def test_pixel_budgets_that_could_never_admit_an_image_are_refused_at_start(tmp_path, flags,
                                                                            message):
    result = run_cli("serve", "--repo", str(tmp_path), *flags)
    assert result.returncode == 2
    assert message in result.stderr


# --- every class at once, measured -------------------------------------------------------------

@pytest.mark.parametrize("attack", ATTACKS, ids=lambda a: f"{a.name}: {a.sent}")
def test_each_class_of_hostile_request_gets_its_status_with_memory_and_health_bounded(srv,
                                                                                      attack):
    """The requests of `visionserve bench-attacks` (docs/security.md's table): each gets its
    status; the server keeps answering health checks meanwhile and holds no memory after."""
    spec = InputSpec()  # resnet18's input
    outcome = send(Launched("srv", srv.process, srv.log_path, srv.grpc_port), attack,
                   "resnet18", spec)
    assert outcome.code == attack.expected.name, outcome.details
    # each probe's own deadline (10 s) is the bound against a stalled loop: one missed counts
    cost = outcome.cost
    assert cost.probe_failures == 0
    assert cost.rss_after_mb - cost.rss_before_mb < 100
    assert cost.threads_after <= cost.threads_before + 2  # decode threads start lazily
    assert srv.process.poll() is None
