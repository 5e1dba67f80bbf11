"""Triton's model configuration of a model folder, written once: the export stage writes it as
``config.pbtxt`` (so the repository runs on Triton unchanged) and KServe ModelConfig answers it.
The platform, model file and instance kind follow the model's backend: ``onnxruntime_onnx`` on
CPU (or GPU where a CUDA/TensorRT execution provider comes first), ``tensorrt_plan`` on GPU, and
Triton's ``openvino`` backend (no platform; it reads the same ``model.onnx``) with the parameters
that backend reads: ``NUM_STREAMS``, ``INFERENCE_NUM_THREADS``, ``PERFORMANCE_HINT`` and
``HINT_BF16: YES`` for bf16. Triton's backend has no FP32 switch: on a CPU with BF16 it computes
an ``fp32`` model in OpenVINO's default precision, BF16 (docs/config.md)."""

from __future__ import annotations

from typing import Any

from google.protobuf import text_format
from google.protobuf.message import Message

from visionserve.inference import model_config_pb2 as mc

from .model_config import ModelConfig
from .model_format import LABELS_FILE, MODEL_FILES, PLATFORMS

GPU_PROVIDERS = ("CUDAExecutionProvider", "TensorrtExecutionProvider")


def model_config(name: str, c: ModelConfig, num_classes: int,
                 embedding_dim: int, weights: str = "") -> mc.ModelConfig:
    """Triton's configuration of a model folder; of a served version, with where its weights
    came from (``weights``, format/provenance.py) as the parameter ``weights``."""
    policy = c.version_policy
    if policy.all:
        vp = mc.ModelVersionPolicy(all=mc.ModelVersionPolicy.All())
    elif policy.specific:
        vp = mc.ModelVersionPolicy(specific=mc.ModelVersionPolicy.Specific(
            versions=list(policy.specific)))
    else:
        vp = mc.ModelVersionPolicy(latest=mc.ModelVersionPolicy.Latest(
            num_versions=policy.latest))
    gpu = c.backend == "tensorrt" or (c.backend == "onnxruntime" and c.onnxruntime.providers[:1]
                                      in [(p,) for p in GPU_PROVIDERS])
    b = c.batching
    # the input forms visionserve accepts beyond the FP32 tensor (Triton ignores the key)
    parameters = {"visionserve.input_forms": mc.ModelParameter(
        string_value=c.input.describe_forms())}
    if c.backend == "openvino":  # the keys Triton's openvino_backend reads for the CPU
        ov = c.openvino
        parameters.update({
            "NUM_STREAMS": str(ov.streams or c.instance_count),
            "PERFORMANCE_HINT": "LATENCY",
            **({"INFERENCE_NUM_THREADS": str(ov.threads)} if ov.threads else {}),
            **({"HINT_BF16": "YES"} if ov.precision == "bf16" else {}),
        })
        parameters = {k: v if isinstance(v, mc.ModelParameter) else
                      mc.ModelParameter(string_value=v) for k, v in parameters.items()}
    if weights:
        parameters["weights"] = mc.ModelParameter(string_value=weights)
    return mc.ModelConfig(
        # Triton names OpenVINO by its backend only (it has no platform string)
        name=name, platform="" if c.backend == "openvino" else PLATFORMS[c.backend],
        backend=c.backend, version_policy=vp,
        max_batch_size=c.max_batch_size,
        input=[mc.ModelInput(name=c.input.name, data_type=mc.TYPE_FP32,
                             format=mc.ModelInput.FORMAT_NCHW, dims=list(c.input.shape))],
        output=[mc.ModelOutput(name=c.output.logits, data_type=mc.TYPE_FP32,
                               dims=[num_classes], label_filename=LABELS_FILE),
                mc.ModelOutput(name=c.output.embedding, data_type=mc.TYPE_FP32,
                               dims=[embedding_dim])],
        dynamic_batching=mc.ModelDynamicBatching(
            preferred_batch_size=list(b.preferred_batch_sizes),
            max_queue_delay_microseconds=int(b.max_queue_delay_ms * 1000),
            default_queue_policy=mc.ModelQueuePolicy(
                max_queue_size=b.max_queue_size,
                default_timeout_microseconds=int(b.default_timeout_ms * 1000),
                allow_timeout_override=True)),
        instance_group=[mc.ModelInstanceGroup(
            kind=mc.ModelInstanceGroup.KIND_GPU if gpu else mc.ModelInstanceGroup.KIND_CPU,
            count=c.instance_count)],
        default_model_filename=MODEL_FILES[c.backend], parameters=parameters)


def model_config_text(name: str, c: ModelConfig, num_classes: int, embedding_dim: int) -> str:
    """The same, as Triton's ``config.pbtxt`` (protobuf text format)."""
    return text_format.MessageToString(model_config(name, c, num_classes, embedding_dim))


def model_config_json(name: str, c: ModelConfig, num_classes: int,
                      embedding_dim: int, weights: str = "") -> dict[str, Any]:
    """The same configuration as Triton's REST API writes it (``GET .../config``)."""
    return proto_json(model_config(name, c, num_classes, embedding_dim, weights))


def proto_json(message: Message) -> dict[str, Any]:
    """A protobuf message as Triton's REST JSON writes it: field names as in the .proto, 64-bit
    integers as numbers (protobuf's own JSON writes them as strings), enums by name, scalars
    and lists even when empty or zero (``"fail": {"count": 0, "ns": 0}``); unset messages and
    oneof members left out."""
    out: dict[str, Any] = {}
    for field in message.DESCRIPTOR.fields:
        value = getattr(message, field.name)
        entry = field.message_type
        if entry is not None and entry.GetOptions().map_entry:
            value_field = entry.fields_by_name["value"]
            out[field.name] = {k: _scalar(value_field, v) for k, v in value.items()}
        elif field.is_repeated:
            out[field.name] = [_scalar(field, v) for v in value]
        elif (entry is not None or field.containing_oneof is not None) \
                and not message.HasField(field.name):
            continue
        else:
            out[field.name] = _scalar(field, value)
    return out


def _scalar(field: Any, value: Any) -> Any:
    if field.message_type is not None:
        return proto_json(value)
    if field.enum_type is not None:
        return field.enum_type.values_by_number[value].name
    if isinstance(value, bytes):
        return value.decode("utf-8", errors="replace")
    return value
