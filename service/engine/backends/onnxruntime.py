"""ONNX Runtime backend (CPU by default; CUDA / TensorRT execution providers by config)."""

from __future__ import annotations

import logging

import numpy as np
import onnxruntime as ort

from ...errors import BackendError, ConfigError
from ...format.model_config import ModelConfig
from ...format.repository import VersionEntry
from ...limits import cpu_count
from .base import Backend, ModelOutputs

log = logging.getLogger(__name__)

_OPT_LEVELS = {
    "disable": ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
    "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
    "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
    "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
}


class OnnxRuntimeBackend(Backend):
    def __init__(self, name: str, config: ModelConfig, version: VersionEntry) -> None:
        where = f"model {name} version {version.version}"
        cfg = config.onnxruntime
        available = ort.get_available_providers()
        usable = [p for p in cfg.providers if p in available]
        missing = [p for p in cfg.providers if p not in available]
        if not usable:
            raise ConfigError(f"{where}: none of onnxruntime.providers {list(cfg.providers)} is "
                              f"available in this onnxruntime build (available: {available}); "
                              "install visionserve[gpu] on a GPU host, or add "
                              "\"CPUExecutionProvider\" as a fallback")
        if missing:
            log.warning("%s: execution providers %s are not available in this onnxruntime "
                        "build; falling back to %s", where, missing, usable)
        if cfg.graph_optimization not in _OPT_LEVELS:
            raise ConfigError(f"{where}: onnxruntime.graph_optimization must be one of "
                              f"{list(_OPT_LEVELS)}, got {cfg.graph_optimization!r}")
        opts = ort.SessionOptions()
        # auto: each instance gets its share of the cores (instances run batches concurrently)
        opts.intra_op_num_threads = cfg.intra_op_threads or max(
            1, cpu_count() // config.instance_count)
        opts.inter_op_num_threads = cfg.inter_op_threads or 1
        opts.graph_optimization_level = _OPT_LEVELS[cfg.graph_optimization]
        opts.log_severity_level = 3
        if not cfg.allow_spinning:
            opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
            opts.add_session_config_entry("session.inter_op.allow_spinning", "0")
        try:
            self._session = ort.InferenceSession(str(version.model_file), opts,
                                                 providers=usable)
        except Exception as exc:  # onnxruntime raises its own untyped errors
            raise BackendError(f"{where}: onnxruntime could not load {version.model_file}: "
                               f"{exc}") from exc
        self.providers: list[str] = self._session.get_providers()  # in priority order
        self._input = config.input.name
        self._outputs = [config.output.logits, config.output.embedding]
        self._check_signature(where, config)

    def _check_signature(self, where: str, config: ModelConfig) -> None:
        inputs = {i.name: i for i in self._session.get_inputs()}
        outputs = {o.name: o for o in self._session.get_outputs()}
        if self._input not in inputs:
            raise ConfigError(f"{where}: input.name {self._input!r} is not an input of the "
                              f"model (it has {sorted(inputs)})")
        shape = inputs[self._input].shape
        if [d for d in shape[1:]] != list(config.input.shape):
            raise ConfigError(f"{where}: the model's input is {shape}, config.toml says "
                              f"[batch, {', '.join(map(str, config.input.shape))}]")
        for out in self._outputs:
            if out not in outputs:
                raise ConfigError(f"{where}: output {out!r} is not an output of the model "
                                  f"(it has {sorted(outputs)}); set [output] in config.toml")
        self.num_classes = _static_dim(outputs[self._outputs[0]].shape, where)
        self.embedding_dim = _static_dim(outputs[self._outputs[1]].shape, where)

    def run(self, batch: np.ndarray) -> ModelOutputs:
        logits, embedding = self._session.run(self._outputs, {self._input: batch})
        return ModelOutputs(np.asarray(logits, dtype=np.float32),
                            np.asarray(embedding, dtype=np.float32))

    def close(self) -> None:
        del self._session


def _static_dim(shape: list[object], where: str) -> int:
    dim = shape[-1] if shape else None
    if not isinstance(dim, int):
        raise ConfigError(f"{where}: output shape {shape} has no static last dimension")
    return dim
