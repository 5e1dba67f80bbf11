"""The golden check: a version serves only once this server computes what PyTorch computed at
export (its golden set, run through decode → preprocess → batcher → engine), with the labels and
preprocessing it was exported with. A version that misses stays out of routing, says how far off
it was, and the version before it keeps serving every request."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import numpy as np
import pytest

from conftest import Load, OrtReference, eventually, make_repo, publish, run_cli, start_server
from visionserve.v1 import visionserve_pb2 as pb

ROOT = Path(__file__).resolve().parents[1]
CHELSEA = (ROOT / "docs" / "images" / "chelsea.jpg").read_bytes()
POLL = ("--model-control", "poll", "--poll-interval-s", "0.3")


def versions(srv, model: str) -> dict[int, tuple[int, str]]:
    info = srv.stub.GetModel(pb.GetModelRequest(model=model))
    return {v.version: (v.state, v.reason) for v in info.versions}


def failed_with(srv, model: str, version: int) -> str:
    """Wait for ``version`` to be failed; its reason."""
    return eventually(lambda: (s := versions(srv, model).get(version)) is not None
                      and s[0] == pb.MODEL_STATE_FAILED and s[1], what=f"version {version} to fail")


def off_by(reason: str) -> float:
    """The distance a reason reports ("… are off by 2.0e-02 of their scale …")."""
    match = re.search(r"off by (\S+) of (?:its|their) scale \(tolerance (\S+)\)", reason)
    assert match, reason
    return float(match.group(1))


def scale_last_layer(model_file: Path, factor: float) -> None:
    """Change the bytes of one initializer (the classifier's weights): still a valid model."""
    import onnx
    from onnx import numpy_helper

    model = onnx.load(str(model_file))
    gemm = next(n for n in model.graph.node if n.op_type == "Gemm")
    weight = next(i for i in model.graph.initializer if i.name == gemm.input[1])
    weight.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(weight) * np.float32(factor),
                                            weight.name))
    onnx.save(model, str(model_file))


def altered_copy(src: Path, dst: Path, alter) -> Path:
    """A copy of a version altered by hand: no manifest (which would refuse it first), so the
    golden check is what stands between it and the traffic."""
    shutil.copytree(src, dst)
    (dst / "manifest.json").unlink()
    alter(dst)
    return dst


def test_altered_versions_are_refused_under_load_and_the_previous_one_keeps_serving(
        exported_repo, tmp_path):
    repo = make_repo(exported_repo, tmp_path / "repo", ("resnet18",))
    model = repo / "resnet18"
    config = (model / "config.toml").read_text()
    srv = start_server(repo, tmp_path / "server.log", *POLL)
    request = pb.ClassifyRequest(model="resnet18", images=[pb.Image(encoded=CHELSEA)])
    try:
        load = Load(srv, request, clients=4)
        eventually(lambda: len(load.replies) > 20, what="steady traffic")

        # weights: the classifier's weights scaled by 1.02 (the file is a valid model)
        publish(model, 2, altered_copy(model / "1", tmp_path / "weights",
                                       lambda v: scale_last_layer(v / "model.onnx", 1.02)))
        reason = failed_with(srv, "resnet18", 2)
        assert "golden check failed" in reason and "logits of golden case" in reason, reason
        assert off_by(reason) > 3e-3

        # labels: the version's labels.txt in another order
        def permute(v: Path) -> None:
            labels = (v / "labels.txt").read_text().splitlines()
            (v / "labels.txt").write_text("\n".join(reversed(labels)) + "\n")

        publish(model, 3, altered_copy(model / "1", tmp_path / "labels", permute))
        reason = failed_with(srv, "resnet18", 3)
        assert "1000 of 1000 lines differ: the same names in another order" in reason, reason
        assert "a labels change is a new version" in reason

        # preprocessing: mean/std edited in config.toml reloads every version; all miss, and the
        # instance that served keeps serving
        edited = config.replace("mean = [0.485, 0.456, 0.406]", "mean = [0.5, 0.5, 0.5]") \
            .replace("std = [0.229, 0.224, 0.225]", "std = [0.5, 0.5, 0.5]")
        assert edited != config
        (model / "config.toml").write_text(edited)
        reason = eventually(lambda: "kept serving" in (r := versions(srv, "resnet18")[1][1])
                            and r, what="the edited config to be refused")
        assert "mean = [0.5, 0.5, 0.5] (exported with [0.485, 0.456, 0.406])" in reason, reason
        assert off_by(reason) > 3e-3  # the photos' logits moved

        # a change that does not move the numbers beyond tolerance loads
        passed = srv.metric("visionserve_golden_checks_total", model="resnet18", version="1",
                            result="passed")
        assert "intra_op_threads = 0" in config  # else the "change" below would change nothing
        (model / "config.toml").write_text(config.replace("intra_op_threads = 0",
                                                          "intra_op_threads = 1"))
        eventually(lambda: srv.metric("visionserve_golden_checks_total", model="resnet18",
                                      version="1", result="passed") == passed + 1,
                   what="version 1 to reload with one thread")
        load.stop()
        assert load.errors() == []
        assert load.versions_seen() == {1}
        state = versions(srv, "resnet18")
        assert state[1][0] == pb.MODEL_STATE_READY
        assert state[2][0] == state[3][0] == pb.MODEL_STATE_FAILED
        for version in ("2", "3"):
            assert srv.metric("visionserve_golden_checks_total", model="resnet18",
                              version=version, result="failed") >= 1
        assert "passed its golden check" in srv.log()
    finally:
        srv.stop()


