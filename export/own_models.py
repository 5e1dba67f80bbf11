"""Architectures torchvision and timm do not ship, written here."""

from __future__ import annotations

import torch
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

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x))


class ZFNet(nn.Module):
    """ZFNet (Zeiler & Fergus, 2013): AlexNet with a 7×7 stride-2 first convolution and a
    stride-2 second one, on 3×224×224. ``classifier[-1]`` is the final layer; the 4096-d input
    to it (after fc7) is the embedding."""

    def __init__(self, num_classes: int = 1000) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, 96, kernel_size=7, stride=2, padding=1), nn.ReLU(inplace=True),
            nn.MaxPool2d(3, stride=2, padding=1),
            nn.Conv2d(96, 256, kernel_size=5, stride=2), nn.ReLU(inplace=True),
            nn.MaxPool2d(3, stride=2, padding=1),
            nn.Conv2d(256, 384, kernel_size=3, padding=1), nn.ReLU(inplace=True),
            nn.Conv2d(384, 384, kernel_size=3, padding=1), nn.ReLU(inplace=True),
            nn.Conv2d(384, 256, kernel_size=3, padding=1), nn.ReLU(inplace=True),
            nn.MaxPool2d(3, stride=2),
        )
        self.avgpool = nn.AdaptiveAvgPool2d((6, 6))
        self.classifier = nn.Sequential(
            nn.Flatten(),
            nn.Dropout(0.5), nn.Linear(256 * 6 * 6, 4096), nn.ReLU(inplace=True),
            nn.Dropout(0.5), nn.Linear(4096, 4096), nn.ReLU(inplace=True),
            nn.Linear(4096, num_classes),
        )
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, 0, 0.01)
                nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.avgpool(self.features(x)))


class _ConvBN(nn.Sequential):
    """Convolution → BatchNorm → ReLU, the unit of every BN-Inception layer."""

    def __init__(self, cin: int, cout: int, kernel_size: int, stride: int = 1,
                 padding: int = 0) -> None:
        super().__init__(nn.Conv2d(cin, cout, kernel_size, stride, padding, bias=False),
                         nn.BatchNorm2d(cout, eps=1e-5), nn.ReLU(inplace=True))


class _InceptionBN(nn.Module):
    """One BN-Inception module: a 1×1 branch (absent when ``n1x1`` is 0), 1×1 → 3×3, 1×1 → 3×3
    → 3×3 (the factorized 5×5), and a pooling branch ("avg" or "max", then a 1×1 projection;
    ``proj`` 0 = the pooled input passes through). ``stride`` 2 reduces the grid in the 3×3
    branches and the pooling (modules 3c and 4e)."""

    def __init__(self, cin: int, n1x1: int, n3x3red: int, n3x3: int, d3x3red: int, d3x3: int,
                 pool: str, proj: int, stride: int = 1) -> None:
        super().__init__()
        self.branch1x1 = _ConvBN(cin, n1x1, 1) if n1x1 else None
        self.branch3x3 = nn.Sequential(_ConvBN(cin, n3x3red, 1),
                                       _ConvBN(n3x3red, n3x3, 3, stride, 1))
        self.branch3x3dbl = nn.Sequential(_ConvBN(cin, d3x3red, 1),
                                          _ConvBN(d3x3red, d3x3, 3, 1, 1),
                                          _ConvBN(d3x3, d3x3, 3, stride, 1))
        if stride == 2:  # the grid-reduction modules pool 3×3/2 without padding (Caffe's ceil)
            pooling: nn.Module = nn.MaxPool2d(3, stride=2, ceil_mode=True)
        elif pool == "max":
            pooling = nn.MaxPool2d(3, stride=1, padding=1)
        else:
            pooling = nn.AvgPool2d(3, stride=1, padding=1)
        self.branch_pool = nn.Sequential(pooling, *([_ConvBN(cin, proj, 1)] if proj else []))
        self.out_channels = n1x1 + n3x3 + d3x3 + (proj or cin)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        branches = [self.branch3x3(x), self.branch3x3dbl(x), self.branch_pool(x)]
        if self.branch1x1 is not None:
            branches.insert(0, self.branch1x1(x))
        return torch.cat(branches, 1)


class InceptionV2(nn.Module):
    """Inception v2, i.e. BN-Inception (Ioffe & Szegedy, 2015, the network of their Figure 5 /
    appendix table), on 3×224×224: GoogLeNet with BatchNorm after every convolution, each 5×5
    convolution factorized into two 3×3 ones, 3×3 convolutions in the stem, average or max
    pooling branches, and stride-2 modules (3c, 4e) in place of the pooling layers between
    stages. No auxiliary heads (they are training-only) and no dropout (the paper removes it).

    The paper's table gives each module's branch widths; its output-depth column disagrees with
    them for 4c-4e (576 where the branches add up to 608, 608, 1056). The branch widths are
    what the released BN-Inception model uses, and what is built here. The first convolution is
    a plain 7×7/2 (as in that model). ``fc`` is the final layer; the 1024-d pooled input to it is
    the embedding."""

    # n1x1, n3x3red, n3x3, double-3x3 red, double-3x3, pool, pool projection, stride
    MODULES = {
        "3a": (64, 64, 64, 64, 96, "avg", 32, 1),
        "3b": (64, 64, 96, 64, 96, "avg", 64, 1),
        "3c": (0, 128, 160, 64, 96, "max", 0, 2),
        "4a": (224, 64, 96, 96, 128, "avg", 128, 1),
        "4b": (192, 96, 128, 96, 128, "avg", 128, 1),
        "4c": (160, 128, 160, 128, 160, "avg", 128, 1),
        "4d": (96, 128, 192, 160, 192, "avg", 128, 1),
        "4e": (0, 128, 192, 192, 256, "max", 0, 2),
        "5a": (352, 192, 320, 160, 224, "avg", 128, 1),
        "5b": (352, 192, 320, 192, 224, "max", 128, 1),
    }

    def __init__(self, num_classes: int = 1000) -> None:
        super().__init__()
        stem = [_ConvBN(3, 64, 7, 2, 3), nn.MaxPool2d(3, stride=2, ceil_mode=True),
                _ConvBN(64, 64, 1), _ConvBN(64, 192, 3, 1, 1),
                nn.MaxPool2d(3, stride=2, ceil_mode=True)]
        channels, blocks = 192, []
        for widths in self.MODULES.values():
            block = _InceptionBN(channels, *widths)
            blocks.append(block)
            channels = block.out_channels
        self.features = nn.Sequential(*stem, *blocks)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(channels, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, 0, 0.01)
                nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.flatten(self.avgpool(self.features(x)), 1))


def vgg11_lrn(num_classes: int = 1000) -> nn.Module:
    """VGG-11 with local response normalization, configuration A-LRN of the VGG paper (Simonyan
    & Zisserman, 2014, Table 1): torchvision's VGG-11 (configuration A) with an LRN layer after
    the first convolution's ReLU, with AlexNet's LRN constants (size 5, α 1e-4, β 0.75, k 2) as
    the paper cites. ``classifier[6]`` is the final layer; the 4096-d input to it is the
    embedding (as for the other VGGs)."""
    import torchvision

    model = torchvision.models.vgg11(weights=None, num_classes=num_classes)
    layers = list(model.features)
    layers.insert(2, nn.LocalResponseNorm(5, alpha=1e-4, beta=0.75, k=2.0))
    model.features = nn.Sequential(*layers)
    return model
