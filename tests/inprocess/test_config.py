"""config.toml: one validated dataclass; every error names the file and the key."""

from __future__ import annotations

from pathlib import Path

import pytest

from visionserve.service.errors import ConfigError
from visionserve.service.format.model_config import (
    DECODERS,
    ModelConfig,
    OpenVinoConfig,
    VersionPolicy,
)


def load(tmp_path: Path, text: str) -> ModelConfig:
    path = tmp_path / "config.toml"
    path.write_text(text)
    return ModelConfig.from_toml(path)


def test_defaults_are_a_valid_imagenet_classifier(tmp_path):
    config = load(tmp_path, "")
    assert config.input.shape == (3, 224, 224) and config.max_batch_size == 32
    assert config.batching.max_queue_delay_ms == 0


def test_what_export_writes_reads_back_identically(tmp_path):
    original = ModelConfig(max_batch_size=8, description='say "hi"',
                           version_policy=VersionPolicy(specific=(1, 3)))
    assert load(tmp_path, original.to_toml()) == original
    openvino = ModelConfig(backend="openvino", instance_count=2,
                           openvino=OpenVinoConfig(precision="bf16", threads=4, streams=2))
    assert load(tmp_path, openvino.to_toml()) == openvino
    # each engine's section only under its own backend
    assert "[onnxruntime]" not in openvino.to_toml() and "[openvino]" not in original.to_toml()


@pytest.mark.parametrize("text, message", [
    ("max_batch_sise = 4", "unknown key max_batch_sise"),
    ("[input]\nmean = [0.5]", "input.mean needs one value per channel (3)"),
    ("[input]\ninterpolation = 'cubic'", "input.interpolation must be one of"),
    ("[batching]\nmax_queue_delay_ms = 'soon'", "batching.max_queue_delay_ms must be a number"),
    ("max_batch_size = 64\n[batching]\nmax_queue_size = 8",
     "batching.max_queue_size must be >= max_batch_size (64)"),
    ("[warmup]\nbatch_sizes = [1, 99]", "warmup.batch_sizes must lie in 1..max_batch_size"),
    ("backend = 'tflite'", "backend must be one of"),
    ("[input]\ndecoder = 'turbo'", f"input.decoder must be one of {DECODERS}"),
    ("max_batch_size = [", "not valid TOML"),
    ("backend = 'openvino'\n[openvino]\nprecision = 'fp16'", "openvino.precision must be one of"),
    ("backend = 'openvino'\n[openvino]\nstreams = 2",
     "openvino.streams must lie in 0..instance_count (1"),
    ("instance_count = 2\n[openvino]\nthreads = 1", "must be 0 or at least one per stream"),
])
def test_a_bad_value_names_the_file_and_key(tmp_path, text, message):
    with pytest.raises(ConfigError) as info:
        load(tmp_path, text)
    assert str(tmp_path / "config.toml") in str(info.value)
    assert message in str(info.value)


def test_version_policies_select_versions_newest_first():
    on_disk = [1, 2, 3, 5]
    assert VersionPolicy().select(on_disk) == [5]
    assert VersionPolicy(latest=2).select(on_disk) == [5, 3]
    assert VersionPolicy(specific=(1, 3, 4)).select(on_disk) == [3, 1]
    assert VersionPolicy(all=True).select(on_disk) == [5, 3, 2, 1]
