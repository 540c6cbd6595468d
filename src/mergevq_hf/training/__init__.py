"""Training building blocks for MergeVQ / MergeAR that do not depend on the model internals.

* :mod:`.losses`: PatchGAN discriminator, hinge / non-saturating GAN losses, LeCAM regulariser.
* :mod:`.perceptual`: perceptual loss on a frozen ImageNet MobileNetV2 (offline LPIPS substitute).
* :mod:`.mobilenet`: the MobileNetV2 itself (torchvision key names, no torchvision) and its shipped weights.
* :mod:`.teacher`: frozen alignment teachers and a disk cache of their features.
* :mod:`.data`: Fashion-MNIST / procedural / imagefolder datasets, image transform and collator.
* :mod:`.ema`: exponential moving average of model weights.

Model files never import this package. The submodules import ``datasets`` and ``transformers`` lazily.
"""

from .data import (
    FASHION_MNIST_CLASSES,
    ImageTransform,
    collate_images,
    load_fashion_mnist,
    load_imagefolder,
    procedural_images,
)
from .ema import EMAModel
from .losses import LeCAMRegularizer, PatchGANDiscriminator, adopt_weight, hinge_d_loss, non_saturating_g_loss
from .mobilenet import MobileNetV2, load_mobilenet_v2
from .perceptual import PerceptualLoss
from .teacher import HFTeacher, MobileNetV2Teacher, attach_teacher_features, build_teacher, precompute_teacher_features

__all__ = [
    "EMAModel",
    "FASHION_MNIST_CLASSES",
    "HFTeacher",
    "ImageTransform",
    "LeCAMRegularizer",
    "MobileNetV2",
    "MobileNetV2Teacher",
    "PatchGANDiscriminator",
    "PerceptualLoss",
    "adopt_weight",
    "attach_teacher_features",
    "build_teacher",
    "collate_images",
    "hinge_d_loss",
    "load_fashion_mnist",
    "load_imagefolder",
    "load_mobilenet_v2",
    "non_saturating_g_loss",
    "precompute_teacher_features",
    "procedural_images",
]
