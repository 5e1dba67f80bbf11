"""The architecture registry: name → builder, input spec, and where the embedding is taken.

A name is torchvision's builder name where torchvision has the model, timm's model name where
timm has it, and our own (``lenet5``, ``zfnet``) otherwise. ``head`` is the dotted path of the
final classification layer: the embedding is its input, and ``WithEmbedding`` returns both from
one forward pass.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from visionserve.service.config import InputSpec

IMAGENET = InputSpec()  # RGB, Resize(256) bilinear, CenterCrop(224), ImageNet mean/std
GRAY_32 = InputSpec(channels=1, height=32, width=32, color="L", resize=32,
                    mean=(0.5,), std=(0.5,))


@dataclass(frozen=True, kw_only=True)
class Architecture:
    name: str
    family: str
    build: Callable[[int], nn.Module]  # num_classes → model with random init
    head: str  # dotted path of the final classifier layer
    input: InputSpec = IMAGENET
    num_classes: int = 1000
    labels: str = "imagenet"  # imagenet | digits
    max_batch_size: int = 32


def _torchvision(builder: str) -> Callable[[int], nn.Module]:
    def build(num_classes: int) -> nn.Module:
        import torchvision

        return getattr(torchvision.models, builder)(weights=None, num_classes=num_classes)

    return build


def _lenet5(num_classes: int) -> nn.Module:
    from .lenet import LeNet5

    return LeNet5(num_classes)


ARCHITECTURES: dict[str, Architecture] = {
    a.name: a
    for a in [
        Architecture(name="lenet5", family="LeNet", build=_lenet5, head="classifier.5",
                     input=GRAY_32, num_classes=10, labels="digits", max_batch_size=256),
        Architecture(name="resnet18", family="ResNet", build=_torchvision("resnet18"), head="fc"),
        Architecture(name="resnet50", family="ResNet", build=_torchvision("resnet50"), head="fc"),
        Architecture(name="mobilenet_v3_small", family="MobileNet",
                     build=_torchvision("mobilenet_v3_small"), head="classifier.3",
                     max_batch_size=64),
    ]
}

DEFAULT_MODELS = ("lenet5", "resnet18", "resnet50", "mobilenet_v3_small")


def get(name: str) -> Architecture:
    try:
        return ARCHITECTURES[name]
    except KeyError:
        raise SystemExit(f"unknown architecture {name!r}; known: "
                         f"{', '.join(sorted(ARCHITECTURES))}") from None


class WithEmbedding(nn.Module):
    """Wraps a classifier so that one forward pass returns ``(logits, embedding)``.

    The final layer at ``head`` is replaced by Identity inside the body; its input is therefore
    the body's output (the embedding), and the original layer turns it into the logits.
    """

    def __init__(self, model: nn.Module, head: str) -> None:
        super().__init__()
        self.head = model.get_submodule(head)
        model.set_submodule(head, nn.Identity())
        self.body = model

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        embedding = torch.flatten(self.body(x), 1)
        return self.head(embedding), embedding


def imagenet_labels() -> list[str]:
    """ImageNet-1k class names from torchvision's weight metadata (no download)."""
    from torchvision.models import ResNet50_Weights

    return list(ResNet50_Weights.IMAGENET1K_V1.meta["categories"])


def default_labels(arch: Architecture, num_classes: int) -> list[str]:
    if arch.labels == "imagenet" and num_classes == 1000:
        return imagenet_labels()
    if arch.labels == "digits" and num_classes == 10:
        return [str(i) for i in range(10)]
    return [f"class_{i}" for i in range(num_classes)]