@pytest.mark.parametrize("mode", ["warn", "off"])
def test_warn_and_off_serve_a_version_that_misses(exported_repo, tmp_path, mode):
    repo = make_repo(exported_repo, tmp_path / "repo", ("lenet5",))
    labels = (repo / "lenet5" / "1" / "labels.txt").read_text().splitlines()

    def permute(v: Path) -> None:
        (v / "labels.txt").write_text("\n".join(labels[1:] + labels[:1]) + "\n")

    publish(repo / "lenet5", 2, altered_copy(repo / "lenet5" / "1", tmp_path / "v2", permute))
    srv = start_server(repo, tmp_path / "server.log", "--golden-check", mode)
    try:
        image = pb.Image(encoded=CHELSEA)
        assert srv.stub.Classify(pb.ClassifyRequest(model="lenet5", images=[image])).version == 2
        state, reason = versions(srv, "lenet5")[2]
        assert state == pb.MODEL_STATE_READY
        failed = srv.metric("visionserve_golden_checks_total", model="lenet5", version="2",
                            result="failed")
        if mode == "warn":
            assert reason.startswith("golden check failed, serving anyway (--golden-check warn)")
            assert "10 of 10 lines differ: the same names in another order" in reason
            assert "ERROR" in srv.log() and failed == 1
        elif mode == "off":
            # no failed check counted, by a counter the server does declare (not a misspelling)
            from visionserve.service.metrics import Metrics

            assert "visionserve_golden_checks" in {m.name for m in Metrics().registry.collect()}
            assert reason == "" and failed == 0
        else:
            pytest.fail(f"unhandled case {mode}")
    finally:
        srv.stop()


