"""Image and distribution metrics: torchmetrics where it gives the standard definition, our own code elsewhere.

Image pairs (reconstruction): :func:`psnr`, :func:`ssim` on ``[B, C, H, W]`` tensors in [-1, 1], computed by
torchmetrics per image with the field's convention (SSIM on images mapped to [0, 1]).

Feature sets (``[N, D]``, from :mod:`.features`): :func:`frechet_distance`, :func:`kernel_distance` (KID),
:func:`precision_recall` (k-NN manifolds). Classifier outputs: :func:`inception_score_like`, :func:`class_accuracy`.
Codebook statistics: :func:`codebook_usage` (from the quantiser).

Distribution metrics are biased by the sample size (FD strongly, KID not at all in expectation), so only compare
values computed at the same N and with the same feature network.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torchmetrics.functional.image import peak_signal_noise_ratio, structural_similarity_index_measure
from torchmetrics.image.kid import poly_mmd

from ..quantization_lfq import codebook_usage

__all__ = [
    "class_accuracy",
    "codebook_usage",
    "frechet_distance",
    "gaussian_statistics",
    "inception_score_like",
    "kernel_distance",
    "precision_recall",
    "psnr",
    "ssim",
]


# ------------------------------------------------------------------------------------------------ input validation


def _image_pair(prediction: Any, target: Any) -> tuple[torch.Tensor, torch.Tensor]:
    prediction, target = torch.as_tensor(prediction), torch.as_tensor(target)
    if prediction.ndim != 4 or prediction.shape != target.shape:
        raise ValueError(f"expected two image batches [B, C, H, W] of equal shape, got {tuple(prediction.shape)} and {tuple(target.shape)}")
    if prediction.shape[0] == 0:
        raise ValueError("the image batches are empty")
    if not (torch.isfinite(prediction).all() and torch.isfinite(target).all()):
        raise ValueError("the images contain NaN or infinite values")
    return prediction.double(), target.double()


def _features(x: Any, name: str, min_rows: int = 2) -> torch.Tensor:
    x = torch.as_tensor(x)
    if x.ndim != 2 or x.shape[0] < min_rows or x.shape[1] < 1:
        raise ValueError(f"{name} must be a feature matrix [N, D] with N >= {min_rows}, got shape {tuple(x.shape)}")
    if not torch.isfinite(x).all():
        raise ValueError(f"{name} contains NaN or infinite values")
    return x.double()


def _feature_pair(a: Any, b: Any, min_rows: int = 2) -> tuple[torch.Tensor, torch.Tensor]:
    a, b = _features(a, "the first feature set", min_rows), _features(b, "the second feature set", min_rows)
    if a.shape[1] != b.shape[1]:
        raise ValueError(f"the feature sets have different dimensions: {a.shape[1]} and {b.shape[1]}")
    return a, b


# ------------------------------------------------------------------------------------------------------ image pairs


def psnr(prediction: Any, target: Any, data_range: float = 2.0, reduction: str = "mean") -> torch.Tensor:
    """Peak signal-to-noise ratio in dB, ``10 log10(data_range^2 / MSE)``, computed **per image** by torchmetrics.

    ``data_range`` is the span of the pixel scale (2 for our [-1, 1] images). PSNR only sees differences scaled by
    the span, so this equals the usual PSNR of the images mapped to [0, 1] with ``data_range=1``.
    ``reduction="mean"`` averages the per-image values (the usual protocol; a batch-level MSE would weight images
    unequally), ``"none"`` returns ``[B]``. Identical images give ``inf``.
    """
    if reduction not in ("mean", "none"):
        raise ValueError(f"reduction must be 'mean' or 'none', got {reduction!r}")
    if not data_range > 0:
        raise ValueError(f"data_range must be > 0, got {data_range}")
    prediction, target = _image_pair(prediction, target)
    values = peak_signal_noise_ratio(prediction, target, data_range=data_range, reduction="none", dim=(1, 2, 3))
    return values.mean() if reduction == "mean" else values


def _ssim_window_size(sigma: float) -> int:
    """Side of the Gaussian SSIM window torchmetrics uses for ``sigma`` (11 for the standard 1.5)."""
    return 2 * int(3.5 * sigma + 0.5) + 1


def ssim(
    prediction: Any,
    target: Any,
    value_range: tuple[float, float] = (-1.0, 1.0),
    sigma: float = 1.5,
    k1: float = 0.01,
    k2: float = 0.03,
    reduction: str = "mean",
) -> torch.Tensor:
    """Structural similarity (Wang et al., 2004) as the field reports it: on images mapped to [0, 1].

    SSIM is not shift-invariant (``C1 = (k1 L)^2`` is added to products of the local means), so the images are
    first mapped from ``value_range`` to [0, 1] and scored by torchmetrics with ``data_range=1`` and a Gaussian
    window of std ``sigma`` (11x11 for 1.5); borders are reflection-padded and the map is averaged over every pixel
    and channel of each image.
    ``reduction`` as in :func:`psnr`.
    """
    if reduction not in ("mean", "none"):
        raise ValueError(f"reduction must be 'mean' or 'none', got {reduction!r}")
    low, high = value_range
    if not high > low:
        raise ValueError(f"value_range must be (low, high) with high > low, got {value_range}")
    if not sigma > 0:
        raise ValueError(f"sigma must be > 0, got {sigma}")
    prediction, target = _image_pair(prediction, target)
    window = _ssim_window_size(sigma)
    if min(prediction.shape[-2:]) < window:
        raise ValueError(f"images must be at least {window} pixels on each side for sigma={sigma}, got {tuple(prediction.shape[-2:])}")
    prediction, target = (prediction - low) / (high - low), (target - low) / (high - low)
    values = structural_similarity_index_measure(prediction, target, sigma=sigma, data_range=1.0, k1=k1, k2=k2, reduction="none")
    return values.mean() if reduction == "mean" else values


# ----------------------------------------------------------------------------------------------------- feature sets


def gaussian_statistics(features: Any) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean ``[D]`` and unbiased covariance ``[D, D]`` (float64) of a feature matrix ``[N, D]``."""
    x = _features(features, "features")
    mean = x.mean(0)
    centred = x - mean
    return mean, centred.T @ centred / (x.shape[0] - 1)


