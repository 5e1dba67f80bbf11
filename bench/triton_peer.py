#!/usr/bin/env python3
"""The Triton peer of ``visionserve bench --peer triton``: run by a venv with ``nvidia-pytriton``.

Standalone on purpose (it never imports visionserve: PyTriton's pins clash with ours). It starts
the real ``tritonserver`` binary bundled in the PyTriton wheel and serves the given ONNX file
through Triton's Python backend and dynamic batcher, around an ONNX Runtime CPU session — the
same engine and model file visionserve serves. That is Triton's core with its *Python* backend:
the wheel has no native ONNX Runtime backend, so say so when quoting a comparison.

- ``--dtype float32``: input ``INPUT`` FP32 [C,H,W], already normalized (as sent to visionserve).
- ``--dtype uint8``: input UINT8 [H,W,C]; normalized in the backend with ``--mean``/``--std``
  (the same arithmetic visionserve does server-side for uint8 tensors).
- ``--batching on``: DynamicBatcher(max_queue_delay 2 ms, preferred sizes 8,16 — the settings of
  the peer measurements quoted in the benchmark issue), max_batch_size=N;
  ``off``: max_batch_size=1. Output ``logits`` FP32 [classes].
Prints READY when serving; stops on SIGINT/SIGTERM.
"""

import argparse
import logging
import signal
import sys

import numpy as np
import onnxruntime as ort
from pytriton.decorators import batch
from pytriton.model_config import DynamicBatcher, ModelConfig, Tensor
from pytriton.triton import Triton, TritonConfig


def floats(text):
    return tuple(float(x) for x in text.split(","))


def _parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--onnx", required=True)
    ap.add_argument("--model-name", required=True)
    ap.add_argument("--input-name", default="input")
    ap.add_argument("--shape", default="3,224,224", help="C,H,W")
    ap.add_argument("--dtype", choices=["float32", "uint8"], default="float32")
    ap.add_argument("--mean", type=floats, default=(0.485, 0.456, 0.406))
    ap.add_argument("--std", type=floats, default=(0.229, 0.224, 0.225))
    ap.add_argument("--batching", choices=["on", "off"], default="on")
    ap.add_argument("--max-batch", type=int, default=32)
    ap.add_argument("--delay-us", type=int, default=2000)
    ap.add_argument("--preferred", default="8,16")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--grpc-port", type=int, default=8001)
    ap.add_argument("--http-port", type=int, default=8000)
    ap.add_argument("--metrics-port", type=int, default=8002)
    return ap


def main():
    args = _parser().parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")

    so = ort.SessionOptions()
    so.intra_op_num_threads = args.threads
    so.inter_op_num_threads = 1
    so.add_session_config_entry("session.intra_op.allow_spinning", "0")
    sess = ort.InferenceSession(args.onnx, so, providers=["CPUExecutionProvider"])
    in_name, out_name = sess.get_inputs()[0].name, sess.get_outputs()[0].name
    classes = sess.get_outputs()[0].shape[-1]
    c, h, w = (int(x) for x in args.shape.split(","))
    lut = np.stack([(np.arange(256, dtype=np.float32) / np.float32(255) - np.float32(m))
                    / np.float32(s) for m, s in zip(args.mean, args.std, strict=True)])

    @batch
    def infer(**inputs):
        x = inputs[args.input_name]
        if x.dtype == np.uint8:  # [N,H,W,C] -> normalized float32 [N,C,H,W]
            x = np.stack([lut[ch][x[..., ch]] for ch in range(c)], axis=1)
        return {"logits": sess.run([out_name], {in_name: x})[0]}

    if args.dtype == "uint8":
        inputs = [Tensor(name=args.input_name, dtype=np.uint8, shape=(h, w, c))]
    else:
        inputs = [Tensor(name=args.input_name, dtype=np.float32, shape=(c, h, w))]
    if args.batching == "on":
        cfg = ModelConfig(max_batch_size=args.max_batch,
                          batcher=DynamicBatcher(
                              max_queue_delay_microseconds=args.delay_us,
                              preferred_batch_size=[int(b) for b in args.preferred.split(",")
                                                    if b and int(b) <= args.max_batch]))
    else:
        cfg = ModelConfig(max_batch_size=1,
                          batcher=DynamicBatcher(max_queue_delay_microseconds=0))
    tcfg = TritonConfig(grpc_port=args.grpc_port, http_port=args.http_port,
                        metrics_port=args.metrics_port, allow_metrics=False)
    with Triton(config=tcfg) as triton:
        triton.bind(model_name=args.model_name, infer_func=infer, inputs=inputs,
                    outputs=[Tensor(name="logits", dtype=np.float32, shape=(classes,))],
                    config=cfg, strict=False)
        print("READY", flush=True)  # noqa: T201 - the launcher waits for this line
        signal.signal(signal.SIGTERM, lambda *a: sys.exit(0))
        signal.signal(signal.SIGINT, lambda *a: sys.exit(0))
        triton.serve()


if __name__ == "__main__":
    main()
