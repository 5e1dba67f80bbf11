"""The backend interface: a loaded model that turns a batch of input tensors into outputs."""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True, slots=True)
class ModelOutputs:
    """Both outputs of one forward pass; row i of each belongs to input image i."""

    logits: np.ndarray  # float32 [N, num_classes]
    embedding: np.ndarray  # float32 [N, embedding_dim]

    def __len__(self) -> int:
        return int(self.logits.shape[0])

    def rows(self, start: int, stop: int) -> ModelOutputs:
        return ModelOutputs(self.logits[start:stop], self.embedding[start:stop])


class Backend(ABC):
    """A loaded model version. ``run`` is blocking and thread-safe; the batcher calls it from
    an executor thread, never from the event loop. A backend knows nothing of batching."""

    num_classes: int
    embedding_dim: int

    @abstractmethod
    def run(self, batch: np.ndarray) -> ModelOutputs:
        """Compute one batch: float32 [N, C, H, W], already normalized."""

    def close(self) -> None:  # noqa: B027 - optional hook
        """Release engine memory (sessions, device buffers)."""
