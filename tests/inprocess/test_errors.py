"""Bad input gets a clear status naming the model, version and field; the server keeps
serving (each error is followed by a good request that succeeds)."""

from __future__ import annotations

import threading

import grpc
import numpy as np
import pytest

from conftest import encode, eventually, photo, tensor_image
from visionserve.v1 import visionserve_pb2 as pb

GOOD = pb.ClassifyRequest(model="lenet5", images=[
    pb.Image(tensor=pb.Tensor(shape=[1, 32, 32], dtype=pb.DTYPE_UINT8, data=bytes(1024)))])


def rpc_error(call, request, **kw) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as info:
        call(request, **kw)
    return info.value


def still_serves(server) -> None:
    assert len(server.stub.Classify(GOOD, timeout=30).results) == 1


def test_unknown_model_is_not_found_and_lists_the_loaded_ones(server):
    err = rpc_error(server.stub.Classify, pb.ClassifyRequest(model="resnet999", images=[
        pb.Image(encoded=b"x")]))
    assert err.code() == grpc.StatusCode.NOT_FOUND
    assert "resnet999" in err.details() and "lenet5" in err.details()
    still_serves(server)


def test_unknown_version_is_not_found(server):
    err = rpc_error(server.stub.Classify, pb.ClassifyRequest(model="lenet5", version=7,
                                                             images=GOOD.images))
    assert err.code() == grpc.StatusCode.NOT_FOUND
    assert "lenet5 version 7" in err.details()
    still_serves(server)


def test_corrupt_image_is_invalid_argument_naming_its_index(server):
    good = pb.Image(encoded=encode(photo("coffee")))
    err = rpc_error(server.stub.Classify, pb.ClassifyRequest(
        model="resnet18", images=[good, pb.Image(encoded=b"\xff\xd8\xff\xe0 not a jpeg")]))
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "model resnet18 version 1: images[1]" in err.details()
    still_serves(server)


def test_truncated_jpeg_is_invalid_argument(server):
    data = encode(photo("coffee"))
    err = rpc_error(server.stub.Classify, pb.ClassifyRequest(
        model="resnet18", images=[pb.Image(encoded=data[: len(data) // 2])]))
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "images[0]" in err.details()
    still_serves(server)


def test_raw_tensor_of_the_wrong_shape_states_expected_and_actual(server):
    x = np.zeros((3, 224, 225), np.float32)
    err = rpc_error(server.stub.Classify, pb.ClassifyRequest(model="resnet18",
                                                             images=[tensor_image(x)]))
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "images[0].tensor has shape [3, 224, 225]" in err.details()
    assert "expected [3, 224, 224]" in err.details()
    still_serves(server)


def test_raw_tensor_whose_bytes_do_not_match_its_shape(server):
    err = rpc_error(server.stub.Classify, pb.ClassifyRequest(model="lenet5", images=[
        pb.Image(tensor=pb.Tensor(shape=[1, 32, 32], dtype=pb.DTYPE_FLOAT32, data=bytes(10)))]))
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "needs 4096" in err.details()
    still_serves(server)


def test_empty_request_and_negative_top_k_are_invalid(server):
    err = rpc_error(server.stub.Classify, pb.ClassifyRequest(model="lenet5"))
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT and "images is empty" in err.details()
    err = rpc_error(server.stub.Classify, pb.ClassifyRequest(model="lenet5", top_k=-1,
                                                             images=GOOD.images))
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT and "top_k" in err.details()
    still_serves(server)


def test_image_over_the_pixel_limit_is_rejected_before_decoding(server):
    import io

    from PIL import Image

    buf = io.BytesIO()
    Image.new("1", (10_000, 5_000)).save(buf, "PNG")  # 50 MP in a few KB: a decompression bomb
    err = rpc_error(server.stub.Classify, pb.ClassifyRequest(
        model="resnet18", images=[pb.Image(encoded=buf.getvalue())]))
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "10000x5000 = 50000000 pixels" in err.details()
    still_serves(server)


def test_message_over_the_size_limit_is_resource_exhausted(server_factory):
    srv = server_factory(("lenet5",), None, "--max-message-bytes", "1000000")
    err = rpc_error(srv.stub.Classify, pb.ClassifyRequest(model="lenet5", images=[
        pb.Image(encoded=bytes(2_000_000))]))
    assert err.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    still_serves(srv)


def _busy(srv, images: int) -> threading.Thread:
    """Occupy resnet18 (max_batch_size 1) with one request of ``images`` images: its first
    image computes in a held engine while the rest wait in the queue. ``srv.engines.release``
    lets it finish."""
    x = np.zeros((3, 224, 224), np.float32)
    request = pb.ClassifyRequest(model="resnet18", images=[tensor_image(x)] * images)
    srv.engines.hold("resnet18")
    thread = threading.Thread(target=srv.stub.Classify, args=(request,),
                              kwargs={"timeout": 300})
    thread.start()
    eventually(lambda: srv.engines.waiting("resnet18") == 1 and srv.metric(
        "visionserve_queue_depth", model="resnet18") == images - 1, "the busy request queued")
    return thread


SLOW = {"resnet18": {"max_batch_size": 1, "batching.max_queue_size": 24,
                     # requests must reach the queue to show how expired work is dropped there
                     "batching.reject_unreachable_deadlines": False}}


def test_full_queue_is_resource_exhausted(server_factory):
    srv = server_factory(("resnet18", "lenet5"), SLOW)
    x = np.zeros((3, 224, 224), np.float32)
    never_fits = pb.ClassifyRequest(model="resnet18", images=[tensor_image(x)] * 25)
    err = rpc_error(srv.stub.Classify, never_fits)
    assert err.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "can never fit the queue of 24 images" in err.details()

    busy = _busy(srv, 24)  # 23 images queued behind the one computing
    err = rpc_error(srv.stub.Classify, pb.ClassifyRequest(model="resnet18",
                                                          images=[tensor_image(x)] * 20))
    assert err.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "model resnet18 version 1: queue full" in err.details()
    srv.engines.release("resnet18")
    busy.join()
    still_serves(srv)


def test_deadline_expiring_in_the_queue_drops_the_work_before_compute(server_factory):
    srv = server_factory(("resnet18", "lenet5"), SLOW)
    x = np.ones((3, 224, 224), np.float32)
    busy = _busy(srv, 16)
    err = rpc_error(srv.stub.Classify, pb.ClassifyRequest(model="resnet18",
                                                          images=[tensor_image(x)]),
                    timeout=0.05)
    assert err.code() == grpc.StatusCode.DEADLINE_EXCEEDED  # while the engine is held
    srv.engines.release("resnet18")
    busy.join()
    # the server proves it dropped the work: the expired counter rose, and the images it
    # computed are exactly the 16 of the request that succeeded
    eventually(lambda: srv.metric("visionserve_requests_expired_total", model="resnet18"),
               "the expired request counted")
    assert srv.metric("visionserve_requests_expired_total", model="resnet18") == 1
    assert srv.metric("visionserve_batch_size_sum", model="resnet18") == 16
    assert sum(srv.engines.batches["resnet18"]) == 16 + 1  # warm-up's batch of 1, then 16
    still_serves(srv)
