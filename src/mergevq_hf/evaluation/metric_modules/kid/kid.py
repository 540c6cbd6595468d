"""Kernel (Inception) distance between two feature sets as a local 🤗 ``evaluate`` module (works offline).

Inputs are *features*, not images. It calls :func:`mergevq_hf.evaluation.metrics.kernel_distance` (unbiased MMD^2,
cubic polynomial kernel, averaged over random subsets).
"""

import datasets
import evaluate
import numpy as np

from mergevq_hf.evaluation.metrics import kernel_distance

_FEATURES = datasets.Sequence(datasets.Value("float64"))


class KID(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description="Unbiased MMD^2 with the kernel (x.y / D + 1)^3, mean and std over random subsets.",
            citation="Bińkowski, Sutherland, Arbel, Gretton. Demystifying MMD GANs. ICLR 2018.",
            inputs_description=(
                "predictions: generated features [N, D]; references: real features [N, D] (same number of rows). "
                "subset_size (1000), num_subsets (100), seed (0). Returns {'kid': float, 'kid_std': float}."
            ),
            features=datasets.Features({"predictions": _FEATURES, "references": _FEATURES}),
        )

    def _compute(self, predictions, references, subset_size=1000, num_subsets=100, seed=0):
        mean, std = kernel_distance(
            np.asarray(predictions, dtype=np.float64), np.asarray(references, dtype=np.float64),
            subset_size=subset_size, num_subsets=num_subsets, seed=seed,
        )
        return {"kid": mean, "kid_std": std}
