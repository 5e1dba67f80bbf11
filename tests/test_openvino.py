"""``backend = "openvino"``: the same model files served by OpenVINO's CPU plugin, in FP32 (exact
to its tolerance, like ONNX Runtime), BF16 (on CPUs that compute it; refused, saying so,
elsewhere) and INT8 (the QDQ file, checked against its own outputs on OpenVINO). Every version
passes its golden set on the engine it serves on; a missing package or capability fails that model
alone; compiled models are reused from ``--openvino-cache-dir``; nothing phones home."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from tritonclient.grpc import service_pb2 as kpb  # never our KServe stubs (tests/test_kserve.py)
from tritonclient.grpc import service_pb2_grpc as kpb_grpc

from conftest import CACHE, edit_config, eventually, make_repo, run_cli, start_server
from visionserve.v1 import visionserve_pb2 as pb

pytest.importorskip("openvino", reason="backend = \"openvino\" needs the openvino extra "
                                       "(make setup installs it)")
from visionserve.service.engine.backends.openvino import cpu_capabilities

ROOT = Path(__file__).resolve().parents[1]
CHELSEA = (ROOT / "docs" / "images" / "chelsea.jpg").read_bytes()
HAS_BF16 = "BF16" in cpu_capabilities()
NEEDS_BF16 = pytest.mark.skipif(not HAS_BF16, reason=(
    "this CPU does not compute BF16 natively (OpenVINO's CPU capabilities: "
    f"{cpu_capabilities()}); BF16 needs AVX512_BF16 or AMX"))
OPENVINO = {"backend": "openvino"}


def state(srv, model: str) -> tuple[int, str]:
    info = srv.stub.GetModel(pb.GetModelRequest(model=model))
    return info.state, info.reason


def classify(srv, model: str, top_k: int = 5) -> list[tuple[str, float]]:
    reply = srv.stub.Classify(pb.ClassifyRequest(model=model, top_k=top_k,
                                                 images=[pb.Image(encoded=CHELSEA)]), timeout=60)
    return [(c.label, c.score) for c in reply.results[0].classes]


@pytest.fixture(scope="module")
def int8_openvino(tmp_path_factory) -> Path:
    """MobileNet v3 small exported INT8 for OpenVINO (cached across runs, like the test repo)."""
    repo = CACHE / "openvino-repo"
    if not (repo / "mobilenet_v3_small_int8" / "1" / "model.onnx").exists():
        shutil.rmtree(repo / "mobilenet_v3_small_int8", ignore_errors=True)
        result = run_cli("export", "mobilenet_v3_small", "--precision", "int8", "--backend",
                         "openvino", "--name", "mobilenet_v3_small_int8", "--repo", str(repo))
        assert result.returncode == 0, result.stderr[-3000:]
    return repo


def test_an_openvino_fp32_model_answers_as_onnx_runtime_does(exported_repo, tmp_path):
    """The same exported folder, once per engine: same labels in the same order, scores within
    FP32 rounding; metadata and Triton's config name OpenVINO and its settings."""
    repo = make_repo(exported_repo, tmp_path / "repo", ("resnet18",))
    shutil.copytree(repo / "resnet18", repo / "resnet18_ov")
    edit_config(repo / "resnet18_ov", OPENVINO)
    srv = start_server(repo, tmp_path / "server.log")
    try:
        assert state(srv, "resnet18_ov") == (pb.MODEL_STATE_READY, "")
        ort, ov = classify(srv, "resnet18"), classify(srv, "resnet18_ov")
        assert len(ort) == 5  # top_k's 5: two empty answers would agree too
        assert [label for label, _ in ov] == [label for label, _ in ort]
        np.testing.assert_allclose([s for _, s in ov], [s for _, s in ort], atol=1e-4)
        assert "passed its golden check" in srv.log().split("resnet18_ov version 1", 1)[1]

        kserve = kpb_grpc.GRPCInferenceServiceStub(srv.channel)
        meta = kserve.ModelMetadata(kpb.ModelMetadataRequest(name="resnet18_ov"), timeout=10)
        assert meta.platform == "openvino"
        config = kserve.ModelConfig(kpb.ModelConfigRequest(name="resnet18_ov"), timeout=10).config
        assert (config.backend, config.platform) == ("openvino", "")
        assert config.default_model_filename == "model.onnx"
        # the keys Triton's openvino_backend reads; BF16 only when asked for
        assert config.parameters["NUM_STREAMS"].string_value == "1"
        assert "HINT_BF16" not in config.parameters
        assert srv.stub.GetModel(pb.GetModelRequest(model="resnet18_ov")).backend == "openvino"
    finally:
        srv.stop()


