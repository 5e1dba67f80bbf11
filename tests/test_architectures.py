"""Every architecture of the mission: exported, checked against PyTorch, served.

The fast tests take a few small architectures end to end, with the preprocessing that the
model's own source publishes (timm's eval transform, torchvision's weights transforms) as the
reference; the slow test exports and serves one architecture of every family and a third of the
rest, chosen by the commit (VISIONSERVE_ARCH_ALL=1, `make test-all`: every one)."""

from __future__ import annotations

import io
import json
import os
import re
import subprocess
from pathlib import Path

import numpy as np
import pytest

from conftest import (
    ROOT,
    TEST_MODELS,
    embeddings,
    encode,
    export_list,
    photo,
    run_cli,
    start_server,
)
from visionserve.v1 import visionserve_pb2 as pb

torch = pytest.importorskip("torch")


def reference_embedding(arch: str, model, pixels: np.ndarray) -> np.ndarray:
    """The embedding PyTorch computes on the source's own eval transform of the JPEG."""
    from PIL import Image

    img = Image.open(io.BytesIO(encode(pixels))).convert("RGB")
    if arch.startswith("efficientnet_b"):
        from torchvision.models import get_model_weights

        x = get_model_weights(arch).DEFAULT.transforms()(img)[None]
        with torch.no_grad():
            return torch.flatten(model.avgpool(model.features(x)), 1).numpy()[0]
    import timm.data

    transform = timm.data.create_transform(**timm.data.resolve_data_config({}, model=model))
    with torch.no_grad():
        features = model.forward_features(transform(img)[None])
        return model.forward_head(features, pre_logits=True).numpy()[0]


def build(arch: str):
    """Seeded random weights, alive: torchvision's EfficientNet init answers logits of ~1e-14,
    which export refuses, so BatchNorm statistics are first taken from a few noise batches."""
    torch.manual_seed(4)
    if arch.startswith("efficientnet_b"):
        import torchvision

        model = getattr(torchvision.models, arch)(weights=None)
    else:
        import timm

        model = timm.create_model(arch, pretrained=False)
    for m in model.modules():
        if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
            m.reset_running_stats()
            m.momentum = None  # a cumulative average over the batches below
    model.train()
    with torch.no_grad():
        for _ in range(2):
            model(torch.randn(8, 3, 224, 224))
    return model.eval()


@pytest.mark.parametrize("arch", [
    pytest.param("mobilenetv1_100", marks=pytest.mark.slow),  # ~16 s: `make test` runs both
    pytest.param("efficientnet_b0", marks=pytest.mark.slow),  # ~18 s
])
def test_exported_architecture_serves_what_pytorch_computes_on_its_own_transform(arch,
                                                                                 tmp_path):
    model = build(arch)
    weights = tmp_path / f"{arch}.pt"
    torch.save(model.state_dict(), weights)
    repo = tmp_path / "repo"
    out = run_cli("export", arch, "--repo", str(repo), "--weights", str(weights))
    assert out.returncode == 0, out.stderr[-3000:]
    assert (repo / arch / "config.pbtxt").read_text().startswith(f'name: "{arch}"')
    srv = start_server(repo, tmp_path / "server.log", "--model-control", "none")
    try:
        for name in ("chelsea", "astronaut"):
            pixels = photo(name)
            reply = srv.stub.Embed(pb.EmbedRequest(model=arch,
                                                   images=[pb.Image(encoded=encode(pixels))]))
            got = embeddings(reply)[0]
            want = reference_embedding(arch, model, pixels)
            assert np.abs(got - want).max() <= 1e-3 * np.abs(want).max(), name
        classes = srv.stub.Classify(pb.ClassifyRequest(
            model=arch, images=[pb.Image(encoded=encode(photo("coffee")))])).results[0].classes
        assert len(classes) == 5 and all(c.label for c in classes)
    finally:
        srv.stop()


