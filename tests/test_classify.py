"""Classify over real gRPC: the server's answer is what PyTorch computes on the image that
torchvision's eval transform makes, and what the in-process engine computes."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from conftest import OrtReference, encode, photo, softmax, start_server, tensor_image
from visionserve.v1 import visionserve_pb2 as pb

PHOTOS = ("chelsea", "coffee", "astronaut", "rocket")


def torchvision_tensor(pixels: np.ndarray, size: int = 224, resize: int = 256,
                       gray: bool = False) -> np.ndarray:
    """The reference transform, applied to the JPEG-decoded image as PIL gives it."""
    import io

    from PIL import Image
    from torchvision import transforms

    img = Image.open(io.BytesIO(encode(pixels))).convert("L" if gray else "RGB")
    mean, std = ((0.5,), (0.5,)) if gray else ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
    t = transforms.Compose([transforms.Resize(resize), transforms.CenterCrop(size),
                            transforms.ToTensor(), transforms.Normalize(mean, std)])
    return t(img).numpy()


def torch_model(name: str, weights: Path):  # type: ignore[no-untyped-def]
    import torch
    import torchvision

    model = getattr(torchvision.models, name)(weights=None)
    model.load_state_dict(torch.load(weights, weights_only=True))
    return model.eval()


def test_classify_jpeg_matches_pytorch_on_torchvision_preprocessing(server, weights_dir):
    """ResNet-18 with seeded torchvision weights. (A randomly initialised MobileNet v3 is no use
    here: its logits are ~1e-9, so its probabilities tie and its ranking is float noise.)"""
    import torch

    model = "resnet18"
    net = torch_model(model, weights_dir / f"{model}.pt")
    for name in PHOTOS:
        pixels = photo(name)
        reply = server.stub.Classify(pb.ClassifyRequest(
            model=model, images=[pb.Image(encoded=encode(pixels))], top_k=5, request_id=name))
        assert (reply.model, reply.version, reply.request_id) == (model, 1, name)
        with torch.no_grad():
            logits = net(torch.from_numpy(torchvision_tensor(pixels))[None]).numpy()[0]
        probs = softmax(logits.astype(np.float64))
        expected = np.argsort(-probs)[:5]
        got = reply.results[0].classes
        assert [c.index for c in got] == list(expected), name
        # ONNX Runtime vs PyTorch kernels differ in float32 rounding only (export parity:
        # relative logit difference < 1e-6 here), so probabilities agree to well under 1e-4.
        np.testing.assert_allclose([c.score for c in got], probs[expected], atol=1e-4)


def test_classify_equals_the_in_process_engine_and_labels_come_from_the_version(
        server, exported_repo):
    engine = OrtReference(exported_repo / "resnet18" / "1" / "model.onnx")
    labels = (exported_repo / "resnet18" / "1" / "labels.txt").read_text().splitlines()
    pixels = photo("coffee")
    reply = server.stub.Classify(pb.ClassifyRequest(
        model="resnet18", images=[pb.Image(encoded=encode(pixels))], top_k=10))
    logits, _ = engine(torchvision_tensor(pixels)[None])
    probs = softmax(logits[0])
    expected = np.argsort(-probs)[:10]
    assert [c.index for c in reply.results[0].classes] == list(expected)
    assert [c.label for c in reply.results[0].classes] == [labels[i] for i in expected]
    np.testing.assert_allclose([c.score for c in reply.results[0].classes], probs[expected],
                               rtol=1e-5, atol=1e-7)


def test_server_preprocessing_is_bit_identical_to_torchvision(server):
    """The encoded image and the torchvision tensor sent raw give the same embedding."""
    for name in PHOTOS:
        pixels = photo(name)
        reference = torchvision_tensor(pixels)
        reply = server.stub.Embed(pb.EmbedRequest(
            model="resnet18", images=[pb.Image(encoded=encode(pixels)), tensor_image(reference)]))
        vectors = np.frombuffer(reply.embeddings.data, "<f4").reshape(2, -1)
        assert vectors.shape[1] > 0, name  # two empty vectors would be "equal" too
        np.testing.assert_array_equal(vectors[0], vectors[1])


def test_the_opt_in_fast_decoder_agrees_with_the_exact_path_on_large_photos(server,
                                                                          server_factory):
    """`input.decoder = "fast"` decodes big JPEGs at a reduced DCT scale: not bit-identical,
    but the same prediction and (nearly) the same embedding as the exact path."""
    from PIL import Image

    fast = server_factory(("resnet18",), {"resnet18": {"input.decoder": "fast"}})
    for name in PHOTOS:
        big = np.asarray(Image.fromarray(photo(name)).resize((1920, 1080)))
        request = pb.EmbedRequest(model="resnet18", images=[pb.Image(encoded=encode(big))])
        exact_vec = np.frombuffer(server.stub.Embed(request).embeddings.data, "<f4")
        fast_vec = np.frombuffer(fast.stub.Embed(request).embeddings.data, "<f4")
        assert not np.array_equal(exact_vec, fast_vec)  # it really went the other way
        cosine = exact_vec @ fast_vec / np.linalg.norm(exact_vec) / np.linalg.norm(fast_vec)
        assert cosine > 0.99, (name, cosine)


def test_grayscale_model_takes_colour_photos_png_and_webp(server):
    from conftest import OrtReference  # noqa: F401 - same engine for the 1-channel model

    pixels = photo("astronaut")
    images = [pb.Image(encoded=encode(pixels, fmt)) for fmt in ("JPEG", "PNG", "WEBP")]
    reply = server.stub.Classify(pb.ClassifyRequest(model="lenet5", images=images, top_k=3))
    assert [len(r.classes) for r in reply.results] == [3, 3, 3]
    png = torchvision_tensor(pixels, size=32, resize=32, gray=True)  # JPEG-decoded reference
    raw = server.stub.Classify(pb.ClassifyRequest(model="lenet5", images=[tensor_image(png)],
                                                  top_k=3))
    assert [c.index for c in raw.results[0].classes] == \
        [c.index for c in reply.results[0].classes]
    for result in reply.results:
        assert [c.label for c in result.classes] == [str(c.index) for c in result.classes]


def test_exif_orientation_is_applied(server):
    from PIL import Image

    pixels = photo("chelsea")
    upright = server.stub.Embed(pb.EmbedRequest(
        model="resnet18", images=[pb.Image(encoded=encode(pixels, "PNG"))]))
    # the same photo stored rotated, with EXIF orientation 8: "turn me 90° anticlockwise"
    stored = np.ascontiguousarray(np.rot90(pixels, k=-1))  # turned clockwise
    exif = Image.Exif()
    exif[0x0112] = 8
    rotated = server.stub.Embed(pb.EmbedRequest(
        model="resnet18", images=[pb.Image(encoded=encode(stored, "PNG", exif=exif))]))
    assert upright.embeddings.data  # two empty replies would be equal too
    assert rotated.embeddings.data == upright.embeddings.data


def test_uint8_tensors_hwc_and_chw_equal_the_server_normalized_float(server):
    rng = np.random.default_rng(7)
    hwc = rng.integers(0, 256, (224, 224, 3), dtype=np.uint8)
    mean = np.array([0.485, 0.456, 0.406], np.float32)[:, None, None]
    std = np.array([0.229, 0.224, 0.225], np.float32)[:, None, None]
    chw = np.ascontiguousarray(hwc.transpose(2, 0, 1))
    as_float = ((chw.astype(np.float32) / np.float32(255)) - mean) / std
    reply = server.stub.Embed(pb.EmbedRequest(model="resnet18", images=[
        tensor_image(hwc), tensor_image(chw), tensor_image(as_float.astype(np.float32))]))
    vectors = np.frombuffer(reply.embeddings.data, "<f4").reshape(3, -1)
    assert vectors.shape[1] > 0  # three empty vectors would be equal too
    np.testing.assert_array_equal(vectors[0], vectors[1])
    np.testing.assert_array_equal(vectors[0], vectors[2])


def test_top_k_defaults_to_five_and_is_capped_at_the_class_count(server):
    image = pb.Image(encoded=encode(photo("coffee")))
    reply = server.stub.Classify(pb.ClassifyRequest(model="lenet5", images=[image]))
    assert len(reply.results[0].classes) == 5
    reply = server.stub.Classify(pb.ClassifyRequest(model="lenet5", images=[image], top_k=50))
    assert sorted(c.index for c in reply.results[0].classes) == list(range(10))
    assert sum(c.score for c in reply.results[0].classes) == pytest.approx(1.0, abs=1e-5)


def tiny_logits_model(path: Path, classes: int = 10, seed: int = 0) -> None:
    """A hand-made ONNX model on LeNet-5's input whose logits are ~1e-9: in float32, every
    softmax probability is 1/classes, while the logits still differ by percents."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(seed)
    w = numpy_helper.from_array((rng.standard_normal((1024, classes)) * 1e-10)
                                .astype(np.float32), "w")
    e = numpy_helper.from_array(rng.standard_normal((1024, 84)).astype(np.float32), "e")
    graph = helper.make_graph(
        [helper.make_node("Flatten", ["input"], ["flat"]),
         helper.make_node("MatMul", ["flat", "w"], ["logits"]),
         helper.make_node("MatMul", ["flat", "e"], ["embedding"])],
        "tiny_logits",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["N", 1, 32, 32])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", classes]),
         helper.make_tensor_value_info("embedding", TensorProto.FLOAT, ["N", 84])],
        initializer=[w, e])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save(model, str(path))


