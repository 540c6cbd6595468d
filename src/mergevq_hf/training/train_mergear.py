#!/usr/bin/env python
"""Train MergeAR (stage 2) on a trained MergeVQ tokenizer with the stock 🤗 Trainer.

The images are tokenised once at every candidate K (cached with ``datasets``); each training example then samples
its own K (merge instruction) and learns the raster sequence of its merged codes, with label dropout for CFG.

    mergevq train-tokenizer --output_dir outputs/tokenizer ...          # stage 1 first
    mergevq train-ar --tokenizer outputs/tokenizer --output_dir outputs/mergear --preset tiny \
        --dataset fashion_mnist --max_steps 2000 --per_device_train_batch_size 64 --logging_steps 50 --use_cpu
    mergevq train-ar ... --resume_from_checkpoint last             # continue a killed run
    mergevq train-ar ... --generation_mode random                  # MergeRandAR (random order)
    torchrun --nproc_per_node 2 -m mergevq_hf.training.train_mergear ...      # DDP
    accelerate launch --config_file examples/accelerate_configs/fsdp.yaml -m mergevq_hf.training.train_mergear ...

The AR model's vocabulary and grid are taken from the tokenizer. Every ``TrainingArguments`` flag works
(``--bf16``, ``--push_to_hub``, ...). Output folder: the model, ``checkpoint-N/``, ``loss_curves.png``,
``train_results.json`` and ``eval_results.json`` (held-out loss on ``--eval_split``).
"""

from __future__ import annotations

import json
import logging
import os
import sys
from dataclasses import dataclass, field

from transformers import HfArgumentParser, PretrainedConfig

from ..configuration_mergear import MergeARConfig
from ..configuration_randar import MergeRandARConfig
from ..modeling_mergear import MergeARForCausalLM
from ..modeling_mergevq import MergeVQModel
from ..modeling_randar import MergeRandARForCausalLM
from . import load_image_dataset
from .atomic_checkpoints import end_run, log_metrics, publish_run, save_run, start_run
from .trainer_mergear import (
    MergeARTokenDataset,
    MergeARTrainer,
    MergeARTrainingArguments,
    mergear_config_for_tokenizer,
    pretokenize,
)
from .trainer_randar import MergeRandARTokenDataset, collate_random_order

logger = logging.getLogger(__name__)


@dataclass
class ModelArguments:
    tokenizer: str = field(metadata={"help": "Trained MergeVQ tokenizer (folder or Hub id)."})
    preset: str = field(default="tiny", metadata={"help": "MergeARConfig preset: 'tiny', 'L' or 'L-1024'."})
    config_overrides: str | None = field(default=None, metadata={"help": 'JSON dict of MergeARConfig fields, e.g. \'{"class_dropout_prob": 0.1}\'.'})
    init_from: str | None = field(default=None, metadata={"help": "Start from this pretrained MergeAR (folder or Hub id) instead of a preset."})
    generation_mode: str = field(default="raster", metadata={"help": "'raster' (MergeAR) or 'random' (MergeRandAR: K merged tokens in random order with position instructions)."})


@dataclass
class DataArguments:
    dataset: str = field(default="fashion_mnist", metadata={"help": "'fashion_mnist', 'procedural[:N]', 'imagefolder:<dir>', a saved dataset folder or a datasets id."})
    dataset_config: str | None = field(default=None, metadata={"help": "Config name for datasets.load_dataset."})
    split: str = field(default="train", metadata={"help": "Training split."})
    image_column: str = field(default="image", metadata={"help": "Image column."})
    label_column: str = field(default="label", metadata={"help": "Class-label column (integers)."})
    max_train_samples: int | None = field(default=None, metadata={"help": "Use only the first N training images."})
    eval_split: str = field(default="test", metadata={"help": "Split for the held-out loss ('' to skip)."})
    eval_samples: int = field(default=512, metadata={"help": "Images of eval_split for the held-out loss (0 to skip)."})
    num_tokens_candidates: list[int] | None = field(default=None, metadata={"help": "K values (default: the tokenizer config's candidates)."})
    num_tokens_probs: list[float] | None = field(default=None, metadata={"help": "Their probabilities (default: the tokenizer's, or uniform)."})
    token_cache_dir: str | None = field(default=None, metadata={"help": "Cache folder of the pre-tokenised data."})
    tokenize_batch_size: int = field(default=256, metadata={"help": "Batch size of the pre-tokenisation pass."})


def parse_args(argv: list[str] | None = None):
    parser = HfArgumentParser((ModelArguments, DataArguments, MergeARTrainingArguments))
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) == 1 and argv[0].endswith(".json"):
        return parser.parse_json_file(os.path.abspath(argv[0]))
    return parser.parse_args_into_dataclasses(args=argv)


