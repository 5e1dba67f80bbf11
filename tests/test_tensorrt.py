"""The TensorRT path and GPU execution providers.

No machine of this project has a GPU or can install TensorRT, so the TensorRT code is checked
against RECORDING FAKES of its API (tests/fakes/tensorrt_fake.py): what we ask of TensorRT —
profile shapes, precision flags, tensors bound by name, version checks — not TensorRT itself.
Tests that need the real thing skip, saying why. docs/gpu.md lists what was and was not run."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from fakes import tensorrt_fake as fake

from conftest import make_repo, start_server
from visionserve.service.errors import ConfigError
from visionserve.service.format.model_config import InputSpec, ModelConfig
from visionserve.service.format.model_format import EMBEDDING, INPUT, LOGITS
from visionserve.service.format.repository import VersionEntry
from visionserve.v1 import visionserve_pb2 as pb


@pytest.fixture(autouse=True)
def clean_fake():
    fake.calls.clear()
    fake.OnnxParser.errors = []
    fake.Builder.fail_build = False
    yield


def build(tmp_path: Path, **kwargs):
    from visionserve.export.tensorrt_build import build_engine

    onnx = tmp_path / "model.onnx"
    onnx.write_bytes(b"onnx")
    args = {"input_name": INPUT, "input_shape": (3, 224, 224), "max_batch_size": 32,
            "fp16": False, "trt": fake, **kwargs}
    return build_engine(onnx, tmp_path / "model.plan", **args)


def test_engine_profile_covers_batch_1_to_max_with_the_input_named(tmp_path):
    record = build(tmp_path)
    profiles = [c[1] for c in fake.calls if c[0] == "add_optimization_profile"]
    assert profiles == [{INPUT: ((1, 3, 224, 224), (16, 3, 224, 224), (32, 3, 224, 224))}]
    assert ("create_network", 0) in fake.calls  # explicit batch: TensorRT 10's only mode
    assert (tmp_path / "model.plan").read_bytes() == b"FAKE-PLAN"
    assert record["profile"]["max"] == [32, 3, 224, 224] and record["version"] == fake.__version__


def test_fp16_flag_is_set_only_when_asked(tmp_path):
    build(tmp_path, fp16=False)
    build(tmp_path, fp16=True)
    flags = [c[1] for c in fake.calls if c[0] == "build_serialized_network"]
    assert flags == [[], ["FP16"]]


def test_timing_cache_is_loaded_and_saved(tmp_path):
    cache = tmp_path / "timing.cache"
    cache.write_bytes(b"old")
    build(tmp_path, timing_cache=cache)
    assert ("create_timing_cache", b"old") in fake.calls
    assert cache.read_bytes() == b"CACHE:old+new"


def test_parser_errors_and_failed_builds_are_clear(tmp_path):
    from visionserve.export.tensorrt_build import TensorRTError

    fake.OnnxParser.errors = ["node 7: unsupported op"]
    with pytest.raises(TensorRTError, match="could not parse .*node 7: unsupported op"):
        build(tmp_path)
    fake.OnnxParser.errors = []
    fake.Builder.fail_build = True
    with pytest.raises(TensorRTError, match="failed to build an engine"):
        build(tmp_path)


def backend(tmp_path: Path, recorded_version: str | None = None, max_batch_size: int = 16):
    from visionserve.service.engine.backends.tensorrt import TensorRTBackend

    (tmp_path / "model.plan").write_bytes(b"FAKE-PLAN")
    if recorded_version:
        (tmp_path / "export.json").write_text(json.dumps(
            {"tensorrt": {"version": recorded_version}}))
    config = ModelConfig(backend="tensorrt", max_batch_size=max_batch_size,
                         input=InputSpec(height=8, width=8, resize=8))
    entry = VersionEntry(version=1, path=tmp_path, model_file=tmp_path / "model.plan",
                         labels=())
    return TensorRTBackend("m", config, entry, trt=fake, cudart=fake.cudart)


def test_backend_binds_tensors_by_name_and_returns_each_images_outputs(tmp_path):
    engine = backend(tmp_path)
    assert (engine.num_classes, engine.embedding_dim) == (5, 4)
    x = np.random.default_rng(0).standard_normal((3, 3, 8, 8)).astype(np.float32)
    out = engine.run(x)
    sums = x.reshape(3, -1).sum(1, keepdims=True)
    np.testing.assert_allclose(out.logits, sums * np.arange(1, 6), rtol=1e-5)
    np.testing.assert_allclose(out.embedding, x.reshape(3, -1).mean(1, keepdims=True)
                               * np.arange(1, 5), rtol=1e-5)
    assert ("set_input_shape", INPUT, (3, 3, 8, 8)) in fake.calls
    bound = {c[1] for c in fake.calls if c[0] == "set_tensor_address"}
    assert bound == {INPUT, LOGITS, EMBEDDING}
    copies = [c[1:] for c in fake.calls if c[0] == "cudaMemcpyAsync"]
    assert copies == [("cudaMemcpyHostToDevice", 3 * 3 * 8 * 8 * 4),
                      ("cudaMemcpyDeviceToHost", 3 * 5 * 4),
                      ("cudaMemcpyDeviceToHost", 3 * 4 * 4)]
    engine.close()
    assert len(fake.cudart.freed) >= 3


def test_backend_refuses_an_engine_from_another_tensorrt_version(tmp_path):
    with pytest.raises(ConfigError, match="built with TensorRT 8.6.1, this server runs"):
        backend(tmp_path, recorded_version="8.6.1")


def test_backend_refuses_a_profile_smaller_than_max_batch_size(tmp_path):
    with pytest.raises(ConfigError, match="allows batches up to 16, below max_batch_size = 64"):
        backend(tmp_path, max_batch_size=64)


def test_without_tensorrt_a_tensorrt_model_fails_alone_with_the_reason(exported_repo, tmp_path):
    try:
        import tensorrt  # noqa: F401
    except ImportError:
        pass
    else:
        pytest.skip("tensorrt is installed: this test covers the machine without it")
    repo = make_repo(exported_repo, tmp_path / "repo", ("lenet5",))
    trt_model = repo / "lenet5_trt"
    (trt_model / "1").mkdir(parents=True)
    (trt_model / "1" / "model.plan").write_bytes(b"engine")
    config = (repo / "lenet5" / "config.toml").read_text()
    assert 'backend = "onnxruntime"' in config  # else the model below is not a TensorRT one
    (trt_model / "config.toml").write_text(config.replace('backend = "onnxruntime"',
                                                          'backend = "tensorrt"'))
    srv = start_server(repo, tmp_path / "server.log", "--model-control", "none")
    try:
        info = srv.stub.GetModel(pb.GetModelRequest(model="lenet5_trt"))
        assert info.state == pb.MODEL_STATE_FAILED
        assert "tensorrt" in info.reason and "visionserve[gpu]" in info.reason
        assert srv.stub.GetModel(pb.GetModelRequest(model="lenet5")).state == \
            pb.MODEL_STATE_READY
    finally:
        srv.stop()


def test_gpu_providers_fall_back_to_cpu_in_order_and_fail_clearly_without_one(exported_repo,
                                                                             tmp_path):
    repo = make_repo(exported_repo, tmp_path / "repo", ("lenet5", "mobilenet_v3_small"), {
        "lenet5": {"onnxruntime.providers": ["TensorrtExecutionProvider",
                                             "CUDAExecutionProvider", "CPUExecutionProvider"]},
        "mobilenet_v3_small": {"onnxruntime.providers": ["CUDAExecutionProvider"]}})
    srv = start_server(repo, tmp_path / "server.log", "--model-control", "none")
    try:
        assert srv.stub.GetModel(pb.GetModelRequest(model="lenet5")).state == \
            pb.MODEL_STATE_READY
        assert "falling back to ['CPUExecutionProvider']" in srv.log()
        info = srv.stub.GetModel(pb.GetModelRequest(model="mobilenet_v3_small"))
        assert info.state == pb.MODEL_STATE_FAILED
        assert "none of onnxruntime.providers ['CUDAExecutionProvider']" in info.reason
    finally:
        srv.stop()


def test_real_tensorrt_engine_is_exported_checked_and_served(tmp_path):
    pytest.importorskip("tensorrt", reason="TensorRT is not installable here (no GPU; its PyPI "
                                           "packages download from NVIDIA's servers)")
    from conftest import run_cli

    repo = tmp_path / "repo"
    out = run_cli("export", "resnet18", "--repo", str(repo), "--format", "tensorrt",
                  "--precision", "fp16")
    assert out.returncode == 0, out.stderr
    record = json.loads((repo / "resnet18" / "1" / "export.json").read_text())
    assert record["tensorrt"]["fp16"] and record["tensorrt"]["logits_max_rel_diff"] < 3e-2
    srv = start_server(repo, tmp_path / "server.log", "--model-control", "none")
    try:
        x = np.zeros((3, 224, 224), np.float32)
        from conftest import tensor_image

        reply = srv.stub.Classify(pb.ClassifyRequest(model="resnet18", images=[tensor_image(x)]))
        assert len(reply.results[0].classes) == 5
    finally:
        srv.stop()
