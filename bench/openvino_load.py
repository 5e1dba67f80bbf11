"""Design measurements of the OpenVINO backend, in one run (docs/benchmarks.md):

1. Dynamic batch vs one static model per batch size: compile time, and images/s at batch 1 and 8
   (repeats interleaved, median), same threads and precision.
2. Load time of ``OpenVinoBackend`` (what the server runs per version load) without a cache,
   with a cold ``--openvino-cache-dir`` (compile + write) and with a warm one (import).
3. The kernels OpenVINO's CPU plugin picks for the convolutions and matmuls of each model file
   (its runtime model): whether INT8 runs on VNNI/AMX kernels or on AVX2 emulation; and how far
   OpenVINO's outputs are from ONNX Runtime's on the same file (max |Δ| over the largest |logit|,
   seeded inputs at batch 1 and 8): why an INT8 golden set is engine-specific.

    python -m visionserve.bench.openvino_load --model-file model_repo/resnet50/1/model.onnx \
        --kernels model_repo/resnet50_int8_ov/1/model.onnx
"""

from __future__ import annotations

import argparse
import json
import shlex
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from visionserve.service.engine.backends.openvino import OpenVinoBackend, _import_openvino
from visionserve.service.format.model_config import ModelConfig
from visionserve.service.format.repository import VersionEntry
from visionserve.service.limits import cpu_count


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m visionserve.bench.openvino_load",
                                description=__doc__.split("\n\n")[0])
    p.add_argument("--model-file", type=Path, required=True, help="an exported model.onnx")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--seconds", type=float, default=2.0, help="per batch size and repeat")
    p.add_argument("--kernels", type=Path, nargs="*", default=[],
                   help="more model files whose kernels to list (e.g. an INT8 export)")
    p.add_argument("--json", type=Path)
    args = p.parse_args(argv)
    ov = _import_openvino("bench")
    core = ov.Core()
    props = {"INFERENCE_PRECISION_HINT": "f32", "INFERENCE_NUM_THREADS": cpu_count(),
             "NUM_STREAMS": 1, "PERFORMANCE_HINT": "LATENCY", "ENABLE_CPU_PINNING": False}
    shape = [d.get_length() for d in core.read_model(str(args.model_file)).inputs[0]
             .get_partial_shape()[1:]]
    x = {b: np.random.default_rng(0).standard_normal((b, *shape), dtype=np.float32)
         for b in (1, 8)}
    compile_s, speed = _compile_and_speed(core, args.model_file, props, shape, x, args.repeats,
                                          args.seconds)
    load_s = _load_times(args.model_file, shape, args.repeats)
    result = {
        "command": "python -m visionserve.bench.openvino_load " + shlex.join(
            argv if argv is not None else sys.argv[1:]),
        "openvino": ov.__version__, "threads": cpu_count(),
        "compile_s": {k: round(v, 3) for k, v in compile_s.items()},
        "images_per_s": {k: {b: round(statistics.median(v), 1) for b, v in per.items()}
                         for k, per in speed.items()},
        "load_s_median": {k: round(statistics.median(v), 3) for k, v in load_s.items()},
        "kernels": {str(f): _kernels(core, f) for f in [args.model_file, *args.kernels]},
        "openvino_vs_onnxruntime": {str(f): _vs_onnxruntime(core, f, x)
                                    for f in [args.model_file, *args.kernels]},
    }
    sys.stdout.write(json.dumps(result, indent=2) + "\n")
    if args.json:
        args.json.write_text(json.dumps(result, indent=2) + "\n")
    return 0


