"""One request cannot make the server do unbounded work (issue 16), through the public gRPC APIs
of the whole server running in this process on the fake engine: requested outputs named twice,
raw and typed contents together, client strings never echoed unbounded, and the decode budgets
(per request, from the headers; the deadline checked between images; the server-wide decode
queue), each answered with a clear status at once while good requests keep their answers.

Decoding is real (Pillow, in the server's decode pool). Where a test needs "while a request's
images are in the decode queue" or "once its deadline has passed between two images", the
decode pool is held at a gate (patched in this process, where the server runs: an image's
decode held in the pool's thread, or an admitted request held before its first image) until
the test opens it, so those are states the test waits for, not windows it hopes to hit.

Moved from tests/test_request_limits.py, which keeps what only the server process shows: its
RSS and threads under each attack, under an output named thousands of times and under repeated
fields over their limit, the memory a never-reading stream client costs, and the exit codes of
bad flags.
"""

from __future__ import annotations

import asyncio
import functools
import re
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import grpc
import numpy as np
import pytest
from fakes.engine import HOLD_LIMIT_S

from conftest import encode, eventually
from visionserve.inference import grpc_service_pb2 as kpb
from visionserve.inference import grpc_service_pb2_grpc as kpb_grpc
from visionserve.service.engine.decode_pool import DecodePool
from visionserve.service.engine.preprocess import Preprocessor
from visionserve.service.format.model_format import EMBEDDING, INPUT, LOGITS
from visionserve.v1 import visionserve_pb2 as pb

LENET_X = np.zeros((1, 1, 32, 32), np.float32)


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


def test_an_output_named_twice_is_refused_and_each_output_once_is_answered(server):
    twice = lenet_request(outputs=[kpb.ModelInferRequest.InferRequestedOutputTensor(
        name=LOGITS)] * 2)
    err = refused(kserve(server).ModelInfer, twice)
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert f"output '{LOGITS}' is requested twice" in err.details()
    both = lenet_request(outputs=[kpb.ModelInferRequest.InferRequestedOutputTensor(name=n)
                                  for n in (LOGITS, EMBEDDING)])
    reply = kserve(server).ModelInfer(both, timeout=30)
    assert [o.name for o in reply.outputs] == [LOGITS, EMBEDDING]


def test_raw_and_typed_contents_together_are_refused_as_the_protocol_says(server):
    request = lenet_request()
    request.inputs[0].contents.fp32_contents.extend([0.0] * 1024)
    err = refused(kserve(server).ModelInfer, request)
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "typed contents while the request uses raw_input_contents" in err.details()
    assert f"input '{INPUT}'" in err.details() and "model lenet5" in err.details()


@pytest.mark.parametrize("name", ["é" * 20_000, "\U0001F600" * 20_000, "x" * 100_000])
def test_client_strings_are_never_echoed_unbounded_and_the_status_arrives(server, name):
    """A multibyte name must not push the status past the client's metadata limit (the client
    would see a transport error instead of our INVALID_ARGUMENT)."""
    request = lenet_request()
    request.inputs[0].name = name
    request.outputs.add(name=name)
    err = refused(kserve(server).ModelInfer, request)
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "model lenet5" in err.details()
    assert len(err.details().encode()) <= 1024


# --- decode cost -------------------------------------------------------------------------------
# A flat colour compresses to almost nothing: a 40 MP JPEG is 0.6 MB but a third of a second of a
# core to decode. Each is within the per-image limits; the request's total is what is bounded.

@functools.cache
def flat_jpeg(width: int, height: int) -> bytes:
    return encode(np.full((height, width, 3), 120, np.uint8), quality=10)


@pytest.fixture
def decoding(server_factory):
    """One decode thread, a 100 MP request budget and decode queue, and lenet5 with a 200 ms
    default deadline (applied to calls that set none)."""
    return server_factory(("lenet5",), {"lenet5": {"batching.default_timeout_ms": 200.0}},
                          "--preprocess-threads", "1", "--max-request-pixels", "100000000",
                          "--max-decode-queue-pixels", "100000000")


