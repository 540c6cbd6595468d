"""The small Fashion-MNIST classifier behind the "lenet-fashion" metrics (FD, KID, precision/recall, IS-like, accuracy).

No ImageNet network sees Fashion-MNIST's domain well and Inception is slow on CPU, so the headline generative
metrics use a LeNet-style CNN trained here on the Fashion-MNIST train split (docs/design.md §4). It is an
*evaluation* network only: never use it as a training loss (that would game the metric).

Architecture (545k parameters, 2.2 MB in float32): gray 32x32 input -> conv3x3(32)-ReLU-maxpool -> conv3x3(64)-ReLU-
maxpool -> linear(4096 -> 128) = **features** -> ReLU -> linear(128 -> 10) = logits. The features are taken *before*
the ReLU: post-ReLU features have dead units, which makes their covariance singular.

The committed weights (``weights/lenet_fashion_mnist.safetensors``) come from ``scripts/train_fashion_classifier.py``;
their SHA-256 and test accuracy are in ``weights/lenet_fashion_mnist.json`` and are checked on load.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from pathlib import Path

import torch
from torch import nn
from torch.nn import functional as F

__all__ = [
    "DEFAULT_CLASSIFIER_PATH",
    "FashionLeNet",
    "evaluate_classifier",
    "file_sha256",
    "load_fashion_classifier",
    "train_fashion_classifier",
]

DEFAULT_CLASSIFIER_PATH = Path(__file__).with_name("weights") / "lenet_fashion_mnist.safetensors"


class FashionLeNet(nn.Module):
    """LeNet-style classifier on 32x32 images in [-1, 1] (RGB inputs are averaged to gray)."""

    feature_dim = 128
    num_classes = 10
    image_size = 32

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, 32, 3, padding=1)
        self.conv2 = nn.Conv2d(32, 64, 3, padding=1)
        self.fc1 = nn.Linear(64 * 8 * 8, self.feature_dim)
        self.fc2 = nn.Linear(self.feature_dim, self.num_classes)

    def features_and_logits(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``[B, 1 or 3, 32, 32]`` in [-1, 1] -> (pre-ReLU features ``[B, 128]``, logits ``[B, 10]``)."""
        if images.ndim != 4 or images.shape[1] not in (1, 3) or images.shape[-2:] != (self.image_size, self.image_size):
            raise ValueError(f"FashionLeNet expects images [B, 1 or 3, 32, 32] in [-1, 1], got {tuple(images.shape)}")
        x = images.float().mean(dim=1, keepdim=True)  # Fashion-MNIST is gray; generated RGB is judged on luminance
        x = F.max_pool2d(F.relu(self.conv1(x)), 2)
        x = F.max_pool2d(F.relu(self.conv2(x)), 2)
        features = self.fc1(x.flatten(1))
        return features, self.fc2(F.relu(features))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.features_and_logits(images)[1]


def file_sha256(path: str | os.PathLike) -> str:
    """Hex SHA-256 of a file."""
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def load_fashion_classifier(path: str | os.PathLike | None = None, *, check_hash: bool = True) -> FashionLeNet:
    """Load the frozen classifier (eval mode, no gradients) from a safetensors file (default: the committed one).

    With ``check_hash`` the file's SHA-256 must equal the ``sha256`` in the JSON card next to it, so a metric is
    never silently computed with a different network.
    """
    from safetensors.torch import load_file

    path = DEFAULT_CLASSIFIER_PATH if path is None else Path(path)
    if not path.is_file():
        raise OSError(f"classifier weights not found: {path} (train them with scripts/train_fashion_classifier.py)")
    if check_hash:
        card = path.with_suffix(".json")
        if not card.is_file():
            raise OSError(f"{card} (the card with the expected SHA-256) is missing; pass check_hash=False to skip the check")
        expected, actual = json.loads(card.read_text())["sha256"], file_sha256(path)
        if actual != expected:
            raise OSError(f"{path} has SHA-256 {actual}, but its card {card.name} says {expected}")
    model = FashionLeNet()
    model.load_state_dict(load_file(str(path)), strict=True)
    return model.eval().requires_grad_(False)


@torch.no_grad()
def evaluate_classifier(model: FashionLeNet, images: torch.Tensor, labels: torch.Tensor, batch_size: int = 1000) -> float:
    """Top-1 accuracy of ``model`` on ``images`` ``[N, C, 32, 32]`` in [-1, 1] with integer ``labels`` ``[N]``."""
    if len(images) != len(labels) or len(images) == 0:
        raise ValueError(f"need as many labels as images (and at least one), got {len(images)} images, {len(labels)} labels")
    was_training = model.training
    model.eval()
    correct = sum(int((model(images[i : i + batch_size]).argmax(1) == labels[i : i + batch_size]).sum()) for i in range(0, len(images), batch_size))
    model.train(was_training)
    return correct / len(images)


def train_fashion_classifier(
    train_images: torch.Tensor,
    train_labels: torch.Tensor,
    *,
    epochs: int = 3,
    batch_size: int = 128,
    lr: float = 1e-3,
    seed: int = 0,
    log_every: int = 100,
) -> FashionLeNet:
    """Train :class:`FashionLeNet` with Adam and cross-entropy, seeded (initialisation and batch order).

    ``train_images``: ``[N, 1 or 3, 32, 32]`` in [-1, 1]; ``train_labels``: ``[N]`` in 0..9. Returns the model in
    eval mode. 3 epochs on the 60k train split take about 1.5 minutes on 2 idle CPU cores.
    Bit-identical reruns need the same torch build and thread count.
    """
    if train_images.ndim != 4 or len(train_images) != len(train_labels):
        raise ValueError(f"need images [N, C, 32, 32] and labels [N], got {tuple(train_images.shape)} and {tuple(train_labels.shape)}")
    if epochs < 1 or batch_size < 1:
        raise ValueError(f"epochs and batch_size must be >= 1, got {epochs} and {batch_size}")
    generator = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)  # parameter initialisation
    model = FashionLeNet()
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    start = time.perf_counter()
    for epoch in range(epochs):
        order = torch.randperm(len(train_images), generator=generator)
        for step, i in enumerate(range(0, len(order), batch_size)):
            idx = order[i : i + batch_size]
            loss = F.cross_entropy(model(train_images[idx]), train_labels[idx])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            if log_every and step % log_every == 0:
                print(f"epoch {epoch} step {step} loss {loss.item():.4f} ({time.perf_counter() - start:.0f} s)", flush=True)
    return model.eval().requires_grad_(False)