def _compile_and_speed(core, model_file: Path, props: dict[str, object], shape: list[int],
                       x: dict[int, np.ndarray], repeats: int, seconds: float
                       ) -> tuple[dict[str, float], dict[str, dict[int, list[float]]]]:
    """Compile time and images/s of the model compiled once with a dynamic batch, and once
    per batch size with a static one."""
    compile_s: dict[str, float] = {}
    start = time.perf_counter()
    dynamic = core.compile_model(core.read_model(str(model_file)), "CPU", props)
    compile_s["dynamic"] = time.perf_counter() - start
    static = {}
    for b in x:
        model = core.read_model(str(model_file))
        model.reshape({model.inputs[0].get_any_name(): [b, *shape]})
        start = time.perf_counter()
        static[b] = core.compile_model(model, "CPU", props)
        compile_s[f"static batch {b}"] = time.perf_counter() - start
    requests = {"dynamic": {b: dynamic.create_infer_request() for b in x},
                "static": {b: static[b].create_infer_request() for b in x}}
    speed: dict[str, dict[int, list[float]]] = {k: {b: [] for b in x} for k in requests}
    for _ in range(repeats):
        for kind, per_batch in requests.items():
            for b, request in per_batch.items():
                request.infer({0: x[b]})
                n, start = 0, time.perf_counter()
                while (elapsed := time.perf_counter() - start) < seconds:
                    request.infer({0: x[b]})
                    n += b
                speed[kind][b].append(n / elapsed)
    return compile_s, speed


def _load_times(model_file: Path, shape: list[int], repeats: int) -> dict[str, list[float]]:
    """The server's OpenVINO backend loaded with no compile cache, a cold one, a warm one."""
    load_s: dict[str, list[float]] = {"no cache": [], "cold cache": [], "warm cache": []}
    config = ModelConfig(backend="openvino", input=_input(shape))
    entry = VersionEntry(version=1, path=model_file.parent, model_file=model_file,
                         labels=())
    for _ in range(repeats):
        with tempfile.TemporaryDirectory() as cache:
            for kind, cache_dir in (("no cache", None), ("cold cache", Path(cache)),
                                    ("warm cache", Path(cache))):
                start = time.perf_counter()
                OpenVinoBackend("bench", config, entry, cache_dir=cache_dir).close()
                load_s[kind].append(time.perf_counter() - start)
    return load_s


def _kernels(core, model_file: Path) -> dict[str, int]:
    """``{"Convolution u8 jit_avx2_1x1_I8": 36, …}``: layer type, runtime precision and the
    primitive OpenVINO chose, counted over the compiled model's convolutions and matmuls."""
    compiled = core.compile_model(str(model_file), "CPU", {"INFERENCE_PRECISION_HINT": "f32"})
    counts: dict[str, int] = {}
    for op in compiled.get_runtime_model().get_ops():
        info = {k: v.astype(str) for k, v in op.get_rt_info().items()}
        if info.get("layerType") in ("Convolution", "FullyConnected", "MatMul"):
            key = f"{info['layerType']} {info['runtimePrecision']} {info['primitiveType']}"
            counts[key] = counts.get(key, 0) + 1
    return dict(sorted(counts.items(), key=lambda kv: -kv[1]))


def _vs_onnxruntime(core, model_file: Path, x: dict[int, np.ndarray]) -> dict[int, float]:
    import onnxruntime as ort

    session = ort.InferenceSession(str(model_file), providers=["CPUExecutionProvider"])
    compiled = core.compile_model(str(model_file), "CPU", {"INFERENCE_PRECISION_HINT": "f32"})
    out = {}
    for b, batch in x.items():
        ref = session.run(["logits"], {"input": batch})[0]
        got = compiled.create_infer_request().infer({0: batch})[compiled.output("logits")]
        out[b] = float(np.abs(ref - got).max() / (np.abs(ref).max() or 1.0))
    return out


def _input(shape: list[int]):
    from visionserve.service.format.model_config import InputSpec

    c, h, w = shape
    return InputSpec(channels=c, height=h, width=w, color="L" if c == 1 else "RGB",
                     mean=(0.5,) * c, std=(0.5,) * c)


if __name__ == "__main__":
    sys.exit(main())
