"""Fine-tune a trained tokenizer's source recovery, or rebuild it larger, on its frozen codes (paper §3.2, Table A2).

The paper trains its 7M-parameter recovery module in stage 1 and fine-tunes it for a few epochs afterwards. Here the
tokenizer stays frozen: its codes and true source maps come from the pre-tokenised cache that stage 2 builds
(:func:`~.trainer_mergear.pretokenize`), so a step costs only the recovery module. ``--hidden_size`` and friends build
a new module of that size; without them the tokenizer's own module is fine-tuned. ``--with_positions true`` trains it to
read each token's grid position, which random-order generation knows (docs/design.md §1.5).

    python -m mergevq_hf.training.train_source_recovery --tokenizer TOKENIZER --output_dir DIR \\
        --hidden_size 96 --num_layers 2 --with_positions true --max_steps 3000 --use_cpu

DIR receives a complete tokenizer folder (the same encoder, quantiser and decoder weights, the new recovery) that
``MergeVQModel.from_pretrained`` loads, plus the Trainer's checkpoints; ``--resume_from_checkpoint last`` resumes.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import sys
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from transformers import HfArgumentParser, TrainingArguments

from ..modeling_mergevq import MergeVQModel
from ..source_recovery import SourceRecovery
from . import load_image_dataset
from .atomic_checkpoints import clear_write_errors, end_run, start_run
from .train_mergear import DataArguments, token_distribution
from .trainer_mergear import MergeARTokenDataset, MergeARTrainer, pretokenize

logger = logging.getLogger(__name__)

__all__ = ["SourceRecoveryTokenDataset", "SourceRecoveryTrainingModel", "collate_source_maps", "main", "parse_args", "source_map_accuracy"]


@dataclass
class RecoveryArguments:
    tokenizer: str = field(metadata={"help": "Trained MergeVQ tokenizer (folder or Hub id) whose source recovery is trained."})
    hidden_size: int | None = field(default=None, metadata={"help": "Build a new recovery module of this width (default: fine-tune the tokenizer's own)."})
    num_layers: int | None = field(default=None, metadata={"help": "Blocks of the new module (default: the tokenizer's)."})
    num_heads: int | None = field(default=None, metadata={"help": "Attention heads of the new module (default: the tokenizer's)."})
    intermediate_size: int | None = field(default=None, metadata={"help": "MLP width of the new module (default: 4 x hidden_size)."})
    with_positions: bool = field(default=False, metadata={"help": "Also read each token's grid position (known in random-order generation)."})
    num_token_layers: int | None = field(default=None, metadata={"help": "Self-attention blocks over the K tokens before the decoder blocks (default: the tokenizer's)."})


@dataclass
class SourceRecoveryTrainingArguments(TrainingArguments):
    """AdamW (0.9, 0.95) as in the paper's fine-tune, with a higher default rate for a module trained from scratch."""

    learning_rate: float = field(default=1e-3, metadata={"help": "Peak learning rate."})
    adam_beta2: float = field(default=0.95, metadata={"help": "AdamW beta2."})
    weight_decay: float = field(default=0.01, metadata={"help": "AdamW weight decay."})
    warmup_steps: float = field(default=0.05, metadata={"help": "Warmup steps (int) or fraction of all steps (float < 1)."})
    remove_unused_columns: bool = field(default=False, metadata={"help": "Examples are built by the dataset; keep them whole."})


class SourceRecoveryTokenDataset(MergeARTokenDataset):
    """Examples ``{"indices": [K], "source_map": [L]}`` with K drawn per example as in stage 2."""

    def __getitem__(self, index: int) -> dict[str, Any]:
        row = self.tokens[int(index)]
        choice = int(np.random.default_rng([self.seed, self.epoch, int(index)]).choice(len(self.candidates), p=self.probs))
        return {"indices": torch.tensor(row["indices"][choice], dtype=torch.long),
                "source_map": torch.tensor(row["source_map"][choice], dtype=torch.long)}


