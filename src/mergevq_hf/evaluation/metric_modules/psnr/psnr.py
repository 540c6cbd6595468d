"""PSNR as a local 🤗 ``evaluate`` module: ``evaluate.load("<this folder>")`` works offline.

It calls :func:`mergevq_hf.evaluation.metrics.psnr`, so the value equals the direct function's. evaluate's Arrow
round-trip costs seconds per thousand images; for large evaluations call the function directly.
"""

import datasets
import evaluate
import numpy as np
import torch

from mergevq_hf.evaluation.metrics import psnr

_IMAGE = datasets.Sequence(datasets.Sequence(datasets.Sequence(datasets.Value("float32"))))  # [C, H, W], any size


class PSNR(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description="Peak signal-to-noise ratio 10 log10(data_range^2 / MSE) in dB, per image, averaged over images.",
            citation="",
            inputs_description=(
                "predictions, references: images [N, C, H, W] (arrays or nested lists), by default in [-1, 1]. "
                "data_range: max - min of the pixel scale (default 2.0). Returns {'psnr': float}."
            ),
            features=datasets.Features({"predictions": _IMAGE, "references": _IMAGE}),
        )

    def _compute(self, predictions, references, data_range=2.0):
        prediction = torch.from_numpy(np.asarray(predictions, dtype=np.float32))
        reference = torch.from_numpy(np.asarray(references, dtype=np.float32))
        return {"psnr": float(psnr(prediction, reference, data_range=data_range))}
