"""The model an export starts from: the architecture built with its weights (a file, the
architecture's default, or a seeded random init made alive), wrapped so that it computes the
embedding beside the logits."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from .architectures import Architecture, WithEmbedding, reinit_dead_head
from .precision import recalibrate_batchnorm
from .provided import load_default
from .weights import load_weights


@dataclass
class Built:
    """The model as exported: wrapped with its embedding output, and where its weights came
    from (the provenance's ``weights_source``)."""

    wrapped: WithEmbedding
    weights_record: dict[str, object]
    head_reinitialised: bool
    bn_recalibrated: bool


def build_model(arch: Architecture, num_classes: int, weights: Path | None,
                random_weights: bool, seed: int) -> Built:
    """The architecture with its weights: a file, the architecture's default, or a seeded
    random init made alive (a dead head re-initialised, BatchNorm statistics re-estimated)."""
    torch.manual_seed(seed)
    model = arch.build(num_classes)
    # default weights have the architecture's own head: another class count starts random
    random_init = not weights and (random_weights or not arch.weights
                                       or num_classes != arch.num_classes)
    weights_record: dict[str, object]
    if weights:
        weights_record = {"kind": "file", "source": f"file {weights.name}",
                          "sha256": load_weights(model, weights)}
    elif not random_init:
        provided = load_default(arch.weights, model, seed)
        weights_record = {"kind": "pretrained", "source": provided.source,
                          "sha256": provided.sha256,
                          **provided.details}
    else:
        weights_record = {"kind": "random", "source": f"seeded random init (seed {seed})"}
    wrapped = WithEmbedding(model, arch.head_path(model)).eval()
    head_reinitialised = random_init and reinit_dead_head(wrapped.head)
    # random init is degenerate (tiny, huge or input-independent outputs): make it alive
    bn_recalibrated = random_init and recalibrate_batchnorm(wrapped, arch.input.shape, seed)
    if bn_recalibrated:
        weights_record["source"] += ", BatchNorm statistics re-estimated on seeded noise"
    return Built(wrapped, weights_record, head_reinitialised, bn_recalibrated)
