"""Stage-2 MergeAR training: pre-tokenise images once, then train with the stock 🤗 ``Trainer``.

1. :func:`pretokenize` runs the frozen tokenizer over a labelled image dataset once, for every candidate K, and keeps
   ``indices`` (``[C][K_c]`` codes) and ``source_map`` (``[C][L]``) per image in a ``datasets`` Arrow file. The file
   is named after a hash of the data, the tokenizer's weights and the K list, so a second run (or every process but
   the first, under ``main_process_first``) just memory-maps it.
2. :class:`MergeARTokenDataset` turns a row into one training example: it samples K from the stage-2 distribution
   (per example, from a generator seeded by (seed, epoch, index), so a resumed run sees the same K's), and builds the
   raster targets ``labels[j] = indices[K][source_map[K][j]]`` (every position carries its merged parent's code).
3. :class:`MergeARTrainer` is the stock ``Trainer`` plus atomic checkpoints and a callback telling the dataset the
   epoch. ``MergeARForCausalLM.forward(class_labels, num_tokens, labels)`` does the rest: label dropout for CFG
   (``config.class_dropout_prob``, in training mode) and the sparsity mask built from ``labels``.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from transformers import Trainer, TrainerCallback, TrainingArguments

from .atomic_checkpoints import AtomicCheckpointMixin
from .data import ImageTransform, collate_images
from .sharding import ShardedTrainingMixin

__all__ = [
    "MergeARTokenDataset",
    "MergeARTrainer",
    "MergeARTrainingArguments",
    "default_token_cache_dir",
    "mergear_config_for_tokenizer",
    "pretokenize",
]

_CACHE_VERSION = "mergear-tokens-v1"


@dataclass
class MergeARTrainingArguments(TrainingArguments):
    """``TrainingArguments`` with the released stage-2 optimiser as defaults (docs/design.md §2): AdamW (0.9, 0.95),
    lr 3e-4, weight decay 0.05, gradient clipping 1.0, 5 % linear warmup then linear decay."""

    learning_rate: float = field(default=3e-4, metadata={"help": "Peak learning rate."})
    adam_beta2: float = field(default=0.95, metadata={"help": "AdamW beta2 (released recipe: 0.95)."})
    weight_decay: float = field(default=0.05, metadata={"help": "AdamW weight decay."})
    warmup_steps: float = field(default=0.05, metadata={"help": "Warmup steps (int) or fraction of all steps (float < 1)."})
    remove_unused_columns: bool = field(default=False, metadata={"help": "Examples are built by MergeARTokenDataset; keep them whole."})
    ddp_find_unused_parameters: bool | None = field(default=False, metadata={"help": "Every MergeAR weight is used in every step: skip DDP's search for unused ones."})


def default_token_cache_dir() -> Path:
    """``$MERGEVQ_HF_CACHE/mergear_tokens``, else ``$XDG_CACHE_HOME`` or ``~/.cache``, ``/mergevq_hf/mergear_tokens``."""
    root = os.environ.get("MERGEVQ_HF_CACHE") or os.path.join(os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")), "mergevq_hf")
    return Path(root) / "mergear_tokens"


def _weights_hash(model: torch.nn.Module) -> str:
    h = hashlib.blake2b(digest_size=16)
    for name, tensor in sorted(model.state_dict().items()):
        t = tensor.detach().cpu().contiguous()
        h.update(f"{name}|{tuple(t.shape)}|{t.dtype}".encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def mergear_config_for_tokenizer(preset: str, tokenizer_config, num_classes: int, config_class=None, **overrides):
    """:meth:`MergeARConfig.from_tokenizer_config <mergevq_hf.MergeARConfig.from_tokenizer_config>` of size
    ``preset`` with ``num_classes`` classes; ``config_class`` builds a subclass instead, e.g. ``MergeRandARConfig``.
    """
    from ..configuration_mergear import MergeARConfig

    config_class = config_class or MergeARConfig
    return config_class.from_tokenizer_config(tokenizer_config, preset=preset, num_classes=num_classes, **overrides)


def pretokenize(
    dataset,
    tokenizer,
    num_tokens_candidates: Sequence[int],
    *,
    image_column: str = "image",
    label_column: str = "label",
    batch_size: int = 64,
    cache_dir: str | os.PathLike | None = None,
    data_key: str | None = None,
):
    """Tokenise every image of ``dataset`` at every K of ``num_tokens_candidates``; cached on disk.

    Args:
        dataset: a ``datasets.Dataset`` with ``image_column`` (images of any size; they are resized and
            centre-cropped to ``tokenizer.config.image_size``) and an integer ``label_column``.
        tokenizer: a :class:`~mergevq_hf.MergeVQModel` (run in eval mode, without gradients, on its device).
        num_tokens_candidates: the K values (each in [1, L]).
        cache_dir: folder of the Arrow cache (default :func:`default_token_cache_dir`).
        data_key: identifies the data in the cache name instead of the dataset fingerprint.

    Returns a memory-mapped ``datasets.Dataset`` with ``label`` (int64), ``indices`` (``[C][K_c]`` int32) and
    ``source_map`` (``[C][L]`` int16) columns, in the order of ``dataset``.
    """
    import datasets

    config = tokenizer.config
    candidates = [int(k) for k in num_tokens_candidates]
    if not candidates or any(not 1 <= k <= config.num_patches for k in candidates):
        raise ValueError(f"num_tokens_candidates must be K values in [1, {config.num_patches}], got {candidates}")
    for column in (image_column, label_column):
        if column not in dataset.column_names:
            raise ValueError(f"dataset has no column {column!r} (columns: {dataset.column_names})")

    key = hashlib.blake2b(digest_size=16)
    key.update(f"{_CACHE_VERSION}|{data_key or dataset._fingerprint}|{len(dataset)}|{image_column}|{label_column}|{candidates}|{config.image_size}|{_weights_hash(tokenizer)}".encode())
    path = Path(cache_dir or default_token_cache_dir()) / f"tokens-{key.hexdigest()}.arrow"
    if path.is_file():
        return datasets.Dataset.from_file(str(path))

    transform = ImageTransform(size=config.image_size, image_column=image_column, label_column=None)
    device = next(tokenizer.parameters()).device
    was_training = tokenizer.training
    tokenizer.eval()

    @torch.no_grad()
    def encode(batch: dict[str, list]) -> dict[str, list]:
        pixels = torch.stack(transform(batch)["pixel_values"]).to(device=device, dtype=tokenizer.dtype)
        per_k = [tokenizer.encode(pixels, num_tokens=k) for k in candidates]
        indices = [[enc.indices[i].to(torch.int32).tolist() for enc in per_k] for i in range(len(pixels))]
        source_map = [[enc.source_map[i].to(torch.int16).tolist() for enc in per_k] for i in range(len(pixels))]
        return {"label": [int(v) for v in batch[label_column]], "indices": indices, "source_map": source_map}

    features = datasets.Features(
        {
            "label": datasets.Value("int64"),
            "indices": datasets.List(datasets.List(datasets.Value("int32"))),
            "source_map": datasets.List(datasets.List(datasets.Value("int16"))),
        }
    )
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".tmp{os.getpid()}.arrow")
    try:
        tokens = dataset.map(
            encode, batched=True, batch_size=batch_size, remove_columns=dataset.column_names, features=features,
            cache_file_name=str(tmp), new_fingerprint=key.hexdigest(), desc=f"pre-tokenising at K={candidates}",
        )
        del tokens  # release the file before it is renamed into place
        os.replace(tmp, path)  # atomic: a killed run never leaves a truncated cache behind
    finally:
        tokenizer.train(was_training)
        tmp.unlink(missing_ok=True)
    return datasets.Dataset.from_file(str(path))


class MergeARTokenDataset(torch.utils.data.Dataset):
    """Training examples ``{"class_labels", "num_tokens", "labels"}`` from a :func:`pretokenize` output.

    Each example samples its own K from ``num_tokens_probs`` (uniform when ``None``) with a generator seeded by
    (``seed``, epoch, index): the draw does not depend on the data order, the process, or anything outside the
    checkpoint, so resumed and multi-process runs see the same K per example. :class:`MergeARTrainer` sets the epoch.

    Args:
        tokens: the :func:`pretokenize` dataset.
        num_tokens_candidates: the K list ``tokens`` was made with (checked against the stored lengths).
        num_tokens_probs: probabilities of the candidates.
        seed: base seed (use the Trainer's ``seed``).
    """

    def __init__(self, tokens, num_tokens_candidates: Sequence[int], num_tokens_probs: Sequence[float] | None = None, seed: int = 0) -> None:
        for column in ("label", "indices", "source_map"):
            if column not in tokens.column_names:
                raise ValueError(f"tokens must come from pretokenize (columns label, indices, source_map), got {tokens.column_names}")
        self.candidates = [int(k) for k in num_tokens_candidates]
        probs = np.full(len(self.candidates), 1.0 / len(self.candidates)) if num_tokens_probs is None else np.asarray(num_tokens_probs, dtype=np.float64)
        if len(probs) != len(self.candidates) or (probs < 0).any() or abs(probs.sum() - 1.0) > 1e-4:
            raise ValueError(f"num_tokens_probs must be {len(self.candidates)} non-negative numbers summing to 1, got {list(probs)}")
        if len(tokens):
            stored = [len(ids) for ids in tokens[0]["indices"]]
            if stored != self.candidates:
                raise ValueError(f"the tokens were made for K = {stored}, not {self.candidates}; pre-tokenise with the same candidates")
        self.tokens, self.probs, self.seed, self.epoch = tokens, probs / probs.sum(), int(seed), 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return len(self.tokens)

    def __getitem__(self, index: int) -> dict[str, Any]:
        row = self.tokens[int(index)]
        choice = int(np.random.default_rng([self.seed, self.epoch, int(index)]).choice(len(self.candidates), p=self.probs))
        indices = torch.tensor(row["indices"][choice], dtype=torch.long)
        source_map = torch.tensor(row["source_map"][choice], dtype=torch.long)
        return {"class_labels": int(row["label"]), "num_tokens": self.candidates[choice], "labels": indices[source_map]}


class _SetEpoch(TrainerCallback):
    """Tells a dataset with ``set_epoch`` the epoch that starts (accelerate forwards it only to samplers)."""

    def __init__(self, dataset) -> None:
        self.dataset = dataset

    def on_epoch_begin(self, args, state, control, **kwargs):
        self.dataset.set_epoch(int(state.epoch or 0))


class MergeARTrainer(ShardedTrainingMixin, AtomicCheckpointMixin, Trainer):
    """The stock ``Trainer`` for :class:`~mergevq_hf.MergeARForCausalLM`, with atomic checkpoints, the stacking
    collator by default, and the epoch passed to a :class:`MergeARTokenDataset`."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("data_collator", collate_images)
        super().__init__(*args, **kwargs)
        if hasattr(self.train_dataset, "set_epoch"):
            self.add_callback(_SetEpoch(self.train_dataset))
