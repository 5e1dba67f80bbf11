"""Load a local state_dict or training checkpoint into a freshly built model (no hub downloads)."""

from __future__ import annotations

import re
import warnings
from pathlib import Path

import torch
from torch import nn

from .errors import WeightsError
from .provided import from_efficientnet_pytorch, looks_like_efficientnet_pytorch

RESAVE = "re-save it with torch.save(model.state_dict(), path)"
# what a file torch.save wrote starts with: a zip archive (PyTorch >= 1.6), or a pickle
TORCH_MAGIC = (b"PK\x03\x04", b"\x80")


def _unreadable(path: Path, exc: OSError) -> str:
    if isinstance(exc, FileNotFoundError):
        return "no such file"
    if isinstance(exc, IsADirectoryError):
        return "is a directory; pass the .pt/.pth file in it"
    return f"cannot read it ({exc.strerror})"


def _not_a_state_dict(exc: Exception) -> str:
    """What ``torch.load(weights_only=True)`` refused, in a line a CLI user can act on (never
    PyTorch's advice to unpickle with ``weights_only=False``: that runs the file's code)."""
    text = str(exc)
    pickled = re.search(r"Unsupported global: GLOBAL ([\w.]+)", text)
    if pickled:
        qualified = pickled.group(1)
        return (f"this file is a pickled {qualified.rsplit('.', 1)[-1]} object ({qualified}), "
                f"not a state_dict; {RESAVE} (visionserve never unpickles code)")
    if "TorchScript" in text:
        return f"this file is a TorchScript module, not a state_dict; {RESAVE}"
    first_line = text.strip().splitlines()[0] if text.strip() else type(exc).__name__
    return f"not a readable PyTorch state_dict or checkpoint ({first_line[:200]}); {RESAVE}"


def load_weights(model: nn.Module, path: Path) -> str:
    """Load ``path`` into ``model`` strictly; return the file's sha256.

    Accepts a bare state_dict or a checkpoint nesting it under ``state_dict`` or ``model``, with
    or without the ``module.`` prefix DataParallel/DDP adds; an ``efficientnet_pytorch``
    checkpoint (``_conv_stem.weight``…) is renamed onto timm's EfficientNet layers.
    """
    import hashlib

    try:
        data = path.read_bytes()
    except OSError as exc:
        raise WeightsError(f"--weights {path}: {_unreadable(path, exc)}") from None
    digest = hashlib.sha256(data).hexdigest()
    if not data.startswith(TORCH_MAGIC):
        raise WeightsError(f"--weights {path} is not a PyTorch file (torch.save writes a zip "
                           f"archive or a pickle; this starts {data[:8]!r}): {RESAVE}")
    try:
        with warnings.catch_warnings():  # a TorchScript archive warns, then is refused below
            warnings.simplefilter("ignore")
            obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - torch raises many types for a bad file
        raise WeightsError(f"--weights {path}: {_not_a_state_dict(exc)}") from None
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
