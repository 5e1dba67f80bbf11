"""PyTorch → ONNX with a dynamic batch axis, one input and two named outputs (``model_format``)."""

from __future__ import annotations

import contextlib
import io
import logging
import warnings
from pathlib import Path

import torch
from torch import nn

from visionserve.service.format import model_format

log = logging.getLogger(__name__)

OPSET = 20
INPUT_NAME = model_format.INPUT
OUTPUT_NAMES = model_format.OUTPUTS


def export_onnx(model: nn.Module, sample: torch.Tensor, path: Path, max_batch_size: int,
                external_data: bool = False) -> str:
    """Write ``path``; return the exporter used (``dynamo``, or ``torchscript`` as fallback).

    The dynamo-based exporter is the default; if it fails for an architecture, the
    TorchScript-based one is tried and the choice is recorded by the caller in export.json.
    """
    try:
        with _quiet():
            batch = torch.export.Dim("batch", min=1, max=max(2, max_batch_size))
            torch.onnx.export(model, (sample,), str(path), dynamo=True, opset_version=OPSET,
                              input_names=[INPUT_NAME], output_names=list(OUTPUT_NAMES),
                              dynamic_shapes={"x": {0: batch}}, external_data=external_data,
                              verbose=False)
        return "dynamo"
    except Exception as exc:  # noqa: BLE001 - any exporter failure falls back, logged
        log.warning("dynamo exporter failed (%s); falling back to the TorchScript exporter", exc)
    with _quiet():
        torch.onnx.export(model, (sample,), str(path), dynamo=False, opset_version=OPSET,
                          input_names=[INPUT_NAME], output_names=list(OUTPUT_NAMES),
                          dynamic_axes={name: {0: "batch"} for name in (INPUT_NAME, *OUTPUT_NAMES)})
    return "torchscript"


@contextlib.contextmanager
def _quiet():  # type: ignore[no-untyped-def]
    """The exporters narrate every pass on stdout; our progress bar says enough."""
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
        warnings.simplefilter("ignore")
        yield
