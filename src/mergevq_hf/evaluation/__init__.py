"""Evaluation suite for MergeVQ / MergeAR: reconstruction, generation and representation metrics, all offline.

* :mod:`.metrics`: PSNR, SSIM, Fréchet distance, KID, k-NN precision/recall, IS-like score, class accuracy,
  codebook usage (PSNR, SSIM and KID's MMD from torchmetrics; the rest written out here).
* :mod:`.features`: pluggable feature networks (``"lenet-fashion"``, ``"mobilenet_v2"``, ``"inception"`` if
  installed, or any ``nn.Module``).
* :mod:`.classifier`: the small Fashion-MNIST LeNet behind ``"lenet-fashion"`` and its training function.
* :mod:`.probe`: linear probe and k-NN accuracy on ``get_image_features``.
* :mod:`.sampling`: sharded sample-and-gather with accelerate (so a multi-GPU 50k-sample gFID needs no new code).
* :mod:`.suite`: one-call ``evaluate_reconstruction`` / ``evaluate_generation`` / ``evaluate_representation``.
* :mod:`.cli`: ``mergevq eval {reconstruction,generation,representation}``.
* ``metric_modules/<name>``: 🤗 ``evaluate`` modules (``psnr``, ``ssim``, ``fd``, ``kid``) for
  ``evaluate.load(metric_module_path("psnr"))``; ``evaluate.load("psnr")`` would need the Hub.
"""

from pathlib import Path

from .cli import main
from .classifier import FashionLeNet, load_fashion_classifier, train_fashion_classifier
from .features import (
    FEATURE_EXTRACTORS,
    FeatureExtractor,
    available_feature_extractors,
    extract_features,
    load_feature_extractor,
)
from .metrics import (
    class_accuracy,
    codebook_usage,
    frechet_distance,
    gaussian_statistics,
    inception_score_like,
    kernel_distance,
    precision_recall,
    psnr,
    ssim,
)
from .probe import image_features, knn_accuracy, linear_probe
from .sampling import pipeline_sample_fn, sample_and_gather
from .suite import (
    dataset_to_tensors,
    default_feature_networks,
    evaluate_generation,
    evaluate_reconstruction,
    evaluate_representation,
    format_markdown,
    format_seed_spread,
)

METRIC_MODULES_DIR = Path(__file__).with_name("metric_modules")
METRIC_MODULE_NAMES = ("psnr", "ssim", "fd", "kid")


def metric_module_path(name: str) -> str:
    """Folder of a local ``evaluate`` module, for ``evaluate.load(metric_module_path("psnr"))``."""
    if name not in METRIC_MODULE_NAMES:
        raise ValueError(f"no local evaluate module {name!r}; available: {list(METRIC_MODULE_NAMES)}")
    return str(METRIC_MODULES_DIR / name)


__all__ = [
    "FEATURE_EXTRACTORS",
    "FashionLeNet",
    "FeatureExtractor",
    "METRIC_MODULES_DIR",
    "METRIC_MODULE_NAMES",
    "available_feature_extractors",
    "class_accuracy",
    "codebook_usage",
    "dataset_to_tensors",
    "default_feature_networks",
    "evaluate_generation",
    "evaluate_reconstruction",
    "evaluate_representation",
    "extract_features",
    "format_markdown",
    "format_seed_spread",
    "frechet_distance",
    "gaussian_statistics",
    "image_features",
    "inception_score_like",
    "kernel_distance",
    "knn_accuracy",
    "linear_probe",
    "load_fashion_classifier",
    "load_feature_extractor",
    "main",
    "metric_module_path",
    "pipeline_sample_fn",
    "precision_recall",
    "psnr",
    "sample_and_gather",
    "ssim",
    "train_fashion_classifier",
]