def test_concurrent_batches_on_two_streams_each_get_their_own_rows(exported_repo, tmp_path):
    """Two instances = two OpenVINO streams running batches at once: every client gets the
    answer for its own image, whatever batch it rode in."""
    from concurrent.futures import ThreadPoolExecutor

    from conftest import encode, photo

    repo = make_repo(exported_repo, tmp_path / "repo", ("mobilenet_v3_small",), overrides={
        "mobilenet_v3_small": {**OPENVINO, "instance_count": 2,
                               "batching.max_queue_delay_ms": 2.0}})
    srv = start_server(repo, tmp_path / "server.log")
    try:
        images = [encode(photo(n)) for n in ("chelsea", "coffee", "astronaut", "rocket")]

        def top1(data: bytes) -> tuple[str, float]:
            reply = srv.stub.Classify(pb.ClassifyRequest(
                model="mobilenet_v3_small", top_k=1, images=[pb.Image(encoded=data)]), timeout=60)
            c = reply.results[0].classes[0]
            return c.label, round(c.score, 4)

        alone = [top1(d) for d in images]
        with ThreadPoolExecutor(16) as pool:
            together = list(pool.map(top1, images * 16))
        assert together == alone * 16
        # rows of shared batches were handed back: some batches held more than one image
        assert srv.metric("visionserve_batch_size_sum", model="mobilenet_v3_small") > \
            srv.metric("visionserve_batch_size_count", model="mobilenet_v3_small")
    finally:
        srv.stop()


def test_int8_served_by_openvino_passes_its_own_golden_set(int8_openvino, tmp_path):
    """An INT8 golden set holds the version to its own outputs on the engine it was exported
    for (OpenVINO's INT8 kernels round differently from ONNX Runtime's)."""
    record = json.loads((int8_openvino / "mobilenet_v3_small_int8" / "1" /
                         "export.json").read_text())
    assert record["engine"] == "OpenVINO (CPU, FP32)"
    assert record["golden"]["expected_from"].startswith("this version on OpenVINO")
    repo = make_repo(int8_openvino, tmp_path / "repo", ("mobilenet_v3_small_int8",))
    srv = start_server(repo, tmp_path / "server.log")
    try:
        assert state(srv, "mobilenet_v3_small_int8") == (pb.MODEL_STATE_READY, "")
        assert srv.metric("visionserve_golden_checks_total", model="mobilenet_v3_small_int8",
                          result="passed") == 1
        assert len(classify(srv, "mobilenet_v3_small_int8")) == 5
    finally:
        srv.stop()


@pytest.mark.skipif(HAS_BF16, reason="this CPU computes BF16: the refusal cannot happen here")
def test_bf16_on_a_cpu_without_it_fails_that_model_naming_the_capability(exported_repo,
                                                                           tmp_path):
    repo = make_repo(exported_repo, tmp_path / "repo", ("lenet5", "resnet18"), overrides={
        "resnet18": {**OPENVINO, "openvino.precision": "bf16"}})
    srv = start_server(repo, tmp_path / "server.log")
    try:
        code, reason = state(srv, "resnet18")
        assert code == pb.MODEL_STATE_FAILED
        assert "openvino.precision = \"bf16\"" in reason and "AVX512_BF16" in reason, reason
        assert "precision = \"fp32\"" in reason  # what to do
        assert state(srv, "lenet5")[0] == pb.MODEL_STATE_READY
    finally:
        srv.stop()


