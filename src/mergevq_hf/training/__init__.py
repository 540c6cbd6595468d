"""Training building blocks for MergeVQ / MergeAR that do not depend on the model internals.

* :mod:`.losses`: PatchGAN discriminator, hinge / non-saturating GAN losses, LeCAM regulariser.
* :mod:`.perceptual`: perceptual loss on a frozen ImageNet MobileNetV2 (offline LPIPS substitute).
* :mod:`.mobilenet`: the MobileNetV2 itself (torchvision key names, no torchvision) and its shipped weights.
* :mod:`.teacher`: frozen alignment teachers and a disk cache of their features.
* :mod:`.data`: Fashion-MNIST / procedural / imagefolder datasets, image transform and collator.
* :mod:`.ema`: exponential moving average of model weights.
* :mod:`.trainer_tokenizer`: ``MergeVQTrainer`` (stage 1: generator + PatchGAN discriminator, EMA, K sampling).
* :mod:`.trainer_mergear`: pre-tokenisation cache, per-example K sampling and ``MergeARTrainer`` (stage 2).
* :mod:`.trainer_randar`: random-order examples and their padding collator for ``MergeRandARForCausalLM``.
* :mod:`.atomic_checkpoints`: Trainer checkpoints written to a staging folder and renamed into place.
* :mod:`.sources`: the ``--dataset`` strings of the entry points; :mod:`.plotting`: loss-curve PNGs.
* :mod:`.train_tokenizer`, :mod:`.train_mergear`: the training entry points (``mergevq train-tokenizer`` /
  ``train-ar``, ``python -m mergevq_hf.training.train_tokenizer``), each with ``main(argv)``; not imported here.

Model files never import this package. The submodules import ``datasets`` and ``transformers`` lazily; the trainer
classes (which import ``transformers.Trainer`` and ``accelerate``) are loaded on first attribute access.
"""

from .data import (
    FASHION_MNIST_CLASSES,
    AlignmentViewsTransform,
    ImageTransform,
    collate_images,
    FASHION_MNIST_HELDOUT_ROWS,
    load_fashion_mnist,
    load_imagefolder,
    procedural_images,
)
from .ema import EMAModel
from .losses import LeCAMRegularizer, PatchGANDiscriminator, adopt_weight, hinge_d_loss, non_saturating_g_loss
from .mobilenet import MobileNetV2, load_mobilenet_v2
from .perceptual import PerceptualLoss
from .plotting import plot_loss_curves
from .sources import load_image_dataset
from .teacher import HFTeacher, MobileNetV2Teacher, attach_teacher_features, build_teacher, precompute_teacher_features

# Loaded on first access: importing transformers.Trainer costs seconds that data/loss users should not pay.
_LAZY = {
    "AtomicCheckpointMixin": ".atomic_checkpoints",
    "last_complete_checkpoint": ".atomic_checkpoints",
    "MergeARTokenDataset": ".trainer_mergear",
    "MergeARTrainer": ".trainer_mergear",
    "MergeARTrainingArguments": ".trainer_mergear",
    "mergear_config_for_tokenizer": ".trainer_mergear",
    "pretokenize": ".trainer_mergear",
    "MergeRandARTokenDataset": ".trainer_randar",
    "collate_random_order": ".trainer_randar",
    "MergeVQTrainer": ".trainer_tokenizer",
    "MergeVQTrainingArguments": ".trainer_tokenizer",
    "reconstruction_metrics": ".trainer_tokenizer",
}


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name], __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "AlignmentViewsTransform",
    "AtomicCheckpointMixin",
    "EMAModel",
    "FASHION_MNIST_CLASSES",
    "HFTeacher",
    "ImageTransform",
    "LeCAMRegularizer",
    "MergeARTokenDataset",
    "MergeARTrainer",
    "MergeARTrainingArguments",
    "MergeRandARTokenDataset",
    "MergeVQTrainer",
    "MergeVQTrainingArguments",
    "MobileNetV2",
    "MobileNetV2Teacher",
    "PatchGANDiscriminator",
    "PerceptualLoss",
    "adopt_weight",
    "attach_teacher_features",
    "build_teacher",
    "collate_images",
    "collate_random_order",
    "hinge_d_loss",
    "FASHION_MNIST_HELDOUT_ROWS",
    "load_fashion_mnist",
    "last_complete_checkpoint",
    "load_image_dataset",
    "load_imagefolder",
    "load_mobilenet_v2",
    "mergear_config_for_tokenizer",
    "non_saturating_g_loss",
    "plot_loss_curves",
    "precompute_teacher_features",
    "pretokenize",
    "procedural_images",
    "reconstruction_metrics",
]
