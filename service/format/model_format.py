"""The model repository's format, named once: written by the export stage, read by the service.

    <repo>/<model>/config.toml      this model's config (schema: ``model_config.ModelConfig``)
    <repo>/<model>/labels.txt       class names, one per line (a version's own file wins)
    <repo>/<model>/config.pbtxt     Triton's config of the same folder (``triton_config``)
    <repo>/<model>/<N>/model.onnx   (ONNX Runtime, OpenVINO) or model.plan (TensorRT);
                                    N = 1, 2, … (published by rename)

Every model takes one input tensor and computes two outputs in one forward pass. Their default
names are these; a model's ``config.toml`` may rename them (``[input] name``, ``[output]``).
"""

from __future__ import annotations

INPUT = "input"  # FP32 [N, C, H, W], normalized
LOGITS = "logits"  # FP32 [N, classes], before softmax
EMBEDDING = "embedding"  # FP32 [N, D], the penultimate layer (pooled features)
OUTPUTS = (LOGITS, EMBEDDING)

CONFIG_FILE = "config.toml"
LABELS_FILE = "labels.txt"
TRITON_CONFIG_FILE = "config.pbtxt"
# OpenVINO reads the same ONNX file (FP32, or INT8 QDQ) and compiles it itself
MODEL_FILES = {"onnxruntime": "model.onnx", "openvino": "model.onnx", "tensorrt": "model.plan"}

# the Triton platform each backend's model folder is served as (config.pbtxt, KServe metadata)
PLATFORMS = {"onnxruntime": "onnxruntime_onnx", "openvino": "openvino", "tensorrt": "tensorrt_plan"}
