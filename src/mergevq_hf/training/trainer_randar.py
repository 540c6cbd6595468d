"""Stage-2 training of the random-order generator (``MergeRandARForCausalLM``) with the stock 🤗 ``Trainer``.

It reuses MergeAR's pipeline (:func:`~.trainer_mergear.pretokenize` cache, per-example K sampling,
``MergeARTrainer``); only the example differs. :class:`MergeRandARTokenDataset` turns a pre-tokenised row into the
K merged codes and their positions (each group's first grid position) in a random order, drawn per example from
the same (seed, epoch, index) generator as K; :func:`collate_random_order` pads a batch of mixed K with -100::

    train = MergeRandARTokenDataset(pretokenize(images, tokenizer, candidates), candidates, seed=args.seed)
    trainer = MergeARTrainer(model=randar, args=args, train_dataset=train, data_collator=collate_random_order)
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from ..source_recovery import SourceRecovery
from .trainer_mergear import MergeARTokenDataset

__all__ = ["MergeRandARTokenDataset", "collate_random_order", "first_positions"]

IGNORE_INDEX = -100


def first_positions(source_map: torch.Tensor, num_tokens: int) -> torch.Tensor:
    """``[L]`` source map with values in ``[0, K)`` -> ``[K]`` first (raster-minimum) grid position of each group."""
    length = source_map.shape[-1]
    first = SourceRecovery.token_positions(source_map[None], num_tokens)[0]
    if (first == length).any():
        raise ValueError(f"the source map leaves some of the K = {num_tokens} merged tokens without a position")
    return first


class MergeRandARTokenDataset(MergeARTokenDataset):
    """Training examples ``{"class_labels", "labels", "token_positions"}``: the K codes and their positions, permuted.

    K is drawn as in :class:`~.trainer_mergear.MergeARTokenDataset`; the permutation comes from the same
    per-(seed, epoch, index) generator, so resumed and multi-process runs see the same orders.
    """

    def __getitem__(self, index: int) -> dict[str, Any]:
        row = self.tokens[int(index)]
        rng = np.random.default_rng([self.seed, self.epoch, int(index)])
        choice = int(rng.choice(len(self.candidates), p=self.probs))
        num_tokens = self.candidates[choice]
        codes = torch.tensor(row["indices"][choice], dtype=torch.long)
        positions = first_positions(torch.tensor(row["source_map"][choice], dtype=torch.long), num_tokens)
        order = torch.from_numpy(rng.permutation(num_tokens))
        return {"class_labels": int(row["label"]), "labels": codes[order], "token_positions": positions[order]}


def collate_random_order(examples: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
    """Stack examples of different K: ``labels`` and ``token_positions`` are right-padded with -100."""
    if not examples:
        raise ValueError("collate_random_order got an empty batch")
    steps = max(len(example["labels"]) for example in examples)
    labels = torch.full((len(examples), steps), IGNORE_INDEX, dtype=torch.long)
    positions = torch.full_like(labels, IGNORE_INDEX)
    for row, example in enumerate(examples):
        labels[row, : len(example["labels"])] = torch.as_tensor(example["labels"])
        positions[row, : len(example["token_positions"])] = torch.as_tensor(example["token_positions"])
    class_labels = torch.tensor([int(example["class_labels"]) for example in examples], dtype=torch.long)
    return {"class_labels": class_labels, "labels": labels, "token_positions": positions}
