"""Per-row random draws, so that an image depends on its own generator only and not on the batch it was made in.

One `torch.multinomial` over a whole batch consumes one random stream for all rows: row i's sample then depends on
how many rows came before it. Drawing each row from its own `torch.Generator` makes image i of a grid reproducible
alone. The decoding loops of MergeAR (`generate(generators=...)`) and MergeRandAR (`generate(generator=[...])`)
call `sample_rows` with the per-image generators the pipeline hands them.
"""

import torch


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


__all__ = ["check_generators", "sample_rows"]