@pytest.mark.slow  # two export processes: `make test` runs it
def test_a_corrupt_weights_file_and_an_unwritable_repository_are_clear_errors(tmp_path):
    corrupt = tmp_path / "weights.pt"
    corrupt.write_bytes(b"\x80\x02 definitely not a checkpoint")
    out = run_cli("export", "lenet5", "--repo", str(tmp_path / "repo"), "--weights",
                  str(corrupt))
    assert out.returncode == 1 and "not a readable PyTorch state_dict or checkpoint" in out.stderr
    assert not (tmp_path / "repo" / "lenet5").exists() or \
        not any((tmp_path / "repo" / "lenet5").iterdir())
    out = run_cli("export", "lenet5", "--repo", "/proc/visionserve-repo")
    assert out.returncode == 1 and "cannot write into the repository" in out.stderr


def test_list_shows_every_architecture_of_the_mission():
    out = export_list("table")
    assert "42 architectures" in out.stdout
    for name in ("lenet5", "alexnet", "zfnet", "vgg11", "vgg11_lrn", "vgg13", "vgg16", "vgg19",
                 "googlenet", "inception_v2", "inception_v3", "inception_v4",
                 "inception_resnet_v2", "resnet18", "resnet34",
                 "resnet50", "resnet101", "resnet152", "mobilenetv1_100", "mobilenet_v2",
                 "mobilenet_v3_small", "mobilenet_v3_large", "densenet121", "densenet169",
                 "densenet201", *(f"efficientnet_b{i}" for i in range(8)),
                 *(f"efficientnet_lite{i}" for i in range(3)), "vit_b_16", "vit_l_16",
                 "vit_h_14", "deit_small_patch16_224", "swin_t", "pvt_v2_b2"):
        assert f"│ {name} " in out.stdout, name


def test_list_as_json_describes_the_paper_architectures_and_marks_the_heavy_ones():
    rows = {r["name"]: r for r in _architectures()}  # `export --list --output json`, run once
    assert len(rows) == 42
    assert [n for n, r in rows.items() if r["heavy"]] == ["vit_h_14"]
    # BN-Inception: GoogLeNet's 1024-d pooled features; A-LRN: LRN adds no weights to VGG-11
    assert rows["inception_v2"]["embedding_dim"] == 1024
    assert rows["vgg11_lrn"]["params"] == rows["vgg11"]["params"]
    assert rows["vgg11_lrn"]["embedding_dim"] == 4096
    # ViT-H/14 is a 224 px model with the transforms of its 224 px (SWAG linear) weights
    h14 = rows["vit_h_14"]
    assert (h14["input"], h14["resize"], h14["interpolation"]) == ([3, 224, 224], 224,
                                                                    "bicubic")
    assert rows["vit_l_16"]["params"] > 300e6 and h14["params"] > 600e6


def test_skip_heavy_is_for_all_only():
    out = run_cli("export", "resnet18", "--skip-heavy", "--repo", "/nonexistent")
    assert out.returncode == 2 and "--skip-heavy applies to --all" in out.stderr


# The slow sweep: every family each run (the mission's families, below), the rest of the
# architectures in ROTATION slices of about equal export time (docs/models.md's 'export s',
# measured on 2 cores: the family representatives ~110 s, each slice ~30 s: one or two
# architectures), one slice per run, picked by the commit; `make test-all` exports all of them.
ROTATION = 24
# exported and served by other tests of every run, so the sweep leaves them out (the families
# they stand for stay covered): the test models of conftest's exported_repo, and the
# architectures compared with their source's own transform above
EXPORTED_ELSEWHERE = {*TEST_MODELS, "mobilenetv1_100", "efficientnet_b0"}
# export --list's families grouped as the mission names them; a family not named here is a
# group of its own, so a new family is in every run
KIN = {"AlexNet": "AlexNet/ZFNet", "ZFNet": "AlexNet/ZFNet", "GoogLeNet": "Inception",
       "Inception-ResNet": "Inception", "EfficientNet-Lite": "EfficientNet",
       "ViT": "ViT/DeiT/Swin/PVT", "DeiT": "ViT/DeiT/Swin/PVT", "Swin": "ViT/DeiT/Swin/PVT",
       "PVT": "ViT/DeiT/Swin/PVT"}