def num_classes_of(dataset, label_column: str) -> int:
    feature = dataset.features[label_column]
    if hasattr(feature, "num_classes"):
        return int(feature.num_classes)
    labels = dataset[label_column]
    if not labels or not all(isinstance(v, int) and v >= 0 for v in labels):
        raise ValueError(f"column {label_column!r} must hold non-negative integer class labels")
    return max(labels) + 1


def token_distribution(data_args: DataArguments, tokenizer_config) -> tuple[list[int], list[float] | None]:
    if data_args.num_tokens_candidates:
        return data_args.num_tokens_candidates, data_args.num_tokens_probs
    if data_args.num_tokens_probs:
        raise ValueError("--num_tokens_probs needs --num_tokens_candidates")
    return tokenizer_config.num_tokens_candidates or [tokenizer_config.num_tokens], tokenizer_config.num_tokens_probs


def main(argv: list[str] | None = None) -> MergeARTrainer | None:
    """Train, export and evaluate; returns the trainer, or ``None`` when resuming a run that is already finished."""
    model_args, data_args, args = parse_args(argv)
    if model_args.init_from and model_args.config_overrides:
        raise ValueError("--config_overrides builds a new model; --init_from loads one with its own config: pass one of them")
    if model_args.generation_mode not in ("raster", "random"):
        raise ValueError(f"--generation_mode must be 'raster' or 'random', got {model_args.generation_mode!r}")
    random_order = model_args.generation_mode == "random"
    if model_args.init_from:  # a MergeAR loaded as a MergeRandAR (or back) would train under the other objective
        expected = (MergeRandARConfig if random_order else MergeARConfig).model_type
        found = PretrainedConfig.get_config_dict(model_args.init_from)[0].get("model_type")
        if found != expected:
            raise ValueError(f"--init_from {model_args.init_from!r} holds a {found!r} model, but --generation_mode "
                             f"{model_args.generation_mode!r} trains a {expected!r} one")
    resume, finished = start_run(args, logger)
    if finished:
        return None

    tokenizer = MergeVQModel.from_pretrained(model_args.tokenizer).to(args.device)
    candidates, probs = token_distribution(data_args, tokenizer.config)

    def tokens(split: str, max_samples: int | None):
        images = load_image_dataset(data_args.dataset, split, image_column=data_args.image_column, label_column=data_args.label_column,
                                    config_name=data_args.dataset_config, max_samples=max_samples, image_size=tokenizer.config.image_size, seed=args.seed)
        with args.main_process_first(desc=f"pre-tokenising {split}"):  # the first process fills the cache, the others read it
            return images, pretokenize(images, tokenizer, candidates, image_column=data_args.image_column, label_column=data_args.label_column,
                                       batch_size=data_args.tokenize_batch_size, cache_dir=data_args.token_cache_dir)

    dataset_class = MergeRandARTokenDataset if random_order else MergeARTokenDataset
    model_class = MergeRandARForCausalLM if random_order else MergeARForCausalLM
    images, train_tokens = tokens(data_args.split, data_args.max_train_samples)
    train = dataset_class(train_tokens, candidates, probs, seed=args.seed)
    evaluation = None
    if data_args.eval_split and data_args.eval_samples > 0:
        try:
            evaluation = dataset_class(tokens(data_args.eval_split, data_args.eval_samples)[1], candidates, probs, seed=args.seed + 1)
        except (ValueError, KeyError) as err:  # e.g. an image folder without a test split
            logger.warning("no held-out loss: split %r unavailable (%s)", data_args.eval_split, err)

    if model_args.init_from:
        model = model_class.from_pretrained(model_args.init_from)
    else:
        overrides = json.loads(model_args.config_overrides) if model_args.config_overrides else {}
        if not isinstance(overrides, dict):
            raise ValueError(f"--config_overrides must be a JSON object, got {model_args.config_overrides!r}")
        config_class = MergeRandARConfig if random_order else None
        config = mergear_config_for_tokenizer(model_args.preset, tokenizer.config, num_classes_of(images, data_args.label_column), config_class=config_class, **overrides)
        model = model_class(config)
    del tokenizer

    collator = {"data_collator": collate_random_order} if random_order else {}
    trainer = MergeARTrainer(model=model, args=args, train_dataset=train, eval_dataset=evaluation, **collator)
    if resume:
        logger.info("resuming from %s", resume)
    save_run(trainer, trainer.train(resume_from_checkpoint=resume))
    if evaluation is not None:
        log_metrics(trainer, "eval", trainer.evaluate())
    publish_run(trainer, f"{type(model).__name__} {model_args.preset} on {data_args.dataset}", logger)
    return trainer


if __name__ == "__main__":
    main()
    end_run()