def test_top_k_follows_the_engine_when_probabilities_tie_in_float32(exported_repo, tmp_path):
    """A hand-made version (LeNet-5's config and labels, a model whose logits are ~1e-9):
    Classify ranks on the logits, as the engine does, and reports the (tied) probabilities."""
    import shutil

    made = tmp_path / "made"
    shutil.copytree(exported_repo / "lenet5", made / "tiny_logits")
    version = made / "tiny_logits" / "1"
    (version / "export.json").unlink()
    (version / "manifest.json").unlink()  # made by hand: unverified
    shutil.rmtree(version / "golden")  # LeNet-5's: this model computes something else
    tiny_logits_model(version / "model.onnx")
    x = np.random.default_rng(1).standard_normal((1, 1, 32, 32)).astype(np.float32)
    logits, _ = OrtReference(version / "model.onnx")(x)
    srv = start_server(made, tmp_path / "server.log")
    try:
        reply = srv.stub.Classify(pb.ClassifyRequest(
            model="tiny_logits", top_k=10, images=[pb.Image(tensor=pb.Tensor(
                shape=[1, 32, 32], dtype=pb.DTYPE_FLOAT32, data=x[0].tobytes()))]), timeout=60)
    finally:
        srv.stop()
    got = reply.results[0].classes
    assert np.abs(logits).max() < 1e-6
    assert [c.index for c in got] == list(np.argsort(-logits[0], kind="stable")[:10])
    assert len({round(c.score, 6) for c in got}) == 1  # the probabilities do tie
