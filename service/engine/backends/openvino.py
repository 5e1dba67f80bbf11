"""OpenVINO backend: the same ``model.onnx`` (FP32 or INT8 QDQ) compiled by OpenVINO's CPU plugin,
in FP32 or BF16 (``[openvino] precision``).

One compiled model per version with a dynamic batch dimension (the ONNX export's own), run by
``streams`` CPU streams; ``run`` borrows one infer request per call, so the instances of the
batcher run their batches concurrently. Dynamic shapes rather than one model reshaped per batch
size: on ResNet-50 (2 threads) 14.9 / 15.8 images/s at batch 1 / 8, against 15.6 / 15.4 for one
static model per size, in the same run; one compilation (0.39 s) instead of one per batch size
(0.30–0.50 s each, up to max_batch_size of them) — docs/benchmarks.md, "The CPU precision ladder".

With ``--openvino-cache-dir`` the compiled model is kept there (OpenVINO's ``CACHE_DIR``): a
reload or a restart imports it instead of compiling. The directory is the operator's (the
repository may be read-only); entries are keyed by OpenVINO on the model and its settings.
Measured on ResNet-50: a load takes 0.43 s without the cache, 0.50 s the first time with it (the
compiled blob is written: 47 MB for ResNet-18) and 0.30 s from it.
"""

from __future__ import annotations

import importlib
import logging
import queue
import sys
from pathlib import Path
from types import ModuleType

import numpy as np

from ...errors import BackendError, ConfigError
from ...format.model_config import ModelConfig
from ...format.repository import VersionEntry
from ...limits import cpu_count
from .base import Backend, ModelOutputs

log = logging.getLogger(__name__)

# config value -> OpenVINO's INFERENCE_PRECISION_HINT, and the CPU capability it needs
PRECISION_HINTS = {"fp32": "f32", "bf16": "bf16"}
CAPABILITIES = {"fp32": "FP32", "bf16": "BF16"}


def _import_openvino(where: str) -> ModuleType:
    """``import openvino`` without its telemetry. The package pulls in ``openvino_telemetry``,
    which on import (through ``openvino.tools.ovc``) writes a client id under ``~/intel`` and
    forks a process to send usage events to Google Analytics, unless a consent file says no.
    A server must not phone home, nor fork inside a multithreaded gRPC process. With the module
    unimportable OpenVINO falls back to its own no-op stub (``ovc.telemetry_stub``)."""
    if "openvino" not in sys.modules:
        sys.modules.setdefault("openvino_telemetry", None)  # None: ImportError on import
    try:
        return importlib.import_module("openvino")
    except ImportError:
        raise ConfigError(f"{where}: backend = \"openvino\" needs the `openvino` package: "
                          "install visionserve[openvino] (or the serve image built with "
                          "--build-arg LOCK=openvino.txt), or set backend = \"onnxruntime\" "
                          "in its config.toml") from None


def cpu_capabilities() -> list[str]:
    """What OpenVINO's CPU plugin says this CPU computes natively (FP32, BF16, INT8…); empty
    when OpenVINO is not installed."""
    try:
        ov = _import_openvino("cpu_capabilities")
    except ConfigError:
        return []
    return [str(c) for c in ov.Core().get_property("CPU", "OPTIMIZATION_CAPABILITIES")]