def _psd_sqrt(matrix: torch.Tensor) -> torch.Tensor:
    eigenvalues, eigenvectors = torch.linalg.eigh(matrix)
    return (eigenvectors * eigenvalues.clamp_min(0).sqrt()) @ eigenvectors.T


def frechet_distance(features_a: Any, features_b: Any) -> float:
    """Fréchet distance between Gaussians fitted to two feature sets (the quantity behind FID).

    ``FD = |mu_a - mu_b|^2 + tr(S_a) + tr(S_b) - 2 tr((S_a S_b)^(1/2))``, in float64.

    The trace term is computed as ``sum sqrt(eig(A S_b A))`` with ``A = S_a^(1/2)``: ``A S_b A`` is symmetric PSD and
    has the same eigenvalues as ``S_a S_b``, so ``eigh`` applies and round-off can only produce tiny negative
    eigenvalues, which are clipped. No ``sqrtm`` of a non-symmetric product, no complex parts, and no ``eps * I``
    is needed for singular covariances (e.g. fewer samples than dimensions, or dead ReLU units).

    FD is biased upward by finite samples: compare values only at equal N (e.g. 10k vs the 10k test set).
    Kept here because torchmetrics computes FD only inside its image-level FID module (features are extracted
    once per network and shared with KID and precision/recall); tests check it against that module.
    """
    a, b = _feature_pair(features_a, features_b)
    mu_a, cov_a = gaussian_statistics(a)
    mu_b, cov_b = gaussian_statistics(b)
    root_a = _psd_sqrt(cov_a)
    cross = torch.linalg.eigvalsh(root_a @ cov_b @ root_a).clamp_min(0).sqrt().sum()
    value = (mu_a - mu_b).pow(2).sum() + cov_a.trace() + cov_b.trace() - 2 * cross
    return max(float(value), 0.0)  # exact value is >= 0; clip round-off at identical inputs


def kernel_distance(
    features_a: Any,
    features_b: Any,
    subset_size: int = 1000,
    num_subsets: int = 100,
    degree: int = 3,
    coef0: float = 1.0,
    seed: int = 0,
) -> tuple[float, float]:
    """Kernel distance (KID, Bińkowski et al., 2018): unbiased MMD^2 with ``k(x, y) = (x.y / D + coef0)^degree``.

    Each subset's MMD^2 is torchmetrics' ``poly_mmd`` (what its KID module computes); the subsets are drawn here,
    from ``seed``, so that values are reproducible. Averaged over ``num_subsets`` random subsets of
    ``min(subset_size, N_a, N_b)`` rows from each set; returns ``(mean, std)`` over subsets. Unbiased: its
    expectation is 0 when both sets come from the same distribution, so small negative values occur.
    """
    a, b = _feature_pair(features_a, features_b)
    if subset_size < 2 or num_subsets < 1 or degree < 1:
        raise ValueError(f"need subset_size >= 2, num_subsets >= 1, degree >= 1; got {subset_size}, {num_subsets}, {degree}")
    m = min(subset_size, a.shape[0], b.shape[0])
    generator = torch.Generator().manual_seed(seed)
    values = []
    for _ in range(num_subsets):
        x = a[torch.randperm(a.shape[0], generator=generator)[:m]]
        y = b[torch.randperm(b.shape[0], generator=generator)[:m]]
        values.append(poly_mmd(x, y, degree=degree, gamma=1.0 / a.shape[1], coef=coef0))
    values = torch.stack(values)
    return float(values.mean()), float(values.std(unbiased=False))


