"""Which pipeline the CLI, the Space and the README demo use when the user names none.

Order: the explicit `model` argument, then the `MERGEVQ_MODEL` environment variable (a local folder or a Hub id),
then the model bundled with the package, then a tiny randomly initialised pipeline. The last one only shows that
the plumbing works; its images are noise, so callers must show `LoadedPipeline.notice` to the user.
"""

from __future__ import annotations

import os
from typing import NamedTuple

import torch

from .bundled import bundled_model_path
from .configuration_mergear import MergeARConfig
from .configuration_mergevq import MergeVQConfig
from .modeling_mergear import MergeARForCausalLM
from .modeling_mergevq import MergeVQModel
from .pipeline_mergevq import MergeVQPipeline

MODEL_ENV_VAR = "MERGEVQ_MODEL"
RANDOM_MODEL_NAME = "tiny-random"
RANDOM_MODEL_NOTICE = (
    "No trained model is installed: using a tiny randomly initialised MergeVQ + MergeAR, so images are noise. "
    f"Set {MODEL_ENV_VAR} (or the CLI's --model) to a trained pipeline folder or Hub id."
)


class LoadedPipeline(NamedTuple):
    pipeline: MergeVQPipeline
    source: str  # the folder or Hub id it came from, or RANDOM_MODEL_NAME
    is_random: bool  # untrained weights: the caller must tell the user (see `notice`)

    @property
    def notice(self) -> str | None:
        return RANDOM_MODEL_NOTICE if self.is_random else None


def build_tiny_random_pipeline(seed: int = 0) -> MergeVQPipeline:
    """The "tiny" tokenizer with a "tiny" MergeAR sized to match it (codes, grid, K, 10 classes), seeded weights."""
    vq_config = MergeVQConfig.from_preset("tiny")
    ar_config = MergeARConfig.from_tokenizer_config(vq_config, preset="tiny")
    with torch.random.fork_rng(devices=[]):  # seed the weights without disturbing the caller's RNG
        torch.manual_seed(seed)
        vq_model = MergeVQModel(vq_config).eval()
        transformer = MergeARForCausalLM(ar_config).eval()
    return MergeVQPipeline(vq_model=vq_model, transformer=transformer)


def load_default_pipeline(model: str | os.PathLike | None = None) -> LoadedPipeline:
    """Load `model` (folder or Hub id) or the default chain described in the module docstring.

    Raises OSError/ValueError (from `from_pretrained`) when a named model cannot be loaded. Never runs remote code.
    """
    source = model or os.environ.get(MODEL_ENV_VAR) or bundled_model_path()
    if not source:
        return LoadedPipeline(build_tiny_random_pipeline(), RANDOM_MODEL_NAME, True)
    if os.path.isdir(source) and not os.path.isfile(os.path.join(source, "model_index.json")):
        # diffusers would report this as an unreachable Hub repo; say what is actually wrong.
        raise FileNotFoundError(f"{source} is not a pipeline folder: it has no model_index.json")
    return LoadedPipeline(MergeVQPipeline.from_pretrained(str(source)), str(source), False)


__all__ = ["LoadedPipeline", "MODEL_ENV_VAR", "RANDOM_MODEL_NOTICE", "build_tiny_random_pipeline", "load_default_pipeline"]
