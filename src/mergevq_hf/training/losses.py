"""Adversarial pieces of the stage-1 tokenizer objective (docs/design.md §2).

* :class:`PatchGANDiscriminator`: the pix2pix/taming "NLayerDiscriminator" layout (4x4 convs, stride 2 for the first
  ``n_layers`` convs, then two stride-1 convs, LeakyReLU 0.2), with BatchNorm as in the released MergeVQ code or
  GroupNorm / no norm. Parameter names (``main.N...``) follow that layout.
* :func:`hinge_d_loss` (discriminator step) and :func:`non_saturating_g_loss` (generator step).
* :class:`LeCAMRegularizer`: LeCAM regulariser (Tseng et al., CVPR 2021) with EMA anchors stored in buffers.
* :func:`adopt_weight`: switch a loss weight on at a given step.

Released recipe: D loss = hinge + 0.01 * LeCAM from step 0; G adversarial weight 0.1 (fixed, no adaptive weight).
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

__all__ = ["LeCAMRegularizer", "PatchGANDiscriminator", "adopt_weight", "hinge_d_loss", "non_saturating_g_loss"]


def _norm_layer(kind: str, channels: int) -> nn.Module:
    if kind == "batch":
        return nn.BatchNorm2d(channels)
    if kind == "group":
        return nn.GroupNorm(min(32, channels), channels)
    if kind == "none":
        return nn.Identity()
    raise ValueError(f"norm must be 'batch', 'group' or 'none', got {kind!r}")


class PatchGANDiscriminator(nn.Module):
    """PatchGAN discriminator: images in [-1, 1], ``[B, C, H, W]`` -> patch logits ``[B, 1, H', W']``.

    With the defaults (``n_layers=3``) the spatial size goes H -> H/2 -> H/4 -> H/8 -> H/8-1 -> H/8-2, so a 32x32
    image gives 2x2 logits and a 64x64 image 6x6. Inputs need ``H, W >= 2**n_layers * 3`` (checked).

    Args:
        in_channels: image channels.
        ndf: channels of the first conv; later convs use ``ndf * min(2**i, 8)``.
        n_layers: number of stride-2 convs.
        norm: ``"batch"`` (released code), ``"group"`` (batch-size independent) or ``"none"``.
    """

    def __init__(self, in_channels: int = 3, ndf: int = 64, n_layers: int = 3, norm: str = "batch") -> None:
        super().__init__()
        if n_layers < 1:
            raise ValueError(f"n_layers must be >= 1, got {n_layers}")
        _norm_layer(norm, 1)  # validate early
        self.n_layers = n_layers
        bias = norm == "none"  # a norm layer right after the conv makes its bias redundant
        layers: list[nn.Module] = [nn.Conv2d(in_channels, ndf, 4, 2, 1), nn.LeakyReLU(0.2, inplace=True)]
        ch = ndf
        for i in range(1, n_layers + 1):
            out = ndf * min(2**i, 8)
            stride = 2 if i < n_layers else 1
            layers += [nn.Conv2d(ch, out, 4, stride, 1, bias=bias), _norm_layer(norm, out), nn.LeakyReLU(0.2, inplace=True)]
            ch = out
        layers.append(nn.Conv2d(ch, 1, 4, 1, 1))
        self.main = nn.Sequential(*layers)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """DCGAN-style init: conv weights N(0, 0.02), norm scales N(1, 0.02), biases 0."""
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.normal_(m.weight, 0.0, 0.02)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, (nn.BatchNorm2d, nn.GroupNorm)):
                nn.init.normal_(m.weight, 1.0, 0.02)
                nn.init.zeros_(m.bias)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        min_side = 3 * 2**self.n_layers
        if images.ndim != 4 or min(images.shape[-2:]) < min_side:
            raise ValueError(f"expected images [B, C, H, W] with H, W >= {min_side}, got {tuple(images.shape)}")
        return self.main(images)


def hinge_d_loss(real_logits: torch.Tensor, fake_logits: torch.Tensor) -> torch.Tensor:
    """Hinge discriminator loss ``0.5 * (mean(relu(1 - D(x))) + mean(relu(1 + D(G(z)))))`` (taming's convention)."""
    return 0.5 * (F.relu(1.0 - real_logits).mean() + F.relu(1.0 + fake_logits).mean())


def non_saturating_g_loss(fake_logits: torch.Tensor) -> torch.Tensor:
    """Non-saturating generator loss ``mean(-log sigmoid(D(G(z)))) = mean(softplus(-D(G(z))))``."""
    return F.softplus(-fake_logits).mean()


class LeCAMRegularizer(nn.Module):
    """LeCAM regulariser for the discriminator step.

    ``loss = mean(relu(D(x) - ema_fake)^2) + mean(relu(ema_real - D(G(z)))^2)``, where ``ema_real`` / ``ema_fake``
    are exponential moving averages (decay 0.999, initialised at 0) of the batch-mean logits. They live in persistent
    buffers, so they are saved and restored with the discriminator's checkpoint. Calling the module in training
    mode first updates the averages with the current batch, then evaluates the penalty (as the released code does);
    in eval mode, or with ``update=False``, the averages are left unchanged.
    """

    def __init__(self, decay: float = 0.999) -> None:
        super().__init__()
        if not 0.0 <= decay < 1.0:
            raise ValueError(f"decay must lie in [0, 1), got {decay}")
        self.decay = decay
        self.register_buffer("ema_real", torch.zeros(()))
        self.register_buffer("ema_fake", torch.zeros(()))

    @torch.no_grad()
    def update(self, real_logits: torch.Tensor, fake_logits: torch.Tensor) -> None:
        self.ema_real.lerp_(real_logits.detach().float().mean(), 1.0 - self.decay)
        self.ema_fake.lerp_(fake_logits.detach().float().mean(), 1.0 - self.decay)

    def forward(self, real_logits: torch.Tensor, fake_logits: torch.Tensor, update: bool = True) -> torch.Tensor:
        if update and self.training:
            self.update(real_logits, fake_logits)
        return F.relu(real_logits - self.ema_fake).pow(2).mean() + F.relu(self.ema_real - fake_logits).pow(2).mean()

    def extra_repr(self) -> str:
        return f"decay={self.decay}"


def adopt_weight(weight: float, global_step: int, threshold: int = 0, value: float = 0.0) -> float:
    """``weight`` once ``global_step >= threshold``, else ``value`` (e.g. to start the GAN loss late)."""
    return weight if global_step >= threshold else value