class DecodeGate:
    """The decode pool, held where the test says until ``open()``; ``deadlines`` records each
    request's deadline as the pool got it (``time.monotonic``).

    ``hold_images()``: each image's decode waits in the pool's thread (after the pool's
    deadline check), ``started`` counting the decodes begun. ``hold_admitted()``: a request whose
    pixels the decode queue has admitted waits, on the event loop, before its first image
    decodes (the pool's thread stays free for other requests' headers), ``waiting`` counting
    the requests held."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.started = 0
        self.waiting = 0
        self.deadlines: list[float | None] = []
        self._monkeypatch = monkeypatch
        self._open = threading.Event()
        self._lock = threading.Lock()
        pool_decode = DecodePool.decode

        async def recorded(pool: DecodePool, prep, images, where, deadline):
            self.deadlines.append(deadline)
            return await pool_decode(pool, prep, images, where, deadline)

        monkeypatch.setattr(DecodePool, "decode", recorded)

    def hold_images(self) -> None:
        decode = Preprocessor.decode

        def held(prep: Preprocessor, opened):
            with self._lock:
                self.started += 1
            self._open.wait(HOLD_LIMIT_S)  # a bound against a forgotten open()
            return decode(prep, opened)

        self._monkeypatch.setattr(Preprocessor, "decode", held)

    def hold_admitted(self) -> None:
        map_ = DecodePool._map

        async def held(pool: DecodePool, fn, items, where, deadline, done=None):
            if done is not None:  # the decode phase: the request's pixels are in the queue
                with self._lock:
                    self.waiting += 1
                await asyncio.to_thread(self._open.wait, HOLD_LIMIT_S)
            return await map_(pool, fn, items, where, deadline, done)

        self._monkeypatch.setattr(DecodePool, "_map", held)

    def open(self) -> None:
        self._open.set()


@pytest.fixture
def gate(decoding, monkeypatch) -> Iterator[DecodeGate]:
    """Set up after the server (patched in this process, where it runs) and opened before it
    stops."""
    held = DecodeGate(monkeypatch)
    yield held
    held.open()


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


def test_decoding_stops_between_images_once_the_deadline_has_passed(decoding, gate):
    """Five 20 MP images on one decode thread; the first one's decode is held until lenet5's
    200 ms default deadline has passed (the deadline, as the pool got it, is the event waited
    for), then the rest are never decoded. A deadline is a clock, the subject here: the test
    waits for that clock, not for decoding to be slow enough."""
    gate.hold_images()
    with ThreadPoolExecutor(1) as pool:
        answer = pool.submit(classify, decoding, [flat_jpeg(5000, 4000)] * 5, None)
        eventually(lambda: gate.started == 1, "the first image to be decoding")
        (deadline,) = gate.deadlines
        assert deadline is not None
        eventually(lambda: time.monotonic() >= deadline, "lenet5's default deadline to pass")
        gate.open()
        with pytest.raises(grpc.RpcError) as info:
            answer.result(60)
    assert info.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    started = re.search(r"decoded \((\d) of 5 started\)", info.value.details())
    assert started, info.value.details()
    assert int(started.group(1)) < 5
    assert gate.started == int(started.group(1))  # the images not started are never decoded
    assert "give it a longer deadline, or send fewer or smaller images" in info.value.details()
    eventually(lambda: decoding.metric("visionserve_decode_queue_pixels") == 0,
               "the abandoned request's pixels to leave the decode queue")


def test_a_full_decode_queue_refuses_new_work_at_once_and_serves_it_again_after(decoding, gate):
    """While one request's 100 MP wait to decode on the only thread (held, admitted to the
    queue, until the test opens the gate), the queue (100 MP) has no room for another such
    request: it is refused RESOURCE_EXHAUSTED at once rather than queued behind; the queue
    frees as images decode, and once it is empty the same request is served."""
    gate.hold_admitted()
    images = [flat_jpeg(5000, 4000)] * 5
    with ThreadPoolExecutor(1) as pool:
        first = pool.submit(classify, decoding, images)
        eventually(lambda: gate.waiting == 1, "the first request to be admitted for decoding")
        assert decoding.metric("visionserve_decode_queue_pixels") > 0
        with pytest.raises(grpc.RpcError) as info:
            classify(decoding, images)
        gate.open()
        assert len(first.result().results) == 5
    assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "would exceed its decode queue of 100000000 (--max-decode-queue-pixels); retry with " \
           "backoff" in info.value.details()
    assert decoding.metric("visionserve_decode_queue_pixels") == 0
    assert len(classify(decoding, images).results) == 5