UNMEASURED_S = 30.0  # the export time assumed for an architecture docs/models.md lacks


def _architectures() -> tuple[dict, ...]:
    return tuple(json.loads(export_list("json").stdout))


def _non_heavy() -> list[str]:
    return sorted(r["name"] for r in _architectures() if not r["heavy"])


def _export_seconds() -> dict[str, float]:
    """docs/models.md's measured export time of each architecture."""
    rows = [[c.strip() for c in re.split(r"(?<!\\)\|", line.strip().strip("|"))]
            for line in (ROOT / "docs" / "models.md").read_text().splitlines()
            if line.startswith("| ")]
    header = rows[0]
    assert header[0] == "architecture" and "export s" in header, header
    col = header.index("export s")
    return {row[0].split()[0]: float(row[col]) for row in rows[1:] if len(row) == len(header)}


def _sweep_plan() -> tuple[list[str], list[list[str]]]:
    """The non-heavy architectures split into those every run exports (the cheapest of each
    family, and of our own modules besides LeNet-5) and ROTATION slices of the rest, dealt
    longest export first to the slice with the least export time so far."""
    seconds = _export_seconds()

    def cost(name: str) -> float:
        return seconds.get(name, UNMEASURED_S)

    groups: dict[str, list[str]] = {}
    for r in _architectures():
        if not r["heavy"]:
            groups.setdefault(KIN.get(r["family"], r["family"]), []).append(r["name"])
            if r["source"] == "visionserve" and r["name"] != "lenet5":
                groups.setdefault("own modules", []).append(r["name"])
    always = sorted({min(names, key=lambda n: (cost(n), n)) for names in groups.values()})
    slices: list[list[str]] = [[] for _ in range(ROTATION)]
    for name in sorted(set(_non_heavy()) - set(always), key=lambda n: (-cost(n), n)):
        min(slices, key=lambda s: sum(map(cost, s))).append(name)
    return always, [sorted(s) for s in slices]


def _this_run() -> tuple[list[str], str]:
    """The architectures this run exports, and why (what replays it)."""
    if os.environ.get("VISIONSERVE_ARCH_ALL") == "1":
        return _non_heavy(), "VISIONSERVE_ARCH_ALL=1: every non-heavy architecture"
    always, slices = _sweep_plan()
    if os.environ.get("VISIONSERVE_ARCH_ROTATION"):
        k = int(os.environ["VISIONSERVE_ARCH_ROTATION"]) % ROTATION
        key = "set by VISIONSERVE_ARCH_ROTATION"
    else:
        head = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True,
                              cwd=ROOT).stdout.strip()
        k = int(head, 16) % ROTATION if head else 0
        key = f"int(HEAD {head}, 16) % {ROTATION}" if head else "no git commit"
    why = (f"one per family: {always}; rotation slice {k} of 0..{ROTATION - 1} ({key}): "
           f"{slices[k]}; left to other tests of this run: {sorted(EXPORTED_ELSEWHERE)}; "
           f"replay: VISIONSERVE_ARCH_ROTATION={k}, all: VISIONSERVE_ARCH_ALL=1")
    return sorted(set(always + slices[k]) - EXPORTED_ELSEWHERE), why


def test_every_architecture_has_a_family_and_the_sweep_plan_covers_each_one_once():
    rows = _architectures()
    assert all(isinstance(r.get("family"), str) and r["family"] for r in rows), \
        [r["name"] for r in rows if not r.get("family")]
    always, slices = _sweep_plan()
    assert sorted(always + [n for s in slices for n in s]) == _non_heavy()
    families = {KIN.get(r["family"], r["family"]) for r in rows if not r["heavy"]}
    by_name = {r["name"]: r for r in rows}
    assert {KIN.get(by_name[n]["family"], by_name[n]["family"]) for n in always} == families
    assert any(by_name[n]["source"] == "visionserve" for n in always if n != "lenet5")