@pytest.mark.skipif(HAS_BF16, reason="this CPU computes BF16: export checks it for real")
def test_bf16_export_on_a_cpu_without_it_is_refused_before_any_work(tmp_path):
    result = run_cli("export", "lenet5", "--precision", "bf16", "--repo", str(tmp_path))
    assert result.returncode != 0
    assert "does not compute BF16 natively" in result.stderr, result.stderr[-2000:]
    assert not (tmp_path / "lenet5").exists()


@NEEDS_BF16
def test_bf16_export_is_checked_on_openvino_and_serves_within_its_tolerance(tmp_path):
    """The BF16 export is checked on the engine that will serve it. Where that engine's BF16
    holds the tolerance, the version is published and serves; where it does not, nothing is
    published and the refusal names the measured difference. Measured 2026-12-07 on an AMD EPYC
    with AVX512_BF16 (OpenVINO's CPU plugin): random-weight ResNet-18 2.7e-2 of its logits'
    scale (ResNet-50 0.13, top-5 agreement 0), over the 1.5e-2 tolerance: refused there; an
    Intel CPU with AMX measured ~4e-3 on ResNet-50 (issue 22)."""
    result = run_cli("export", "resnet18", "--precision", "bf16", "--repo", str(tmp_path))
    if result.returncode != 0:
        assert "parity check failed (bf16 on OpenVINO (CPU, BF16)): relative difference" \
            in result.stderr, result.stderr[-3000:]
        assert "nothing was published" in result.stderr
        assert not (tmp_path / "resnet18" / "1").exists()
        pytest.xfail("this CPU's OpenVINO BF16 misses the tolerance: refused, as it must be "
                     "(" + result.stderr.split("parity check failed")[1][:120].strip() + ")")
    record = json.loads((tmp_path / "resnet18" / "1" / "export.json").read_text())
    assert record["engine"] == "OpenVINO (CPU, BF16)"
    assert record["parity"]["logits_max_rel_diff"] <= 1.5e-2
    assert record["parity"]["top1_agreement"] >= 0.99
    assert 'precision = "bf16"' in (tmp_path / "resnet18" / "config.toml").read_text()
    srv = start_server(tmp_path, tmp_path / "server.log")
    try:
        assert state(srv, "resnet18") == (pb.MODEL_STATE_READY, "")
        assert len(classify(srv, "resnet18")) == 5
    finally:
        srv.stop()


@pytest.mark.slow  # an export or `export --list` process: `make test` runs it
def test_export_refuses_what_no_engine_would_serve_as_checked(exported_repo, tmp_path):
    fp16 = run_cli("export", "lenet5", "--precision", "fp16", "--backend", "openvino",
                   "--repo", str(tmp_path), "--random-weights")
    assert fp16.returncode != 0 and "export fp32 or bf16 for it" in fp16.stderr
    # a folder made for OpenVINO takes its next versions for OpenVINO
    for _ in range(2):
        again = run_cli("export", "lenet5", "--backend", "openvino", "--repo", str(tmp_path),
                        "--random-weights")
        assert again.returncode == 0, again.stderr[-2000:]
    assert (tmp_path / "lenet5" / "2" / "golden").is_dir()
    # one model name per engine: a version must serve on what it was checked on
    make_repo(exported_repo, tmp_path / "repo", ("lenet5",))
    other = run_cli("export", "lenet5", "--backend", "openvino", "--repo",
                    str(tmp_path / "repo"), "--random-weights")
    assert other.returncode != 0
    assert "lenet5 is served by ONNX Runtime (CPU)" in other.stderr, other.stderr[-2000:]
    assert "another --name" in other.stderr
    assert sorted(p.name for p in (tmp_path / "repo" / "lenet5").iterdir()
                  if p.name.isdigit()) == ["1"]