def _squared_distances(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    # Expanded form uses a matmul (fast for D ~ 1000); float64 keeps the cancellation error negligible.
    return (x.pow(2).sum(1, keepdim=True) + y.pow(2).sum(1) - 2 * x @ y.T).clamp_min(0)


def _kth_neighbour_radii(x: torch.Tensor, k: int, chunk: int) -> torch.Tensor:
    """Squared distance from each row to its k-th nearest *other* row (index 0 of the sorted row is itself)."""
    return torch.cat([_squared_distances(x[i : i + chunk], x).kthvalue(k + 1, dim=1).values for i in range(0, len(x), chunk)])


def _inside_any_ball(queries: torch.Tensor, centres: torch.Tensor, radii: torch.Tensor, chunk: int) -> torch.Tensor:
    return torch.cat([(_squared_distances(queries[i : i + chunk], centres) <= radii).any(1) for i in range(0, len(queries), chunk)])


def precision_recall(real_features: Any, fake_features: Any, k: int = 3, chunk_size: int = 1024) -> tuple[float, float]:
    """Improved precision and recall (Kynkäänniemi et al., 2019) with k-NN manifold estimates.

    Each set's manifold is the union of balls around its samples, each ball reaching that sample's k-th nearest
    neighbour within the set. Precision = fraction of fake samples inside the real manifold (fidelity); recall =
    fraction of real samples inside the fake manifold (coverage). Memory is ``chunk_size x N`` per step.
    """
    real, fake = _feature_pair(real_features, fake_features, min_rows=k + 1)
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    real_radii, fake_radii = _kth_neighbour_radii(real, k, chunk_size), _kth_neighbour_radii(fake, k, chunk_size)
    precision = _inside_any_ball(fake, real, real_radii, chunk_size).double().mean()
    recall = _inside_any_ball(real, fake, fake_radii, chunk_size).double().mean()
    return float(precision), float(recall)


# ------------------------------------------------------------------------------------------------ classifier output


def _probabilities(probs: Any) -> torch.Tensor:
    p = torch.as_tensor(probs).double()
    if p.ndim != 2 or p.shape[0] < 1 or p.shape[1] < 2:
        raise ValueError(f"expected class probabilities [N, C] with C >= 2, got shape {tuple(p.shape)}")
    if not torch.isfinite(p).all() or (p < 0).any() or not torch.allclose(p.sum(1), torch.ones_like(p[:, 0]), atol=1e-4):
        raise ValueError("class probabilities must be finite, non-negative and sum to 1 per row (apply softmax to logits)")
    return p


def inception_score_like(probs: Any) -> float:
    """``exp(E_x KL(p(y|x) || p(y)))`` over the classifier's classes, with ``p(y)`` the mean prediction.

    Ranges from 1 (every sample gets the same prediction) to C (confident predictions, classes used equally).
    Computed over the whole set in one split; the original Inception Score averages 10 splits of an ImageNet
    classifier, so values are comparable only with this classifier.
    """
    p = _probabilities(probs)
    marginal = p.mean(0, keepdim=True)
    # xlogy gives 0 * log 0 = 0 for classes a sample never predicts.
    kl = (torch.special.xlogy(p, p) - torch.special.xlogy(p, marginal)).sum(1)
    return math.exp(float(kl.mean()))


def class_accuracy(logits: Any, labels: Any) -> float:
    """Fraction of samples whose arg-max class equals their label (e.g. the conditioning label of a generated image)."""
    logits, labels = torch.as_tensor(logits), torch.as_tensor(labels)
    if logits.ndim != 2 or labels.shape != (logits.shape[0],) or logits.shape[0] == 0:
        raise ValueError(f"expected logits [N, C] and labels [N] with N >= 1, got {tuple(logits.shape)} and {tuple(labels.shape)}")
    if labels.is_floating_point() or labels.min() < 0 or labels.max() >= logits.shape[1]:
        raise ValueError(f"labels must be integers in [0, {logits.shape[1]})")
    return float((logits.argmax(1) == labels).double().mean())
