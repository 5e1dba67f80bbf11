"""Model outputs → what the API returns: softmax top-k with labels, L2-normalized embeddings."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True, slots=True)
class ClassScore:
    index: int
    label: str
    score: float  # softmax probability


def softmax(logits: np.ndarray) -> np.ndarray:
    """Row-wise, numerically stable (max subtracted), float32 [N, K]."""
    shifted = logits - logits.max(axis=1, keepdims=True)
    np.exp(shifted, out=shifted)
    shifted /= shifted.sum(axis=1, keepdims=True)
    return shifted


def top_k(logits: np.ndarray, k: int, labels: tuple[str, ...]) -> list[list[ClassScore]]:
    """Best ``k`` classes per row, best first, ranked on the logits (as the engine ranks them:
    logits too close for float32 probabilities to tell apart keep their order), reported with
    their softmax probabilities; equal logits go to the lower index."""
    logits = np.asarray(logits, dtype=np.float32)
    probs = softmax(np.array(logits, copy=True))
    k = min(k, logits.shape[1])
    results = []
    for raw, row in zip(logits, probs, strict=True):
        best = np.argpartition(-raw, k - 1)[:k] if k < raw.shape[0] else np.arange(raw.shape[0])
        best = best[np.lexsort((best, -raw[best]))]
        results.append([ClassScore(int(i), labels[i] if i < len(labels) else str(i),
                                   float(row[i])) for i in best])
    return results


def l2_normalize(vectors: np.ndarray) -> np.ndarray:
    norms = np.linalg.norm(vectors, axis=1, keepdims=True)
    return vectors / np.maximum(norms, np.finfo(np.float32).tiny)