def test_versions_without_a_golden_set_load_with_a_warning_and_operators_may_write_one(
        exported_repo, tmp_path):
    """Versions 1–4 of one model: none, an operator's own set that passes, one whose expected
    logits are wrong, and a malformed one."""
    repo = make_repo(exported_repo, tmp_path / "repo", ("lenet5",),
                     {"lenet5": {"version_policy.latest": 4}})
    model = repo / "lenet5"
    shutil.rmtree(model / "1" / "golden")
    (model / "1" / "manifest.json").unlink()  # an operator's edits: the versions are unverified
    pixels = np.random.default_rng(3).integers(0, 256, (32, 32, 1), dtype=np.uint8)
    normalized = ((pixels.transpose(2, 0, 1) / np.float32(255) - np.float32(0.5))
                  / np.float32(0.5)).astype(np.float32)
    config = (model / "config.toml").read_text()
    assert "mean = [0.5]" in config and "std = [0.5]" in config  # what `normalized` assumes
    logits, embedding = OrtReference(model / "1" / "model.onnx")(normalized[None])

    def operator_set(version: int, expected_logits: np.ndarray, manifest_edit=None) -> None:
        folder = tmp_path / f"v{version}"
        shutil.copytree(model / "1", folder)
        golden = folder / "golden"
        golden.mkdir()
        np.save(golden / "digit.npy", pixels)
        np.save(golden / "digit.logits.npy", expected_logits)
        np.save(golden / "digit.embedding.npy", embedding[0])
        manifest = {"format": 1, "tolerance": {"max_rel_diff": 1e-4},
                    "cases": [{"name": "my digit", "input": "digit.npy",
                               "logits": "digit.logits.npy", "embedding": "digit.embedding.npy"}]}
        if manifest_edit:
            manifest_edit(manifest)
        (golden / "golden.json").write_text(json.dumps(manifest))
        publish(model, version, folder)

    operator_set(2, logits[0])
    operator_set(3, logits[0] + 1.0)
    operator_set(4, logits[0], lambda m: m["cases"][0].update(logits="nothing.npy"))
    srv = start_server(repo, tmp_path / "server.log")
    try:
        state = versions(srv, "lenet5")
        assert state[1] == (pb.MODEL_STATE_READY, "no golden set: not checked at load")
        assert "model lenet5 version 1 has no golden set" in srv.log()
        assert state[2] == (pb.MODEL_STATE_READY, "")
        assert state[3][0] == pb.MODEL_STATE_FAILED
        assert "logits of golden case 'my digit' are off by" in state[3][1]
        assert off_by(state[3][1]) > 1e-4
        assert state[4][0] == pb.MODEL_STATE_FAILED
        assert "cases[0].logits: golden/nothing.npy is missing" in state[4][1], state[4][1]
        for version, result in (("1", "missing"), ("2", "passed"), ("3", "failed"),
                                ("4", "failed")):
            assert srv.metric("visionserve_golden_checks_total", model="lenet5",
                              version=version, result=result) == 1
        # the check's own requests are not the version's traffic
        stats = srv.metric("visionserve_batch_size_count", model="lenet5", version="2")
        assert stats == 0
        # ... while a request of the version's own is: the series above is the one that counts
        srv.stub.Classify(pb.ClassifyRequest(model="lenet5", version=2, images=[
            pb.Image(tensor=pb.Tensor(shape=[1, 32, 32], dtype=pb.DTYPE_UINT8,
                                      data=bytes(1024)))]), timeout=60)
        assert srv.metric("visionserve_batch_size_count", model="lenet5", version="2") == 1
    finally:
        srv.stop()


@pytest.mark.slow  # an export or `export --list` process: `make test` runs it
def test_reduced_precision_versions_pass_with_their_own_tolerances(tmp_path):
    repo = tmp_path / "repo"
    for version, precision in ((1, "fp32"), (2, "fp16"), (3, "int8")):
        exported = run_cli("export", "lenet5", "--random-weights", "--precision", precision,
                           "--version", str(version), "--repo", str(repo))
        assert exported.returncode == 0, exported.stderr[-3000:]
    records = {v: json.loads((repo / "lenet5" / str(v) / "export.json").read_text())["golden"]
               for v in (1, 2, 3)}
    # the documented tolerances (docs/lifecycle.md), kept literal: they are the promise
    assert [records[v]["max_rel_diff"] for v in (1, 2, 3)] == [3e-3, 3e-2, 0.1]
    assert records[1]["expected_from"].startswith("FP32 PyTorch")
    assert records[3]["expected_from"].startswith("this version on ONNX Runtime")
    config = repo / "lenet5" / "config.toml"
    text = config.read_text()
    assert "all = false" in text and 'decoder = "exact"' in text  # what the edit below edits
    config.write_text(text.replace("all = false", "all = true")
                      .replace('decoder = "exact"', 'decoder = "fast"'))
    srv = start_server(repo, tmp_path / "server.log")
    try:
        assert {v: s[0] for v, s in versions(srv, "lenet5").items()} == \
            {v: pb.MODEL_STATE_READY for v in (1, 2, 3)}
        log = srv.log()
        for v in (1, 2, 3):
            assert f"lenet5 version {v} passed its golden check: 5 cases (and 3 for another " \
                   "decoder)" in log
    finally:
        srv.stop()