def test_without_the_openvino_package_only_its_models_fail_naming_the_extra(exported_repo,
                                                                             tmp_path):
    blocker = tmp_path / "no-openvino"
    (blocker / "openvino").mkdir(parents=True)
    (blocker / "openvino" / "__init__.py").write_text(
        "raise ImportError(\"No module named 'openvino'\")\n")
    repo = make_repo(exported_repo, tmp_path / "repo", ("lenet5", "resnet18"),
                     overrides={"resnet18": OPENVINO})
    srv = start_server(repo, tmp_path / "server.log", env={"PYTHONPATH": str(blocker)})
    try:
        code, reason = state(srv, "resnet18")
        assert code == pb.MODEL_STATE_FAILED
        assert "visionserve[openvino]" in reason and "LOCK=openvino.txt" in reason, reason
        assert state(srv, "lenet5")[0] == pb.MODEL_STATE_READY
    finally:
        srv.stop()


def test_compiled_models_are_cached_reused_and_nothing_phones_home(exported_repo, tmp_path):
    """With --openvino-cache-dir the first load compiles into it and a restart imports from it
    (the file is not rewritten). OpenVINO's Python package sends telemetry from a forked process
    at import unless opted out: the server never lets it (no client id under $HOME/intel)."""
    repo = make_repo(exported_repo, tmp_path / "repo", ("resnet18",),
                     overrides={"resnet18": OPENVINO})
    cache, home = tmp_path / "ov-cache", tmp_path / "home"
    home.mkdir()
    env = {"HOME": str(home)}
    args = ("--openvino-cache-dir", str(cache))
    first = start_server(repo, tmp_path / "first.log", *args, env=env)
    first_answer = classify(first, "resnet18")
    first.stop()
    assert len(first_answer) == 5  # two empty answers would be equal too
    blobs = {p.name: p.stat().st_mtime_ns for p in cache.iterdir()}
    assert len(blobs) == 1, blobs
    second = start_server(repo, tmp_path / "second.log", *args, env=env)
    try:
        assert classify(second, "resnet18") == first_answer
        assert {p.name: p.stat().st_mtime_ns for p in cache.iterdir()} == blobs
    finally:
        second.stop()
    assert not (home / "intel").exists(), list((home / "intel").rglob("*"))


def test_an_unwritable_cache_dir_is_refused_at_start(tmp_path):
    blocked = tmp_path / "file"
    blocked.write_text("not a directory")
    result = run_cli("serve", "--repo", str(tmp_path), "--openvino-cache-dir",
                     str(blocked / "cache"), timeout=60)
    assert result.returncode == 2
    assert "--openvino-cache-dir" in result.stderr and "not a writable directory" in \
        result.stderr, result.stderr[-2000:]


def test_every_version_is_checked_on_the_engine_it_serves_on(exported_repo, tmp_path):
    """A config edit that moves a model to OpenVINO reloads it there, golden check included."""
    repo = make_repo(exported_repo, tmp_path / "repo", ("lenet5",))
    srv = start_server(repo, tmp_path / "server.log", "--model-control", "poll",
                       "--poll-interval-s", "0.3")
    try:
        before = srv.metric("visionserve_golden_checks_total", model="lenet5", result="passed")
        edit_config(repo / "lenet5", OPENVINO)
        eventually(lambda: srv.stub.GetModel(pb.GetModelRequest(model="lenet5")).backend
                   == "openvino", what="lenet5 to move to OpenVINO")
        eventually(lambda: srv.metric("visionserve_golden_checks_total", model="lenet5",
                                      result="passed") > before, what="a second golden check")
        assert state(srv, "lenet5") == (pb.MODEL_STATE_READY, "")
    finally:
        srv.stop()