@pytest.mark.slow
# measured on 2 cores: ~25 min for all 41 (VISIONSERVE_ARCH_ALL=1)
@pytest.mark.timeout(3600)
def test_every_architecture_but_the_heavy_ones_exports_with_parity_and_serves(
        tmp_path_factory):
    """Every family each run and a slice of the rest (_this_run prints which, and why)."""
    wanted, why = _this_run()
    print(f"architectures of this run ({len(wanted)}): {why}")  # noqa: T201 - shown on failure
    repo = tmp_path_factory.mktemp("all") / "repo"
    if os.environ.get("VISIONSERVE_ARCH_ALL") == "1":
        out = run_cli("export", "--all", "--skip-heavy", "--repo", str(repo), timeout=5400)
    else:
        out = run_cli("export", *wanted, "--repo", str(repo), timeout=5400)
    assert out.returncode == 0, (why, out.stderr[-5000:])
    names = sorted(p.name for p in repo.iterdir() if p.is_dir())
    assert names == wanted, why
    if os.environ.get("VISIONSERVE_ARCH_ALL") == "1":
        assert names == _non_heavy() and len(names) == 41
    _check_exported_and_served(repo, names, tmp_path_factory.mktemp("server"))


@pytest.mark.heavy
@pytest.mark.timeout(5400)  # measured: see docs/models.md (vit_h_14 export time and memory)
def test_the_heavy_architectures_export_with_weights_beside_the_graph_and_serve(
        tmp_path_factory):
    heavy = sorted(r["name"] for r in _architectures() if r["heavy"])
    repo = tmp_path_factory.mktemp("heavy") / "repo"
    out = run_cli("export", *heavy, "--repo", str(repo), timeout=5400)
    assert out.returncode == 0, out.stderr[-5000:]
    for name in heavy:
        version = repo / name / "1"
        record = json.loads((version / "export.json").read_text())
        if record["parameters"] * 4 > 2**31:  # over ONNX's 2 GB protobuf limit
            assert (version / "model.onnx.data").stat().st_size > 2**31
            assert (version / "model.onnx").stat().st_size < 2**24
    _check_exported_and_served(repo, heavy, tmp_path_factory.mktemp("server"))


def _check_exported_and_served(repo: Path, names: list[str], logs: Path) -> None:
    for name in names:
        record = json.loads((repo / name / "1" / "export.json").read_text())
        assert record["parity"]["passed"], (name, record["parity"])
        # alive: the logits depend on the input, at a scale softmax can rank
        assert record["parity"]["reference_spread"] >= 1e-3, (name, record["parity"])
        assert record["parity"]["reference_scale"] >= 1e-4, (name, record["parity"])
        # the export's own peak memory is recorded, and held at least the FP32 weights
        assert record["export_peak_rss_bytes"] > 4 * record["parameters"], name
    srv = start_server(repo, logs / "server.log", "--model-control", "none", timeout=1800)
    try:
        image = pb.Image(encoded=encode(photo("chelsea")))
        for name in names:
            reply = srv.stub.Classify(pb.ClassifyRequest(model=name, images=[image]),
                                      timeout=300)
            assert reply.model == name and len(reply.results[0].classes) == 5
            info = srv.stub.GetModel(pb.GetModelRequest(model=name))
            assert info.state == pb.MODEL_STATE_READY
            dim = json.loads((repo / name / "1" / "export.json").read_text())["embedding_dim"]
            vector = embeddings(srv.stub.Embed(pb.EmbedRequest(model=name, images=[image]),
                                               timeout=300))[0]
            assert vector.shape == (dim,) and np.isfinite(vector).all()
    finally:
        srv.stop()
