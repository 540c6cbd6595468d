"""Train the MergeVQ tokenizer (stage 1) with the 🤗 Trainer: generator + PatchGAN discriminator, EMA, K sampling.

Run as ``mergevq train-tokenizer``, ``python -m mergevq_hf.training.train_tokenizer`` or ``examples/train_tokenizer.py``:

    # CPU, tiny model, Fashion-MNIST from Debian (offline; MobileNetV2 perceptual loss and teacher)
    mergevq train-tokenizer --output_dir outputs/tokenizer --preset tiny --dataset fashion_mnist \
        --max_steps 2000 --per_device_train_batch_size 32 --logging_steps 50 --save_steps 500 --use_cpu
    # no pretrained network at all
    mergevq train-tokenizer ... --teacher none --perceptual_loss none
    # the released code's alignment recipe: second encoder pass on a strong view, teacher run every step
    mergevq train-tokenizer ... --alignment paper
    # continue a killed run from its newest complete checkpoint
    mergevq train-tokenizer ... --resume_from_checkpoint last
    # several processes (DDP; gloo on CPU with --use_cpu, NCCL on GPUs)
    torchrun --nproc_per_node 2 -m mergevq_hf.training.train_tokenizer ...

Every ``TrainingArguments`` flag works (``--bf16``, ``--gradient_accumulation_steps``, ``--push_to_hub``,
``--hub_model_id``, ...), plus the GAN recipe of ``MergeVQTrainingArguments``. A single ``.json`` argument is read as
a file of arguments. Output folder: the EMA weights (``MergeVQModel.from_pretrained(output_dir)``), ``raw/`` (live
weights), ``checkpoint-N/``, ``loss_curves.png``, ``train_results.json``, ``eval_results.json``.
"""

from __future__ import annotations

import json
import logging
import os
import sys
from dataclasses import dataclass, field

import torch
from transformers import HfArgumentParser

from ..configuration_mergevq import MergeVQConfig
from ..modeling_mergevq import MergeVQModel
from . import (
    AlignmentViewsTransform,
    ImageTransform,
    attach_teacher_features,
    build_teacher,
    collate_images,
    load_image_dataset,
    precompute_teacher_features,
)
from .atomic_checkpoints import end_run, log_metrics, publish_run, save_run, start_run
from .trainer_tokenizer import RAW_WEIGHTS_SUBFOLDER, MergeVQTrainer, MergeVQTrainingArguments, reconstruction_metrics

logger = logging.getLogger(__name__)


@dataclass
class ModelArguments:
    preset: str = field(default="tiny", metadata={"help": "MergeVQConfig preset: 'tiny' (32x32), 'G', 'G+R' or 'R'."})
    config_overrides: str | None = field(default=None, metadata={"help": 'JSON dict of config fields, e.g. \'{"hidden_size": 64}\'.'})
    init_from: str | None = field(default=None, metadata={"help": "Start from this pretrained tokenizer (folder or Hub id) instead of a preset."})
    teacher: str = field(default="mobilenet_v2", metadata={"help": "Alignment teacher: 'mobilenet_v2' (offline), 'dinov2', a Hub id / folder, or 'none'."})
    teacher_image_size: int | None = field(default=None, metadata={"help": "Teacher input size (default 64 for MobileNetV2, 224 otherwise)."})
    feature_cache_dir: str | None = field(default=None, metadata={"help": "Cache folder of precomputed teacher features."})


@dataclass
class DataArguments:
    dataset: str = field(default="fashion_mnist", metadata={"help": "'fashion_mnist', 'procedural[:N]', 'imagefolder:<dir>', a saved dataset folder or a datasets id."})
    dataset_config: str | None = field(default=None, metadata={"help": "Config name for datasets.load_dataset."})
    split: str = field(default="train", metadata={"help": "Training split."})
    image_column: str = field(default="image", metadata={"help": "Image column."})
    max_train_samples: int | None = field(default=None, metadata={"help": "Use only the first N training images."})
    eval_split: str = field(default="test", metadata={"help": "Split for the final reconstruction metrics ('' to skip)."})
    eval_samples: int = field(default=256, metadata={"help": "Images of eval_split for the final metrics (0 to skip)."})


def parse_args(argv: list[str] | None = None):
    parser = HfArgumentParser((ModelArguments, DataArguments, MergeVQTrainingArguments))
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) == 1 and argv[0].endswith(".json"):
        return parser.parse_json_file(os.path.abspath(argv[0]))
    return parser.parse_args_into_dataclasses(args=argv)


