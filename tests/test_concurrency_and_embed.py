"""Concurrent clients batch together and each gets its own answer; Embed returns the model's
embedding output."""

from __future__ import annotations

import numpy as np

from conftest import OrtReference, embeddings, encode, photo, softmax, tensor_image
from visionserve.v1 import visionserve_pb2 as pb


def test_32_concurrent_classify_calls_each_get_their_own_result_and_batch_together(
        server_factory, exported_repo):
    # the instance waits for 32 images, so the 32 calls batch together whenever they arrive:
    # an event, not a race of their arrival against compute (the minute only bounds the wait;
    # no golden check: its own batches, through the same batcher, would wait as long)
    server = server_factory(("resnet18",), {"resnet18": {
        "batching.preferred_batch_sizes": [32], "batching.max_queue_delay_ms": 60_000.0}},
        "--golden-check", "off")
    engine = OrtReference(exported_repo / "resnet18" / "1" / "model.onnx")
    rng = np.random.default_rng(32)
    inputs = [rng.standard_normal((3, 224, 224), dtype=np.float32) for _ in range(32)]
    batches_before = server.metric("visionserve_batch_size_count", model="resnet18")
    images_before = server.metric("visionserve_batch_size_sum", model="resnet18")
    calls = [server.stub.Classify.future(pb.ClassifyRequest(
        model="resnet18", images=[tensor_image(x)], top_k=5, request_id=f"r{i}"), timeout=120)
        for i, x in enumerate(inputs)]
    replies = [c.result() for c in calls]
    for i, (x, reply) in enumerate(zip(inputs, replies, strict=True)):
        assert reply.request_id == f"r{i}"
        probs = softmax(engine(x[None])[0][0])
        expected = np.argsort(-probs)[:5]
        assert [c.index for c in reply.results[0].classes] == list(expected), i
        np.testing.assert_allclose([c.score for c in reply.results[0].classes],
                                   probs[expected], rtol=1e-4, atol=1e-6)
    batches = server.metric("visionserve_batch_size_count", model="resnet18") - batches_before
    images = server.metric("visionserve_batch_size_sum", model="resnet18") - images_before
    assert images == 32
    assert batches == 1, "the concurrent requests were not batched together"


def test_several_images_in_one_request_come_back_in_order(server, exported_repo):
    engine = OrtReference(exported_repo / "mobilenet_v3_small" / "1" / "model.onnx")
    rng = np.random.default_rng(5)
    batch = rng.standard_normal((5, 3, 224, 224), dtype=np.float32)
    reply = server.stub.Embed(pb.EmbedRequest(model="mobilenet_v3_small",
                                              images=[tensor_image(x) for x in batch]))
    np.testing.assert_allclose(embeddings(reply), engine(batch)[1], rtol=1e-4, atol=1e-6)


def test_embed_has_the_model_dimension_and_equals_the_in_process_embedding(server,
                                                                          exported_repo):
    engine = OrtReference(exported_repo / "resnet18" / "1" / "model.onnx")
    rng = np.random.default_rng(3)
    x = rng.standard_normal((2, 3, 224, 224), dtype=np.float32)
    reply = server.stub.Embed(pb.EmbedRequest(
        model="resnet18", images=[tensor_image(v) for v in x], request_id="e1"))
    assert (reply.model, reply.version, reply.request_id) == ("resnet18", 1, "e1")
    assert list(reply.embeddings.shape) == [2, 512]
    assert reply.embeddings.dtype == pb.DTYPE_FLOAT32
    np.testing.assert_allclose(embeddings(reply), engine(x)[1], rtol=1e-4, atol=1e-6)


def test_embed_normalize_gives_unit_vectors_in_the_same_direction(server):
    images = [pb.Image(encoded=encode(photo(n))) for n in ("chelsea", "coffee")]
    raw = embeddings(server.stub.Embed(pb.EmbedRequest(model="mobilenet_v3_small",
                                                       images=images)))
    unit = embeddings(server.stub.Embed(pb.EmbedRequest(model="mobilenet_v3_small",
                                                        images=images, normalize=True)))
    assert unit.shape == (2, 1024)
    np.testing.assert_allclose(np.linalg.norm(unit, axis=1), 1.0, rtol=1e-5)
    np.testing.assert_allclose(unit, raw / np.linalg.norm(raw, axis=1, keepdims=True),
                               rtol=1e-5, atol=1e-7)
