"""Load a local state_dict or training checkpoint into a freshly built model (no hub downloads)."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from .errors import WeightsError
from .provided import from_efficientnet_pytorch, looks_like_efficientnet_pytorch


def load_weights(model: nn.Module, path: Path) -> str:
    """Load ``path`` into ``model`` strictly; return the file's sha256.

    Accepts a bare state_dict or a checkpoint nesting it under ``state_dict`` or ``model``, with
    or without the ``module.`` prefix DataParallel/DDP adds; an ``efficientnet_pytorch``
    checkpoint (``_conv_stem.weight``…) is renamed onto timm's EfficientNet layers.
    """
    import hashlib

    try:
        digest = hashlib.sha256(path.read_bytes()).hexdigest()
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - torch raises many types for a bad file
        raise WeightsError(f"{path} could not be read as a PyTorch state_dict or checkpoint "
                           f"({type(exc).__name__}: {exc}); pass the .pt/.pth file saved with "
                           "torch.save(model.state_dict(), path)") from None
    for key in ("state_dict", "model"):
        if isinstance(obj, dict) and isinstance(obj.get(key), dict):
            obj = obj[key]
    if not isinstance(obj, dict):
        raise WeightsError(f"{path}: expected a state_dict (a dict of tensors), got "
                           f"{type(obj).__name__}")
    state = {k.removeprefix("module."): v for k, v in obj.items()}
    expected = model.state_dict()
    if looks_like_efficientnet_pytorch(state) and not any(k in expected for k in state):
        state = from_efficientnet_pytorch(state, expected, str(path))
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    mismatched = [f"{k}: file {tuple(state[k].shape)} vs model {tuple(v.shape)}"
                  for k, v in expected.items() if k in state and state[k].shape != v.shape]
    if missing or unexpected or mismatched:
        parts = []
        if missing:
            parts.append(f"missing keys (first 5): {missing[:5]}")
        if unexpected:
            parts.append(f"unexpected keys (first 5): {unexpected[:5]}")
        if mismatched:
            parts.append(f"shape mismatches (first 5): {mismatched[:5]}")
        raise WeightsError(f"{path} does not fit the architecture: " + "; ".join(parts)
                           + " (for a fine-tuned head, pass --num-classes)")
    model.load_state_dict(state, strict=True)
    return digest
