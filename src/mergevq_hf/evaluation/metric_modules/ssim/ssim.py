"""SSIM (Gaussian window) as a local 🤗 ``evaluate`` module: ``evaluate.load("<this folder>")`` works offline.

It calls :func:`mergevq_hf.evaluation.metrics.ssim`, so the value equals the direct function's. evaluate's Arrow
round-trip costs seconds per thousand images; for large evaluations call the function directly.
"""

import datasets
import evaluate
import numpy as np
import torch

from mergevq_hf.evaluation.metrics import ssim

_IMAGE = datasets.Sequence(datasets.Sequence(datasets.Sequence(datasets.Value("float32"))))  # [C, H, W], any size


class SSIM(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description="Structural similarity (Wang et al. 2004) on images mapped to [0, 1], 11x11 Gaussian window (sigma 1.5), per image, averaged (torchmetrics).",
            citation="Wang, Bovik, Sheikh, Simoncelli. Image quality assessment: from error visibility to structural similarity. IEEE TIP 2004.",
            inputs_description=(
                "predictions, references: images [N, C, H, W] (arrays or nested lists, H, W >= 11), by default in "
                "[-1, 1]. value_range: (low, high) of the pixel scale (default (-1, 1)). Returns {'ssim': float}."
            ),
            features=datasets.Features({"predictions": _IMAGE, "references": _IMAGE}),
        )

    def _compute(self, predictions, references, value_range=(-1.0, 1.0)):
        prediction = torch.from_numpy(np.asarray(predictions, dtype=np.float32))
        reference = torch.from_numpy(np.asarray(references, dtype=np.float32))
        return {"ssim": float(ssim(prediction, reference, value_range=tuple(value_range)))}
