"""`visionserve export`: a checked, atomically published version, or nothing at all."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import stat
import subprocess
import sys
import urllib.request
from pathlib import Path

import pytest

from conftest import ROOT, eventually, export_list, make_repo, run_cli, start_server
from visionserve.service.format.model_format import (
    CONFIG_FILE,
    LABELS_FILE,
    MODEL_FILES,
    TRITON_CONFIG_FILE,
)
from visionserve.service.models.golden import GOLDEN_DIR, MANIFEST
from visionserve.v1 import visionserve_pb2 as pb

torch = pytest.importorskip("torch")


def tree(path: Path) -> list[str]:
    return sorted(str(p.relative_to(path)) for p in path.rglob("*")) if path.exists() else []


def lenet_weights(path: Path, poison: bool = False) -> Path:
    from visionserve.export.own_models import LeNet5

    torch.manual_seed(3)
    state = LeNet5().state_dict()
    if poison:
        state["classifier.1.weight"][0, 0] = float("nan")  # a diverged fine-tuning run
    torch.save({"state_dict": {f"module.{k}": v for k, v in state.items()}}, path)
    return path


def test_export_publishes_numbered_versions_with_provenance_and_parity(tmp_path):
    from visionserve.export.golden import PHOTOS
    from visionserve.service.format.model_config import DECODERS

    repo = tmp_path / "repo"
    first = run_cli("export", "lenet5", "--repo", str(repo), "--seed", "11",
                    "--random-weights")
    assert first.returncode == 0, first.stderr
    version = repo / "lenet5" / "1"
    # the repository format's names (service/format/model_format.py), and the provenance record
    assert {p.name for p in version.iterdir()} == {MODEL_FILES["onnxruntime"], LABELS_FILE,
                                                   "export.json", GOLDEN_DIR, "manifest.json"}
    # the manifest, written last: every other file of the version, its size and sha256
    listed = json.loads((version / "manifest.json").read_text())
    on_disk = sorted(p for p in version.rglob("*") if p.is_file() and p.name != "manifest.json")
    assert listed["format"] == 1
    assert listed["files"] == [{"path": p.relative_to(version).as_posix(),
                                "size": p.stat().st_size,
                                "sha256": hashlib.sha256(p.read_bytes()).hexdigest()}
                               for p in on_disk]
    record = json.loads((version / "export.json").read_text())
    # every photo of the golden set once per decoder, and the two noise inputs; none dropped
    assert record["golden"]["cases"] == len(PHOTOS) * len(DECODERS) + 2
    assert record["golden"]["dropped"] == []
    assert record["golden"]["max_rel_diff"] == 3e-3  # FP32's documented tolerance
    golden = json.loads((version / GOLDEN_DIR / MANIFEST).read_text())
    assert golden["labels"] == LABELS_FILE and golden["preprocessing"]["mean"] == [0.5]
    assert {c["input"] for c in golden["cases"]} == {*PHOTOS, "noise-uint8.npy",
                                                     "noise-float32.npy"}
    assert record["architecture"] == "lenet5" and record["seed"] == 11
    assert record["opset"] >= 17 and record["exporter"] in ("dynamo", "torchscript")
    assert record["parity"]["passed"] and record["parity"]["top5_agreement"] == 1.0
    assert record["parity"]["logits_max_abs_diff"] < 1e-4
    assert record["embedding_dim"] == 84 and record["num_classes"] == 10
    assert (repo / "lenet5" / "config.toml").is_file()
    assert (version / "labels.txt").read_text().split() == [str(i) for i in range(10)]
    umask = os.umask(0)
    os.umask(umask)  # readable by a server running as another user, as a mkdir'd folder is
    assert stat.S_IMODE(version.stat().st_mode) == 0o777 & ~umask

    second = run_cli("export", "lenet5", "--repo", str(repo), "--random-weights")
    assert second.returncode == 0, second.stderr
    assert sorted(p.name for p in (repo / "lenet5").iterdir()) == \
        sorted(["1", "2", TRITON_CONFIG_FILE, CONFIG_FILE, LABELS_FILE])  # no hidden temp folder


@pytest.mark.slow  # an export or `export --list` process: `make test` runs it
def test_an_existing_version_is_never_overwritten_and_no_number_is_reused(exported_repo,
                                                                          tmp_path):
    import fcntl

    repo = make_repo(exported_repo, tmp_path / "repo", ("lenet5",))  # version 1, exported
    before = tree(repo)
    again = run_cli("export", "lenet5", "--repo", str(repo), "--version", "1")
    assert again.returncode == 1 and "exists already" in again.stderr
    assert tree(repo) == before
    # the next number is above every version present: a partial copy (3), and one a running
    # export is staging (5: its owner.json locked, as export holds it)
    (repo / "lenet5" / "3").mkdir()
    staging = repo / "lenet5" / ".staging-running"
    staging.mkdir()
    with open(staging / "owner.json", "w") as owner:
        fcntl.flock(owner, fcntl.LOCK_EX)
        owner.write(json.dumps({"pid": 1, "model": "lenet5", "version": 5}))
        owner.flush()
        out = run_cli("export", "lenet5", "--repo", str(repo), "--random-weights")
    assert out.returncode == 0, out.stderr[-2000:]
    assert "published lenet5 version 6" in out.stderr
    assert staging.is_dir()  # a running export's staging folder is left alone


@pytest.mark.slow  # an export or `export --list` process: `make test` runs it
def test_a_failed_parity_check_publishes_nothing(tmp_path):
    repo = tmp_path / "repo"
    assert run_cli("export", "lenet5", "--repo", str(repo), "--random-weights").returncode == 0
    before = tree(repo)
    weights = lenet_weights(tmp_path / "diverged.pt", poison=True)
    out = run_cli("export", "lenet5", "--repo", str(repo), "--weights", str(weights))
    assert out.returncode == 1
    assert "parity check failed" in out.stderr and "non-finite" in out.stderr
    assert "nothing was published" in out.stderr
    assert tree(repo) == before


def test_a_checkpoint_with_module_prefix_loads_and_its_hash_is_recorded(tmp_path):
    import hashlib

    weights = lenet_weights(tmp_path / "good.pt")
    out = run_cli("export", "lenet5", "--repo", str(tmp_path / "repo"), "--weights",
                  str(weights))
    assert out.returncode == 0, out.stderr
    record = json.loads((tmp_path / "repo/lenet5/1/export.json").read_text())
    assert record["weights_sha256"] == hashlib.sha256(weights.read_bytes()).hexdigest()
    assert record["seed"] is None


def test_weights_that_do_not_fit_say_which_keys_differ(tmp_path):
    weights = lenet_weights(tmp_path / "lenet.pt")
    out = run_cli("export", "resnet18", "--repo", str(tmp_path / "repo"), "--weights",
                  str(weights))
    assert out.returncode == 1
    assert "does not fit the architecture" in out.stderr and "missing keys" in out.stderr
    assert "conv1.weight" in out.stderr
    assert tree(tmp_path / "repo" / "resnet18") == []


def test_a_fine_tuned_head_with_its_own_labels(tmp_path):
    labels = tmp_path / "labels.txt"
    labels.write_text("cat\ndog\nbird\n")
    out = run_cli("export", "lenet5", "--repo", str(tmp_path / "repo"), "--name", "pets",
                  "--num-classes", "3", "--labels", str(labels))
    assert out.returncode == 0, out.stderr
    assert (tmp_path / "repo/pets/1/labels.txt").read_text().split() == ["cat", "dog", "bird"]
    assert json.loads((tmp_path / "repo/pets/1/export.json").read_text())["num_classes"] == 3


@pytest.mark.slow  # an export or `export --list` process: `make test` runs it
def test_list_and_unknown_architecture(tmp_path):
    listing = export_list("table")
    rows = json.loads(export_list("json").stdout)
    names = [a["name"] for a in rows]
    assert {"lenet5", "resnet18", "mobilenet_v3_small"} <= set(names)  # the test models
    weights = {a["name"]: a["default_weights"] for a in rows}  # where each one's come from
    assert weights["efficientnet_lite0"].startswith("pretrained: ImageNet-1k")
    assert weights["resnet18"].startswith("random weights (seeded): labels meaningless")
    assert "random weights (seeded)" in listing.stdout
    from visionserve.export.architectures import ARCHITECTURES  # torch: imported when run

    assert names == list(ARCHITECTURES)  # every architecture the export stage knows, in order
    # piped (stdout not a terminal, COLUMNS=80), the table lists every name whole: no "mobile…"
    rows = {line.split("│")[1].strip() for line in listing.stdout.splitlines()
            if line.startswith("│")}
    assert rows == set(names) and "…" not in listing.stdout
    out = run_cli("export", "resnet9000", "--repo", str(tmp_path))
    assert out.returncode == 2 and "unknown architecture 'resnet9000'" in out.stderr


def test_a_model_published_while_a_server_polls_appears_whole(exported_repo, tmp_path):
    """A new model's folder is built hidden and renamed into place: the polling server never
    sees it without its config.toml, so it never logs a load failure, never counts one (which
    would fire the shipped VisionserveModelLoadFailed alert), and serves it once published."""
    repo = make_repo(exported_repo, tmp_path / "repo", ("lenet5",))
    srv = start_server(repo, tmp_path / "server.log", "--model-control", "poll",
                       "--poll-interval-s", "0.05")
    try:
        out = run_cli("export", "lenet5", "--repo", str(repo), "--name", "digits",
                      "--random-weights")
        assert out.returncode == 0, out.stderr
        eventually(lambda: srv.stub.GetModel(pb.GetModelRequest(model="digits")).state
                   == pb.MODEL_STATE_READY, "the new model to serve")
        assert srv.metric("visionserve_model_load_failures_total") == 0
    finally:
        srv.stop()
    assert " ERROR " not in srv.log() and "missing" not in srv.log(), srv.log()[-2000:]
    assert sorted(p.name for p in repo.iterdir()) == ["digits", "lenet5"]  # no staging left


def test_a_crashed_exports_staging_is_never_served_and_the_next_export_removes_it(
        exported_repo, tmp_path):
    repo = make_repo(exported_repo, tmp_path / "repo", ("lenet5",))
    srv = start_server(repo, tmp_path / "server.log", "--model-control", "poll",
                       "--poll-interval-s", "0.05")
    try:
        crashing = subprocess.Popen(
            [sys.executable, "-m", "visionserve.service.cli", "export", "resnet18", "--repo",
             str(repo)], cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:  # killed while it writes its version: as an out-of-memory kill would
            eventually(lambda: any(repo.glob(".staging-*/resnet18/1/*")), "the export writing",
                       timeout=300)
        finally:
            crashing.send_signal(signal.SIGKILL)
            crashing.wait(timeout=60)
        leftover = list(repo.glob(".staging-*"))
        assert leftover and not (repo / "resnet18").exists()
        index = urllib.request.Request(f"http://127.0.0.1:{srv.http_port}/v2/repository/index",
                                       data=b"{}", method="POST")
        with urllib.request.urlopen(index, timeout=30) as reply:
            assert [m["name"] for m in json.load(reply)] == ["lenet5"]
        out = run_cli("export", "lenet5", "--repo", str(repo), "--name", "digits",
                      "--random-weights")
        assert out.returncode == 0, out.stderr
        assert "left by an export that did not finish" in out.stderr
        assert not any(p.exists() for p in leftover)
        assert srv.metric("visionserve_model_load_failures_total") == 0
    finally:
        srv.stop()