def build_model(model_args: ModelArguments, feature_dim: int | None) -> MergeVQModel:
    """A fresh tokenizer whose alignment head matches the teacher (or has none), or a pretrained one."""
    if model_args.init_from:
        model = MergeVQModel.from_pretrained(model_args.init_from)
        if feature_dim is not None and model.config.alignment_dim != feature_dim:
            raise ValueError(f"{model_args.init_from} has alignment_dim={model.config.alignment_dim}, but teacher {model_args.teacher!r} gives {feature_dim}-d features")
        return model
    overrides = json.loads(model_args.config_overrides) if model_args.config_overrides else {}
    if not isinstance(overrides, dict):
        raise ValueError(f"--config_overrides must be a JSON object, got {model_args.config_overrides!r}")
    if feature_dim is None:
        overrides.setdefault("alignment_head", "none")
    else:
        overrides["alignment_dim"] = feature_dim
    return MergeVQModel(MergeVQConfig.from_preset(model_args.preset, **overrides))


def eval_images(data_args: DataArguments, image_size: int, seed: int) -> torch.Tensor | None:
    if not data_args.eval_split or data_args.eval_samples <= 0:
        return None
    try:
        ds = load_image_dataset(data_args.dataset, data_args.eval_split, image_column=data_args.image_column, config_name=data_args.dataset_config,
                                max_samples=data_args.eval_samples, image_size=image_size, seed=seed)
    except (ValueError, KeyError) as err:  # e.g. an image folder without a test split
        logger.warning("no final reconstruction metrics: split %r unavailable (%s)", data_args.eval_split, err)
        return None
    ds = ds.with_transform(ImageTransform(image_size, data_args.image_column, label_column=None))
    return collate_images([ds[i] for i in range(len(ds))])["pixel_values"]


def main(argv: list[str] | None = None) -> MergeVQTrainer | None:
    """Train, export and evaluate; returns the trainer, or ``None`` when resuming a run that is already finished."""
    model_args, data_args, args = parse_args(argv)
    resume, finished = start_run(args, logger)
    if finished:
        return None

    teacher = build_teacher(model_args.teacher, image_size=model_args.teacher_image_size)
    if args.alignment == "paper" and teacher is None:
        raise ValueError("--alignment paper runs the teacher every step: pass --teacher mobilenet_v2, dinov2 or a Hub id / folder (not 'none'), or use --alignment cached")
    model = build_model(model_args, None if teacher is None else teacher.feature_dim)
    image_size = model.config.image_size
    train = load_image_dataset(data_args.dataset, data_args.split, image_column=data_args.image_column, config_name=data_args.dataset_config,
                               max_samples=data_args.max_train_samples, image_size=image_size, seed=args.seed)
    if args.alignment == "paper":  # views made per example, teacher run per step: no feature cache
        train = train.with_transform(AlignmentViewsTransform(image_size, teacher.image_size, image_column=data_args.image_column, label_column=None, seed=args.seed))
    else:
        passthrough = []
        if teacher is not None:
            with args.main_process_first(desc="teacher features"):  # the first process fills the cache, the others read it
                features = precompute_teacher_features(teacher.to(args.device), train, image_column=data_args.image_column,
                                                       cache_dir=model_args.feature_cache_dir, progress=args.should_log)
            train, passthrough = attach_teacher_features(train, features), ["teacher_features"]
            teacher = None
        train = train.with_transform(ImageTransform(image_size, data_args.image_column, label_column=None, passthrough=passthrough))

    trainer = MergeVQTrainer(model=model, args=args, train_dataset=train, teacher=teacher)
    if resume:
        logger.info("resuming from %s", resume)
    save_run(trainer, trainer.train(resume_from_checkpoint=resume))  # EMA weights -> output_dir, live -> output_dir/raw
    if trainer.is_world_process_zero():
        pixels = eval_images(data_args, image_size, args.seed)
        if pixels is not None and trainer.is_fsdp2_sharded:  # the weights are sharded over the processes: score the export
            raw_dir = os.path.join(args.output_dir, RAW_WEIGHTS_SUBFOLDER) if trainer.ema is not None else args.output_dir
            metrics = {f"raw_{k}": v for k, v in reconstruction_metrics(MergeVQModel.from_pretrained(raw_dir), pixels).items()}
            if trainer.ema is not None:
                metrics.update({f"ema_{k}": v for k, v in reconstruction_metrics(MergeVQModel.from_pretrained(args.output_dir), pixels).items()})
            log_metrics(trainer, "eval", metrics)
        elif pixels is not None:
            metrics = {f"raw_{k}": v for k, v in reconstruction_metrics(model, pixels).items()}
            if trainer.ema is not None:
                with trainer.ema.average_parameters(model):
                    metrics.update({f"ema_{k}": v for k, v in reconstruction_metrics(model, pixels).items()})
            log_metrics(trainer, "eval", metrics)
    publish_run(trainer, f"MergeVQ {model_args.preset} on {data_args.dataset}", logger)
    return trainer


if __name__ == "__main__":
    main()
    end_run()
