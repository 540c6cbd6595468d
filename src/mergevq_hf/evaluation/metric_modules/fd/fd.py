"""Fréchet distance between two feature sets as a local 🤗 ``evaluate`` module (works offline).

Inputs are *features* (e.g. from ``mergevq_hf.evaluation.features``), not images: FID = this on Inception features.
It calls :func:`mergevq_hf.evaluation.metrics.frechet_distance`. The two sets may differ in size, but FD is biased
by N: compare values only at equal N and with the same feature network.
"""

import datasets
import evaluate
import numpy as np

from mergevq_hf.evaluation.metrics import frechet_distance

_FEATURES = datasets.Sequence(datasets.Value("float64"))


class FD(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description="Fréchet distance |mu_p - mu_r|^2 + tr(S_p + S_r - 2 (S_p S_r)^(1/2)) between Gaussian fits of two feature sets.",
            citation="Heusel et al. GANs trained by a two time-scale update rule converge to a local Nash equilibrium. NeurIPS 2017.",
            inputs_description=(
                "predictions: generated/reconstructed features [N, D]; references: real features [M, D] "
                "(pass them with the same number of rows: evaluate pairs them row by row). Returns {'fd': float}."
            ),
            features=datasets.Features({"predictions": _FEATURES, "references": _FEATURES}),
        )

    def _compute(self, predictions, references):
        return {"fd": frechet_distance(np.asarray(predictions, dtype=np.float64), np.asarray(references, dtype=np.float64))}