class OpenVinoBackend(Backend):
    def __init__(self, name: str, config: ModelConfig, version: VersionEntry,
                 cache_dir: Path | None = None) -> None:
        where = f"model {name} version {version.version}"
        ov = _import_openvino(where)
        cfg = config.openvino
        try:
            core = ov.Core()
            capabilities = [str(c) for c in core.get_property("CPU",
                                                              "OPTIMIZATION_CAPABILITIES")]
        except Exception as exc:  # OpenVINO raises RuntimeError with its own text
            raise BackendError(f"{where}: OpenVINO's CPU plugin is not usable here: "
                               f"{exc}") from exc
        if CAPABILITIES[cfg.precision] not in capabilities:
            raise ConfigError(f"{where}: openvino.precision = \"{cfg.precision}\" needs a CPU "
                              f"that computes {CAPABILITIES[cfg.precision]} natively (AVX512_BF16 "
                              "or AMX: Intel Sapphire Rapids or later, AMD Zen 4 or later); this "
                              f"CPU offers {capabilities}. Serve this model with precision = "
                              "\"fp32\" here, or on such a CPU")
        streams = cfg.streams or config.instance_count
        properties = {
            # explicit, always: OpenVINO's default is BF16 wherever the CPU has it
            "INFERENCE_PRECISION_HINT": PRECISION_HINTS[cfg.precision],
            "INFERENCE_NUM_THREADS": cfg.threads or cpu_count(),
            "NUM_STREAMS": streams,
            "PERFORMANCE_HINT": "LATENCY",  # no automatic stream count: ours is explicit
            "ENABLE_CPU_PINNING": cfg.cpu_pinning,
        }
        if cache_dir is not None:
            properties["CACHE_DIR"] = str(cache_dir)
        try:
            model = core.read_model(str(version.model_file))
            self._check_signature(where, config, model)
            self._compiled = core.compile_model(model, "CPU", properties)
        except ConfigError:
            raise
        except Exception as exc:  # OpenVINO raises RuntimeError with its own text
            raise BackendError(f"{where}: OpenVINO could not compile {version.model_file}: "
                               f"{exc}") from exc
        self.precision = cfg.precision
        self.streams = streams
        self._input = config.input.name
        self._outputs = [self._compiled.output(n) for n in (config.output.logits,
                                                            config.output.embedding)]
        # one infer request per concurrent batch (an infer request runs one batch at a time);
        # the batcher runs at most instance_count batches at once
        self._requests: queue.SimpleQueue = queue.SimpleQueue()
        for _ in range(config.instance_count):
            self._requests.put(self._compiled.create_infer_request())
        self._where = where
        self._closed = False
        self.providers = [f"OpenVINO {ov.__version__} CPU {cfg.precision.upper()}"]

    def _check_signature(self, where: str, config: ModelConfig, model: object) -> None:
        inputs = {n: i for i in model.inputs for n in i.get_names()}
        outputs = {n: o for o in model.outputs for n in o.get_names()}
        name = config.input.name
        if name not in inputs:
            raise ConfigError(f"{where}: input.name {name!r} is not an input of the model "
                              f"(it has {sorted(inputs)})")
        shape = inputs[name].get_partial_shape()
        dims = [d.get_length() if d.is_static else None for d in shape]
        if dims[1:] != list(config.input.shape):
            raise ConfigError(f"{where}: the model's input is {shape}, config.toml says "
                              f"[batch, {', '.join(map(str, config.input.shape))}]")
        if dims[0] is not None:
            # a fixed batch (a hand-made model): make it dynamic, as the batcher needs
            model.reshape({name: [-1, *config.input.shape]})
        sizes = []
        for out in (config.output.logits, config.output.embedding):
            if out not in outputs:
                raise ConfigError(f"{where}: output {out!r} is not an output of the model "
                                  f"(it has {sorted(outputs)}); set [output] in config.toml")
            last = outputs[out].get_partial_shape()[-1]
            if not last.is_static:
                raise ConfigError(f"{where}: output {out!r} has no static last dimension "
                                  f"({outputs[out].get_partial_shape()})")
            sizes.append(last.get_length())
        self.num_classes, self.embedding_dim = sizes

    def run(self, batch: np.ndarray) -> ModelOutputs:
        if self._closed:
            raise BackendError(f"{self._where}: the OpenVINO engine was released")
        request = self._requests.get()
        try:
            result = request.infer({self._input: batch})  # copies the outputs out
            logits, embedding = (np.asarray(result[o], dtype=np.float32) for o in self._outputs)
        finally:
            self._requests.put(request)
        return ModelOutputs(logits, embedding)

    def close(self) -> None:
        """Release the compiled model. The batcher's executor has finished every batch first."""
        if self._closed:
            return
        self._closed = True
        while not self._requests.empty():
            self._requests.get()
        del self._compiled
