"""Architectures torchvision and timm do not ship, written here."""

from __future__ import annotations

from torch import nn


class LeNet5(nn.Module):
    """LeNet-5 (LeCun et al., 1998) on 1×32×32 grayscale: two conv/pool stages, three FC layers.

    ``classifier[-1]`` is the final layer; the 84-d input to it is the embedding.
    """

    def __init__(self, num_classes: int = 10) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(1, 6, kernel_size=5), nn.Tanh(), nn.AvgPool2d(2),
            nn.Conv2d(6, 16, kernel_size=5), nn.Tanh(), nn.AvgPool2d(2),
        )
        self.classifier = nn.Sequential(
            nn.Flatten(),
            nn.Linear(16 * 5 * 5, 120), nn.Tanh(),
            nn.Linear(120, 84), nn.Tanh(),
            nn.Linear(84, num_classes),
        )

    def forward(self, x):  # type: ignore[no-untyped-def]
        return self.classifier(self.features(x))
