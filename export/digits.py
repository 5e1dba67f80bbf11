"""LeNet-5 trained on a real labelled data set that ships in scikit-learn's wheel.

``load_digits``: 1,797 handwritten digits, 8×8, values 0–16. Each becomes a 32×32 grayscale PNG
(values scaled to 0–255, upsampled bilinearly to LeNet-5's input), so the PNG is exactly what a
client would send; training reads those PNGs through torchvision's reference preprocessing for
the model's input spec. The split is fixed (``test_size=0.25``, stratified, ``random_state=0``):
the held-out 450 digits are never trained on, and ``visionserve eval-digits`` and the tests send
them through the server.
"""

from __future__ import annotations

import io
import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

SIDE = 32
EPOCHS = 15
BATCH = 64
LEARNING_RATE = 3e-3


@dataclass(frozen=True)
class DigitsSplit:
    """PNG bytes and labels of one side of the fixed split."""

    pngs: list[bytes]
    labels: np.ndarray


def digits_split() -> tuple[DigitsSplit, DigitsSplit]:
    """(train, held-out) as 32×32 grayscale PNGs."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    data = load_digits()
    train_x, test_x, train_y, test_y = train_test_split(
        data.images, data.target, test_size=0.25, stratify=data.target, random_state=0)
    return (DigitsSplit([_png(x) for x in train_x], np.asarray(train_y)),
            DigitsSplit([_png(x) for x in test_x], np.asarray(test_y)))


def _png(digit: np.ndarray) -> bytes:
    from PIL import Image

    pixels = np.rint(digit * (255.0 / 16.0)).astype(np.uint8)
    image = Image.fromarray(pixels, mode="L").resize((SIDE, SIDE), Image.Resampling.BILINEAR)
    out = io.BytesIO()
    image.save(out, format="PNG")
    return out.getvalue()


def reference_tensors(pngs: list[bytes]) -> torch.Tensor:
    """[N, 1, 32, 32]: the PNGs decoded and normalised by torchvision, as LeNet-5's input spec
    says (resize 32, centre crop 32, mean 0.5, std 0.5)."""
    from PIL import Image
    from torchvision import transforms

    from .architectures import get

    spec = get("lenet5").input
    t = transforms.Compose([transforms.Resize(spec.resize), transforms.CenterCrop(spec.height),
                            transforms.ToTensor(), transforms.Normalize(spec.mean, spec.std)])
    return torch.stack([t(Image.open(io.BytesIO(p)).convert(spec.color)) for p in pngs])


@dataclass(frozen=True)
class TrainedLeNet:
    state_dict: dict[str, torch.Tensor]
    seed: int
    epochs: int
    train_images: int
    held_out_images: int
    held_out_accuracy: float
    seconds: float

    def record(self) -> dict[str, object]:
        return {"data": "sklearn.datasets.load_digits, test_size=0.25 stratified, "
                        "random_state=0", "seed": self.seed, "epochs": self.epochs,
                "train_images": self.train_images, "held_out_images": self.held_out_images,
                "held_out_accuracy_pytorch": round(self.held_out_accuracy, 4),
                "train_seconds": round(self.seconds, 1)}


def train_lenet5(seed: int = 0, epochs: int = EPOCHS,
                 on_epoch: Callable[[], None] = lambda: None) -> TrainedLeNet:
    """Seeded Adam on the training split; a few seconds on one CPU core."""
    from .own_models import LeNet5

    start = time.perf_counter()
    train, held_out = digits_split()
    x, y = reference_tensors(train.pngs), torch.from_numpy(train.labels).long()
    torch.manual_seed(seed)
    model = LeNet5(10)
    optimiser = torch.optim.Adam(model.parameters(), lr=LEARNING_RATE)
    order = torch.Generator().manual_seed(seed)
    loss_fn = nn.CrossEntropyLoss()
    model.train()
    for _ in range(epochs):
        for batch in torch.randperm(len(y), generator=order).split(BATCH):
            optimiser.zero_grad()
            loss_fn(model(x[batch]), y[batch]).backward()
            optimiser.step()
        on_epoch()
    model.eval()
    accuracy = accuracy_of(model, held_out)
    return TrainedLeNet(state_dict={k: v.detach().clone() for k, v in model.state_dict().items()},
                        seed=seed, epochs=epochs, train_images=len(y),
                        held_out_images=len(held_out.labels), held_out_accuracy=accuracy,
                        seconds=time.perf_counter() - start)


def predictions(model: nn.Module, split: DigitsSplit) -> np.ndarray:
    with torch.no_grad():
        return model(reference_tensors(split.pngs)).argmax(1).numpy()


def accuracy_of(model: nn.Module, split: DigitsSplit) -> float:
    return float((predictions(model, split) == split.labels).mean())
