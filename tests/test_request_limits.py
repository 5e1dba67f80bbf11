"""One request cannot make the server do unbounded work (issue 16), through the public gRPC APIs of
a real server process: each class of hostile input gets a clear status at once, the server's
memory stays bounded, and good requests keep their answers."""

from __future__ import annotations

import re
from concurrent.futures import ThreadPoolExecutor

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from tritonclient.grpc import service_pb2 as kpb
from tritonclient.grpc import service_pb2_grpc as kpb_grpc

from conftest import encode, eventually, make_repo, photo, run_cli, start_server
from visionserve.bench.attacks import ATTACKS, send
from visionserve.bench.launch import Launched, rss_mb
from visionserve.service.config import InputSpec
from visionserve.service.model_format import EMBEDDING, INPUT, LOGITS
from visionserve.v1 import visionserve_pb2 as pb

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
    assert rss_mb(srv.process.pid) - rss_before < 100
    assert healthy(srv)
    # within the wire's bound, the core still refuses more names than the model has outputs
    three = lenet_request(outputs=[kpb.ModelInferRequest.InferRequestedOutputTensor(
        name=EMBEDDING)] * 3)
    err = refused(kserve(srv).ModelInfer, three)
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "model lenet5 version 1: 3 outputs requested; the model has 2" in err.details()


def test_an_output_named_twice_is_refused_and_each_output_once_is_answered(srv):
    twice = lenet_request(outputs=[kpb.ModelInferRequest.InferRequestedOutputTensor(
        name=LOGITS)] * 2)
    err = refused(kserve(srv).ModelInfer, twice)
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert f"output '{LOGITS}' is requested twice" in err.details()
    both = lenet_request(outputs=[kpb.ModelInferRequest.InferRequestedOutputTensor(name=n)
                                  for n in (LOGITS, EMBEDDING)])
    reply = kserve(srv).ModelInfer(both, timeout=30)
    assert [o.name for o in reply.outputs] == [LOGITS, EMBEDDING]


def test_raw_and_typed_contents_together_are_refused_as_the_protocol_says(srv):
    request = lenet_request()
    request.inputs[0].contents.fp32_contents.extend([0.0] * 1024)
    err = refused(kserve(srv).ModelInfer, request)
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "typed contents while the request uses raw_input_contents" in err.details()
    assert f"input '{INPUT}'" in err.details() and "model lenet5" in err.details()


@pytest.mark.parametrize("name", ["é" * 20_000, "\U0001F600" * 20_000, "x" * 100_000])
def test_client_strings_are_never_echoed_unbounded_and_the_status_arrives(srv, name):
    """A multibyte name must not push the status past the client's metadata limit (the client
    would see a transport error instead of our INVALID_ARGUMENT)."""
    request = lenet_request()
    request.inputs[0].name = name
    request.outputs.add(name=name)
    err = refused(kserve(srv).ModelInfer, request)
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "model lenet5" in err.details()
    assert len(err.details().encode()) <= 1024


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
    assert rss_mb(srv.process.pid) - rss_before < 100
    channel.close()
    assert healthy(srv)  # its 5 s deadline is the bound against a stalled loop


# --- decode cost -------------------------------------------------------------------------------
# A flat colour compresses to almost nothing: a 40 MP JPEG is 0.6 MB but a third of a second of a
# core to decode. Each is within the per-image limits; the request's total is what is bounded.

def flat_jpeg(width: int, height: int) -> bytes:
    return encode(np.full((height, width, 3), 120, np.uint8), quality=10)


@pytest.fixture(scope="module")
def decoding(exported_repo, tmp_path_factory):
    """One decode thread, a 100 MP request budget and decode queue, and lenet5 with a 200 ms
    default deadline (applied to calls that set none)."""
    tmp = tmp_path_factory.mktemp("decoding")
    repo = make_repo(exported_repo, tmp / "repo", ("lenet5",),
                     {"lenet5": {"batching.default_timeout_ms": 200.0}})
    server = start_server(repo, tmp / "server.log", "--preprocess-threads", "1",
                          "--max-request-pixels", "100000000",
                          "--max-decode-queue-pixels", "100000000")
    yield server
    server.stop()


def classify(srv, images: list[bytes], timeout: float | None = 60):
    return srv.stub.Classify(pb.ClassifyRequest(model="lenet5", images=[
        pb.Image(encoded=data) for data in images]), timeout=timeout)


def test_a_request_over_its_pixel_budget_is_refused_from_the_headers(decoding):
    """Three 40 MP images (each within --max-image-pixels) are 120 MP, over the 100 MP budget.
    The last one is cut after its header: had anything been decoded, that image would have
    failed INVALID_ARGUMENT; the budget, read from the headers, speaks first."""
    image = flat_jpeg(8000, 5000)
    with pytest.raises(grpc.RpcError) as info:
        classify(decoding, [image, image, image[:2000]])
    assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert ("model lenet5 version 1: the request's 3 images decode to 120000000 pixels, over "
            "the per-request budget of 100000000 (the server's --max-request-pixels)"
            in info.value.details())
    # within the budget, the same images are decoded (and the cut one fails as itself)
    with pytest.raises(grpc.RpcError) as info:
        classify(decoding, [image, image[:2000]])
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "images[1] could not be decoded" in info.value.details()
    assert len(classify(decoding, [image, image]).results) == 2


def test_decoding_stops_between_images_once_the_deadline_has_passed(decoding):
    """Five 20 MP images on one decode thread take about a second; lenet5's 200 ms default
    deadline passes after the first one or two, and the rest are never decoded. A deadline is a
    clock, the subject here: the claim needs the four first images to take longer than 200 ms
    (80 MP: at 115 MP/s per core, 0.7 s)."""
    with pytest.raises(grpc.RpcError) as info:
        classify(decoding, [flat_jpeg(5000, 4000)] * 5, timeout=None)
    assert info.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    started = re.search(r"decoded \((\d) of 5 started\)", info.value.details())
    assert started, info.value.details()
    assert int(started.group(1)) < 5
    assert "give it a longer deadline, or send fewer or smaller images" in info.value.details()
    eventually(lambda: decoding.metric("visionserve_decode_queue_pixels") == 0,
               "the abandoned request's pixels to leave the decode queue")


def test_a_full_decode_queue_refuses_new_work_at_once_and_serves_it_again_after(decoding):
    """While one request's 100 MP decode on the only thread, the queue (100 MP) has no room for
    another such request: it is refused RESOURCE_EXHAUSTED at once rather than queued behind;
    the queue frees as images decode, and once it is empty the same request is served."""
    images = [flat_jpeg(5000, 4000)] * 5
    with ThreadPoolExecutor(1) as pool:
        first = pool.submit(classify, decoding, images)
        eventually(lambda: decoding.metric("visionserve_decode_queue_pixels") > 0,
                   "the first request to be decoding", interval=0.01)
        with pytest.raises(grpc.RpcError) as info:
            classify(decoding, images)
        assert len(first.result().results) == 5
    assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "would exceed its decode queue of 100000000 (--max-decode-queue-pixels); retry with " \
           "backoff" in info.value.details()
    assert decoding.metric("visionserve_decode_queue_pixels") == 0
    assert len(classify(decoding, images).results) == 5


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
    assert outcome.health_failures == 0
    assert outcome.rss_after_mb - outcome.rss_before_mb < 100
    assert outcome.threads_after <= outcome.threads_before + 2  # decode threads start lazily
    assert srv.process.poll() is None
