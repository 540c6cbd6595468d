"""Sampling helpers shared by MergeAR, MergeRandAR and the pipeline: argument checks and per-row random draws.

The checks give every entry point (`MergeARForCausalLM.generate`, `MergeRandARForCausalLM.generate`,
`MergeVQPipeline.__call__`) the same rules and messages for guidance, temperature, top-k and top-p.

Per-row draws make an image depend on its own generator only and not on the batch it was made in. One
`torch.multinomial` over a whole batch consumes one random stream for all rows: row i's sample then depends on
how many rows came before it. Drawing each row from its own `torch.Generator` makes image i of a grid reproducible
alone. The decoding loops of MergeAR (`generate(generators=...)`) and MergeRandAR (`generate(generator=[...])`)
call `sample_rows` with the per-image generators the pipeline hands them.
"""

import math
import warnings
from numbers import Integral, Real

import torch

GUIDANCE_SCHEDULES = ("constant", "linear")
# The pipeline's, CLI's and Space's guidance when the user gives none: the smallest of 2, 2.5 and 3 at which the bundled
# model's samples are classified as their class at least 0.95 times as often as real images, chosen on a draw of
# samples apart from the model card's (benchmarks/RESULTS.md, issue 13; the recipe's second seed agrees). Guidance 2
# has the better FD-LeNet, as DiT's FID scale is not its pipeline's default either.
DEFAULT_GUIDANCE_SCALE = 2.5


def is_integer(value) -> bool:
    """A Python or numpy integer, not a bool."""
    return isinstance(value, Integral) and not isinstance(value, bool)


def is_finite_number(value) -> bool:
    """A finite Python or numpy real number, not a bool."""
    return isinstance(value, Real) and not isinstance(value, bool) and math.isfinite(value)


def check_guidance_scale(scale, name: str = "guidance_scale") -> float | None:
    """Classifier-free guidance scale `s` of `u + s (c - u)`: None when guidance is off (None or 1), else a float."""
    if scale is not None and not (is_finite_number(scale) and scale >= 0):
        raise ValueError(f"{name} must be None or a finite number >= 0 (1 = no guidance), got {scale!r}.")
    return None if scale is None or scale == 1 else float(scale)


def check_guidance_schedule(schedule, name: str = "guidance_schedule") -> None:
    if schedule not in GUIDANCE_SCHEDULES:
        raise ValueError(f"{name} must be one of {GUIDANCE_SCHEDULES}, got {schedule!r}.")


def scheduled_guidance(scale: float, schedule: str, steps, num_steps: int):
    """The guidance scale at (0-based) generation step(s) ``steps`` of ``num_steps``: ``scale`` throughout
    (``"constant"``), or rising linearly from 1 at the first step to ``scale`` at the last (``"linear"``, RandAR)."""
    if schedule == "constant":
        return scale
    return 1 + (scale - 1) * (steps / (num_steps - 1) if num_steps > 1 else 1.0)


def renamed_keyword(value, old_value, name: str, old_name: str, default=None):
    """The value of keyword `name`, formerly `old_name`: the old keyword still works, with a FutureWarning.

    `value` is what was passed as `name` (`default` when it was not); giving both with different values is an error.
    """
    if old_value is None:
        return value
    warnings.warn(f"`{old_name}` is deprecated, use `{name}` (same meaning).", FutureWarning, stacklevel=3)
    if value != default and value != old_value:
        raise ValueError(f"{old_name}={old_value!r} and {name}={value!r} disagree; pass {name} only.")
    return old_value


def check_sampling_arguments(temperature, top_k, top_p) -> None:
    """`temperature` a finite number > 0; `top_k` None or an integer >= 0 (0 = off); `top_p` None or in (0, 1]."""
    if not (is_finite_number(temperature) and temperature > 0):
        raise ValueError(f"temperature must be a number > 0 and finite, got {temperature!r}.")
    if top_k is not None and not (is_integer(top_k) and top_k >= 0):
        raise ValueError(f"top_k must be None or an integer >= 0 (0 = off), got {top_k!r}.")
    if top_p is not None and not (is_finite_number(top_p) and 0 < top_p <= 1):
        raise ValueError(f"top_p must be None or a number in (0, 1] (1 = off), got {top_p!r}.")



def check_generators(generators, batch_size: int) -> list[torch.Generator]:
    """`generators` as a list of `batch_size` torch.Generators, or a ValueError that says what was expected."""
    if not isinstance(generators, (list, tuple)):
        raise ValueError(
            f"generators must be a list of {batch_size} torch.Generator (one per row), got {type(generators).__name__}"
        )
    if len(generators) != batch_size or not all(isinstance(g, torch.Generator) for g in generators):
        kinds = sorted({type(g).__name__ for g in generators})
        raise ValueError(
            f"generators must be a list of {batch_size} torch.Generator (one per row), got {len(generators)} of {kinds}"
        )
    return list(generators)


def sample_rows(probs: torch.Tensor, generators) -> torch.LongTensor:
    """One multinomial draw per row of `probs` ([B, V], rows summing to 1), row i from `generators[i]`.

    A generator may live on another device than `probs` (e.g. CPU generators with a GPU model): each row is drawn on
    its generator's device and the result comes back on `probs.device`. Returns [B] indices.
    """
    if probs.dim() != 2:
        raise ValueError(f"probs must be [batch, vocabulary], got shape {tuple(probs.shape)}")
    generators = check_generators(generators, probs.shape[0])
    samples = [
        torch.multinomial(row[None].to(generator.device), 1, generator=generator)[0, 0].to(probs.device)
        for row, generator in zip(probs, generators)
    ]
    return torch.stack(samples) if samples else torch.empty(0, dtype=torch.long, device=probs.device)


__all__ = [
    "DEFAULT_GUIDANCE_SCALE",
    "GUIDANCE_SCHEDULES",
    "check_generators",
    "check_guidance_scale",
    "check_guidance_schedule",
    "check_sampling_arguments",
    "is_finite_number",
    "is_integer",
    "renamed_keyword",
    "sample_rows",
    "scheduled_guidance",
]