def collate_source_maps(examples: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
    """Stack examples of different K: ``indices`` right-padded with 0 and ``token_mask`` marking the real tokens."""
    if not examples:
        raise ValueError("collate_source_maps got an empty batch")
    num_tokens = max(len(example["indices"]) for example in examples)
    indices = torch.zeros(len(examples), num_tokens, dtype=torch.long)
    token_mask = torch.zeros(len(examples), num_tokens, dtype=torch.bool)
    for row, example in enumerate(examples):
        indices[row, : len(example["indices"])] = example["indices"]
        token_mask[row, : len(example["indices"])] = True
    return {"indices": indices, "source_map": torch.stack([example["source_map"] for example in examples]), "token_mask": token_mask}


class SourceRecoveryTrainingModel(nn.Module):
    """The recovery module and the tokenizer's frozen code table: what the Trainer optimises."""

    def __init__(self, recovery: SourceRecovery, quantize: nn.Module, with_positions: bool):
        super().__init__()
        self.recovery, self.quantize, self.with_positions = recovery, quantize, with_positions
        self.quantize.requires_grad_(False)

    def logits(self, indices: torch.Tensor, source_map: torch.Tensor, token_mask: torch.Tensor | None = None) -> torch.Tensor:
        token_mask = torch.ones_like(indices, dtype=torch.bool) if token_mask is None else token_mask
        codes = self.quantize.indices_to_codes(indices, dtype=torch.float32)
        positions = None
        if self.with_positions:  # padded tokens own no position: park them at 0; the recovery masks them out
            positions = SourceRecovery.token_positions(source_map, indices.shape[1]).masked_fill(~token_mask, 0)
        return self.recovery(codes, positions, token_mask)

    def forward(self, indices, source_map, token_mask=None) -> dict[str, torch.Tensor]:
        logits = self.logits(indices, source_map, token_mask)
        return {"loss": SourceRecovery.loss(logits, source_map), "logits": logits}


@torch.no_grad()
def source_map_accuracy(model: SourceRecoveryTrainingModel, tokens, num_tokens_candidates, batch_size: int = 256) -> dict[int, float]:
    """Fraction of grid positions put under their true parent, per K, over a :func:`pretokenize` dataset."""
    model.eval()
    correct = dict.fromkeys(num_tokens_candidates, 0)
    total = 0
    for start in range(0, len(tokens), batch_size):
        rows = tokens[start : start + batch_size]
        for choice, k in enumerate(num_tokens_candidates):
            indices = torch.tensor([r[choice] for r in rows["indices"]], dtype=torch.long)
            source_map = torch.tensor([r[choice] for r in rows["source_map"]], dtype=torch.long)
            correct[k] += int((model.logits(indices, source_map).argmax(-1) == source_map).sum())
        total += len(rows["indices"]) * len(rows["source_map"][0][0])
    return {k: correct[k] / total for k in num_tokens_candidates}


def build_recovery(tokenizer: MergeVQModel, args: RecoveryArguments) -> SourceRecovery:
    """The tokenizer's own module (fine-tune), or a new one of the requested size; the tokenizer config follows."""
    config = tokenizer.config
    new_size = {
        "source_recovery_hidden_size": args.hidden_size, "source_recovery_num_layers": args.num_layers,
        "source_recovery_num_heads": args.num_heads,
        "source_recovery_intermediate_size": args.intermediate_size or (4 * args.hidden_size if args.hidden_size else None),
        "source_recovery_num_token_layers": args.num_token_layers,
    }
    new_size = {name: value for name, value in new_size.items() if value is not None}
    rebuild = bool(new_size) or args.with_positions != config.source_recovery_with_positions or tokenizer.source_recovery is None
    if not rebuild:
        return tokenizer.source_recovery
    for name, value in new_size.items():
        setattr(config, name, value)
    config.use_source_recovery, config.source_recovery_with_positions = True, args.with_positions
    config.validate_architecture()
    recovery = SourceRecovery(
        config.codebook_bits, config.num_patches, config.source_recovery_hidden_size, config.source_recovery_num_layers,
        config.source_recovery_num_heads, config.source_recovery_intermediate_size, config.source_recovery_with_positions,
        config.source_recovery_num_token_layers,
    )
    if not new_size and tokenizer.source_recovery is not None:  # same size, positions added: start from the trained one
        recovery.load_state_dict(tokenizer.source_recovery.state_dict(), strict=False)
    nn.init.normal_(recovery.position_queries, std=config.initializer_range)
    if recovery.token_position_embed is not None:
        nn.init.zeros_(recovery.token_position_embed.weight)  # starts as the position-free module
    return recovery


def parse_args(argv: list[str] | None = None):
    parser = HfArgumentParser((RecoveryArguments, DataArguments, SourceRecoveryTrainingArguments))
    return parser.parse_args_into_dataclasses(args=sys.argv[1:] if argv is None else argv)


def main(argv: list[str] | None = None):
    """Train, evaluate per K, and write the tokenizer with its new recovery; ``None`` when the run was finished."""
    recovery_args, data_args, args = parse_args(argv)
    resume, finished = start_run(args, logger)
    if finished:
        return None

    tokenizer = MergeVQModel.from_pretrained(recovery_args.tokenizer).eval()
    candidates, probs = token_distribution(data_args, tokenizer.config)

    def tokens(split: str, max_samples: int | None):
        images = load_image_dataset(data_args.dataset, split, image_column=data_args.image_column, label_column=data_args.label_column,
                                    config_name=data_args.dataset_config, max_samples=max_samples, image_size=tokenizer.config.image_size, seed=args.seed)
        with args.main_process_first(desc=f"pre-tokenising {split}"):
            return pretokenize(images, tokenizer, candidates, image_column=data_args.image_column, label_column=data_args.label_column,
                               batch_size=data_args.tokenize_batch_size, cache_dir=data_args.token_cache_dir)

    train = SourceRecoveryTokenDataset(tokens(data_args.split, data_args.max_train_samples), candidates, probs, seed=args.seed)
    held_out = tokens(data_args.eval_split, data_args.eval_samples) if data_args.eval_split and data_args.eval_samples > 0 else None
    model = SourceRecoveryTrainingModel(build_recovery(tokenizer, recovery_args), tokenizer.quantize, recovery_args.with_positions)
    trainer = MergeARTrainer(model=model, args=args, train_dataset=train, data_collator=collate_source_maps)
    result = trainer.train(resume_from_checkpoint=resume)

    tokenizer.source_recovery = model.recovery
    with clear_write_errors(args.output_dir, "the tokenizer with its new source recovery"):
        tokenizer.save_pretrained(args.output_dir)
        processor = os.path.join(recovery_args.tokenizer, "preprocessor_config.json")
        if os.path.isfile(processor):
            shutil.copyfile(processor, os.path.join(args.output_dir, "preprocessor_config.json"))
        trainer.save_metrics("train", result.metrics)  # after the export: marks the run finished for a resume
        trainer.save_state()
        if held_out is not None:
            accuracy = source_map_accuracy(model, held_out, candidates)
            metrics = {f"positions_under_true_parent_k{k}": round(value, 4) for k, value in accuracy.items()}
            logger.info("held-out %s (%d images): %s", data_args.eval_split, len(held_out), metrics)
            with open(os.path.join(args.output_dir, "source_recovery_eval.json"), "w") as f:
                json.dump(metrics, f, indent=2)
    return trainer


if __name__ == "__main__":
    main()
    end_run()
