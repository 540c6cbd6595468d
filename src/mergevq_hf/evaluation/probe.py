"""Representation quality of frozen features: linear probe and k-NN classification accuracy.

The usual protocol (docs/design.md §4): features from the frozen tokenizer encoder (``get_image_features``: all
L tokens, no merging), a classifier fitted on the train split, top-1 accuracy on the test split, fixed subsets and
seeds. The linear probe is scikit-learn's multinomial logistic regression on standardised features (a convex fit, so
no learning-rate schedule to tune); k-NN is a cosine-similarity majority vote.
"""

from __future__ import annotations

from typing import Any

import torch

__all__ = ["image_features", "knn_accuracy", "linear_probe"]


def _probe_inputs(train_features, train_labels, test_features, test_labels) -> tuple[torch.Tensor, ...]:
    tensors = [torch.as_tensor(x) for x in (train_features, train_labels, test_features, test_labels)]
    x_train, y_train, x_test, y_test = tensors
    for name, x, y in (("train", x_train, y_train), ("test", x_test, y_test)):
        if x.ndim != 2 or y.shape != (x.shape[0],) or x.shape[0] == 0:
            raise ValueError(f"{name} features must be [N, D] with N >= 1 and labels [N], got {tuple(x.shape)} and {tuple(y.shape)}")
        if y.is_floating_point():
            raise ValueError(f"{name} labels must be integers, got dtype {y.dtype}")
        if not torch.isfinite(x).all():
            raise ValueError(f"{name} features contain NaN or infinite values")
    if x_train.shape[1] != x_test.shape[1]:
        raise ValueError(f"train and test features have different dimensions: {x_train.shape[1]} and {x_test.shape[1]}")
    if len(torch.unique(y_train)) < 2:
        raise ValueError("the train labels must contain at least two classes")
    return x_train, y_train.long(), x_test, y_test.long()


def linear_probe(train_features: Any, train_labels: Any, test_features: Any, test_labels: Any, max_iter: int = 1000, C: float = 1.0) -> float:
    """Test top-1 accuracy of a logistic-regression probe fitted on standardised train features."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    x_train, y_train, x_test, y_test = _probe_inputs(train_features, train_labels, test_features, test_labels)
    probe = make_pipeline(StandardScaler(), LogisticRegression(max_iter=max_iter, C=C))
    probe.fit(x_train.double().numpy(), y_train.numpy())
    return float(probe.score(x_test.double().numpy(), y_test.numpy()))


def knn_accuracy(train_features: Any, train_labels: Any, test_features: Any, test_labels: Any, k: int = 20, chunk_size: int = 1024) -> float:
    """Test top-1 accuracy of a ``k``-nearest-neighbour vote under cosine similarity (ties go to the lower class id)."""
    x_train, y_train, x_test, y_test = _probe_inputs(train_features, train_labels, test_features, test_labels)
    if not 1 <= k <= len(x_train):
        raise ValueError(f"k must lie in 1..{len(x_train)} (the train size), got {k}")
    x_train = torch.nn.functional.normalize(x_train.double(), dim=1)
    x_test = torch.nn.functional.normalize(x_test.double(), dim=1)
    num_classes = int(max(y_train.max(), y_test.max())) + 1
    correct = 0
    for i in range(0, len(x_test), chunk_size):
        neighbours = (x_test[i : i + chunk_size] @ x_train.T).topk(k, dim=1).indices
        votes = torch.nn.functional.one_hot(y_train[neighbours], num_classes).sum(1)
        correct += int((votes.argmax(1) == y_test[i : i + chunk_size]).sum())
    return correct / len(x_test)


@torch.no_grad()
def image_features(model: Any, images: torch.Tensor, pooling: str = "cls", batch_size: int = 256, num_tokens: int | None = None) -> torch.Tensor:
    """``model.get_image_features(pixel_values, pooling).pooler_output`` over ``images`` ``[N, 3, H, W]`` in [-1, 1],
    batched; ``num_tokens`` (MergeVQ only) merges to K tokens first instead of keeping all L.

    Returns float32 ``[N, D]`` on the CPU; batches run on the model's device and dtype.
    """
    if not hasattr(model, "get_image_features"):
        raise ValueError(f"{type(model).__name__} has no get_image_features(pixel_values, pooling) method")
    if not isinstance(images, torch.Tensor) or images.ndim != 4 or len(images) == 0:
        raise ValueError(f"images must be a non-empty tensor [N, 3, H, W], got {getattr(images, 'shape', type(images))}")
    param = next(model.parameters())
    extra = {} if num_tokens is None else {"num_tokens": num_tokens}
    was_training = model.training
    model.eval()
    features = [
        model.get_image_features(b.to(param.device, param.dtype), pooling=pooling, **extra).pooler_output.float().cpu()
        for b in images.split(batch_size)
    ]
    model.train(was_training)
    return torch.cat(features)
