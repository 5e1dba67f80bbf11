"""Numerical parity of an exported model against PyTorch, on seeded inputs at batch 1 and >1.
The exported model runs on the server's own backend for its config (``engines.open_engine``):
parity holds the engine, precision and settings that will serve it."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import numpy as np
import torch
from torch import nn

from visionserve.service.engine.backends import Backend

from .precision import MIN_REFERENCE_SCALE, MIN_REFERENCE_SPREAD, TOLERANCES, Tolerance


@dataclass(frozen=True, kw_only=True)
class ParityReport:
    batch_sizes: list[int]
    seed: int
    logits_max_abs_diff: float
    logits_max_rel_diff: float
    embedding_max_abs_diff: float
    embedding_max_rel_diff: float
    top1_agreement: float
    top5_agreement: float
    reference_spread: float  # how much the reference's logits vary across the inputs (relative)
    reference_scale: float  # the reference's largest |logit|
    tolerance_rel: float
    min_top1_agreement: float
    min_top5_agreement: float
    passed: bool
    reason: str

    def to_dict(self) -> dict[str, object]:
        """JSON-safe: an infinite tolerance (not checked) is written as null."""
        return {k: (None if isinstance(v, float) and math.isinf(v) else v)
                for k, v in asdict(self).items()}


def reference_spread(logits: np.ndarray) -> tuple[float, float]:
    """(spread, scale) of logits [N, classes]: the largest change of any one logit across the N
    inputs relative to the largest magnitude, and that magnitude."""
    scale = float(np.abs(logits).max()) if logits.size else 0.0
    if not scale or not np.isfinite(scale):
        return 0.0, scale
    return float((logits.max(axis=0) - logits.min(axis=0)).max() / scale), scale


def top_k_agreement(model: nn.Module, engine: Backend,
                    inputs: list[np.ndarray]) -> tuple[float, float]:
    """Top-1 and top-5 agreement of the exported model with FP32 PyTorch on ``inputs``."""
    top1 = top5 = 0
    for x in inputs:
        with torch.no_grad():
            ref = model(torch.from_numpy(x))[0].numpy()
        got = engine.run(x).logits
        for r, g in zip(ref, got, strict=True):
            k = min(5, r.shape[0])
            rs, gs = np.argsort(-r), np.argsort(-g)
            top1 += int(rs[0] == gs[0])
            top5 += int(set(rs[:k]) == set(gs[:k]))
    n = sum(x.shape[0] for x in inputs)
    return top1 / n, top5 / n


def check_parity(model: nn.Module, engine: Backend, shape: tuple[int, int, int], seed: int,
                 batch_sizes: tuple[int, ...] = (1, 4),
                 tolerance: Tolerance = TOLERANCES["fp32"],
                 inputs: list[np.ndarray] | None = None) -> ParityReport:
    """Run FP32 PyTorch and the exported model's ``engine`` on the same inputs — seeded noise
    at ``batch_sizes``, or ``inputs`` (e.g. held-out calibration images, for INT8, whose ranges
    were fitted to them) — and compare both outputs against ``tolerance`` (relative to each
    output's scale)."""
    gen = torch.Generator().manual_seed(seed)
    batches = [torch.from_numpy(x) for x in inputs] if inputs else \
        [torch.randn((n, *shape), generator=gen) for n in batch_sizes]
    c = _compare(model, engine, batches)
    logits_abs, logits_rel = (max(v) for v in zip(*c.diffs["logits"], strict=True))
    emb_abs, emb_rel = (max(v) for v in zip(*c.diffs["embedding"], strict=True))
    top1_rate, top5_rate = c.top1 / c.total, c.top5 / c.total
    spread, scale = reference_spread(np.concatenate(c.references))
    reasons = _reasons(c.finite, c.total, spread, scale, max(logits_rel, emb_rel), top1_rate,
                       top5_rate, tolerance)
    return ParityReport(
        batch_sizes=[int(x.shape[0]) for x in batches], seed=seed,
        logits_max_abs_diff=logits_abs, logits_max_rel_diff=logits_rel,
        embedding_max_abs_diff=emb_abs, embedding_max_rel_diff=emb_rel,
        top1_agreement=top1_rate, top5_agreement=top5_rate,
        reference_spread=spread, reference_scale=scale,
        tolerance_rel=tolerance.max_rel_diff, min_top1_agreement=tolerance.min_top1_agreement,
        min_top5_agreement=tolerance.min_top5_agreement,
        passed=not reasons, reason="; ".join(reasons),
    )


@dataclass
class _Compared:
    diffs: dict[str, list[tuple[float, float]]]  # output → (max |Δ|, relative) per batch
    top1: int
    top5: int
    total: int
    finite: bool
    references: list[np.ndarray]  # PyTorch's logits


def _compare(model: nn.Module, engine: Backend, batches: list[torch.Tensor]) -> _Compared:
    """Both outputs of PyTorch and of the engine on each batch: differences and top-k."""
    c = _Compared(diffs={"logits": [], "embedding": []}, top1=0, top5=0, total=0, finite=True,
                  references=[])
    for x in batches:
        with torch.no_grad():
            ref_logits, ref_emb = (t.numpy() for t in model(x))
        c.references.append(ref_logits)
        got = engine.run(x.numpy())
        for name, ref, out in (("logits", ref_logits, got.logits),
                               ("embedding", ref_emb, got.embedding)):
            c.finite &= bool(np.isfinite(ref).all() and np.isfinite(out).all())
            abs_diff = float(np.abs(ref - out).max()) if ref.shape == out.shape else float("inf")
            scale = float(np.abs(ref).max()) or 1.0
            c.diffs[name].append((abs_diff, abs_diff / scale))
        k = min(5, ref_logits.shape[1])
        ref_top = np.argsort(-ref_logits, axis=1)
        got_top = np.argsort(-got.logits, axis=1)
        c.top1 += int((ref_top[:, 0] == got_top[:, 0]).sum())
        c.top5 += sum(set(r[:k]) == set(g[:k]) for r, g in zip(ref_top, got_top, strict=True))
        c.total += x.shape[0]
    return c


def _reasons(finite: bool, total: int, spread: float, scale: float, rel_diff: float,
             top1_rate: float, top5_rate: float, tolerance: Tolerance) -> list[str]:
    """Why the export must not be published (none: it passes)."""
    reasons = []
    if not finite:
        reasons.append("non-finite values (NaN/Inf) in the outputs: check the weights")
    elif total > 1 and spread < MIN_REFERENCE_SPREAD:
        reasons.append(f"the PyTorch reference hardly depends on its input: its logits vary by "
                       f"{spread:.1e} of their largest magnitude across the {total} check "
                       f"inputs (at least {MIN_REFERENCE_SPREAD:.0e} is needed): a degenerate "
                       "network, which parity cannot check; check the weights")
    elif scale < MIN_REFERENCE_SCALE:
        reasons.append(f"the PyTorch reference's logits are at most {scale:.1e} (at least "
                       f"{MIN_REFERENCE_SCALE:.0e} is needed): every softmax probability would be "
                       "1/classes and the top-k float noise; check the weights")
    if rel_diff > tolerance.max_rel_diff:
        reasons.append(f"relative difference {rel_diff:.2e} is over the tolerance "
                       f"{tolerance.max_rel_diff:.2g}")
    if top1_rate < tolerance.min_top1_agreement:
        reasons.append(f"top-1 agreement {top1_rate:.3f} is under "
                       f"{tolerance.min_top1_agreement}")
    if top5_rate < tolerance.min_top5_agreement:
        reasons.append(f"top-5 agreement {top5_rate:.3f} is under "
                       f"{tolerance.min_top5_agreement}")
    return reasons
