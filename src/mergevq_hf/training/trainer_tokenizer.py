"""Stage-1 MergeVQ training with the 🤗 ``Trainer``: the tokenizer (generator) and a PatchGAN discriminator.

The tokenizer is the Trainer's model, and its update is the stock Trainer update (backward through the accelerator,
gradient accumulation, clipping, LR schedule). :meth:`MergeVQTrainer.compute_loss` adds the perceptual and
adversarial terms to the model's own loss. The discriminator update runs inside :meth:`MergeVQTrainer.training_step`,
right after the generator's backward, on the same micro-batch, as the released code's manual optimisation does
(docs/design.md §2)::

    every micro-batch:  K ~ p(K) (one K for the whole batch) -> G forward -> G loss backward -> D loss backward
    every `gradient_accumulation_steps` micro-batches:  D optimiser step (here), G optimiser step (Trainer)

Generator loss = model loss (L1 + entropy + commitment [+ alignment] [+ source recovery], weighted by the config)
+ ``perceptual_weight`` * perceptual + ``adversarial_weight`` * non-saturating GAN loss (a fixed weight, no
adaptive weight). Discriminator loss = hinge + ``lecam_weight`` * LeCAM.

Alignment (``args.alignment``, docs/design.md §1.4): ``"cached"`` aligns the main pass's CLS to teacher features the
batches carry (computed once per image); ``"paper"`` hands the model the teacher's features of the batch's teacher view
(the teacher runs here, without a graph) and the strong view, which the model encodes a second time at the step's K
inside the same forward call (so DDP and FSDP see one forward), aligning only that pass's CLS.

The perceptual network and the discriminator are held by the trainer, never by the ``PreTrainedModel``. Checkpoints
(written atomically, see :mod:`.atomic_checkpoints`) add ``discriminator.safetensors`` (discriminator + LeCAM
averages), ``discriminator_optimizer.pt`` and ``ema.safetensors`` to the Trainer's files, and resuming restores them.

Export: :meth:`MergeVQTrainer.save_model` (also used by ``push_to_hub``) writes the **EMA** weights to the output
folder, which is what ``MergeVQModel.from_pretrained(output_dir)`` loads, and the raw (live) weights to
``output_dir/raw``. Checkpoints hold the raw weights (the EMA is in ``ema.safetensors``).

The discriminator is small and stays replicated on every process: under DDP (and any other engine) its gradients
are averaged with one explicit all-reduce before its optimiser step, so it needs no wrapper of its own. Under FSDP2
(:mod:`.sharding`) it stays replicated on purpose (accelerate's FSDP2 path prepares one model per run), while the
tokenizer and its EMA are sharded; the frozen perceptual network is a constant on every process.
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import nn
from transformers import Trainer, TrainerCallback, TrainingArguments

from .atomic_checkpoints import AtomicCheckpointMixin
from .data import collate_images
from .ema import EMAModel
from .losses import LeCAMRegularizer, PatchGANDiscriminator, hinge_d_loss, non_saturating_g_loss
from .perceptual import PerceptualLoss
from .sharding import ShardedTrainingMixin

__all__ = [
    "DISCRIMINATOR_NAME",
    "DISCRIMINATOR_OPTIMIZER_NAME",
    "EMA_NAME",
    "RAW_WEIGHTS_SUBFOLDER",
    "MergeVQTrainer",
    "MergeVQTrainingArguments",
    "reconstruction_metrics",
]

DISCRIMINATOR_NAME = "discriminator.safetensors"
DISCRIMINATOR_OPTIMIZER_NAME = "discriminator_optimizer.pt"
EMA_NAME = "ema.safetensors"
RAW_WEIGHTS_SUBFOLDER = "raw"
ALIGNMENT_RECIPES = ("cached", "paper")
TRAINABLE_PARTS = ("all", "decoder")
DECODED_SOURCE_MAPS = ("true", "predicted")


@dataclass
class MergeVQTrainingArguments(TrainingArguments):
    """``TrainingArguments`` plus the stage-1 GAN recipe. Defaults follow the released code (docs/design.md §2).

    The learning rate, Adam betas, epsilon and weight decay of the generator apply to the discriminator too, unless
    ``discriminator_learning_rate`` is set. The discriminator's learning rate stays constant.
    """

    # Recipe defaults that differ from TrainingArguments'.
    learning_rate: float = field(default=1e-4, metadata={"help": "Generator (and, by default, discriminator) learning rate."})
    adam_beta1: float = field(default=0.5, metadata={"help": "Adam beta1 of both optimisers (GAN recipe: 0.5)."})
    adam_beta2: float = field(default=0.9, metadata={"help": "Adam beta2 of both optimisers (GAN recipe: 0.9)."})
    lr_scheduler_type: str = field(default="constant", metadata={"help": "Generator LR schedule (recipe: constant)."})
    remove_unused_columns: bool = field(default=False, metadata={"help": "Keep the image column for on-the-fly transforms."})

    perceptual_loss: str = field(
        default="mobilenet_v2",
        metadata={"help": "Perceptual network: 'mobilenet_v2' (offline ImageNet weights), 'lpips-vgg' (needs lpips + downloads), a .safetensors/.pth MobileNetV2 state dict, or 'none'."},
    )
    perceptual_weight: float = field(default=1.0, metadata={"help": "Weight of the perceptual loss (released code: 1.0)."})
    adversarial_weight: float = field(default=0.1, metadata={"help": "Fixed weight of the generator's non-saturating GAN loss."})
    discriminator_start: int = field(default=0, metadata={"help": "Global step at which the GAN losses switch on."})
    discriminator_learning_rate: float | None = field(default=None, metadata={"help": "Discriminator LR (default: learning_rate)."})
    discriminator_channels: int = field(default=64, metadata={"help": "Channels of the PatchGAN's first conv (ndf)."})
    discriminator_layers: int = field(default=3, metadata={"help": "Stride-2 convs of the PatchGAN."})
    discriminator_norm: str = field(default="batch", metadata={"help": "PatchGAN norm: 'batch' (released), 'group' or 'none'."})
    lecam_weight: float = field(default=0.01, metadata={"help": "Weight of the LeCAM regulariser in the discriminator loss."})
    lecam_decay: float = field(default=0.999, metadata={"help": "EMA decay of LeCAM's logit anchors."})
    ema_decay: float = field(default=0.999, metadata={"help": "EMA decay of the exported weights; 0 disables the EMA."})
    ema_warmup: bool = field(
        default=True,
        metadata={"help": "Use min(ema_decay, (1+n)/(10+n)) at update n so short runs are not dominated by the random init."},
    )
    num_tokens_candidates: list[int] | None = field(
        default=None, metadata={"help": "K values sampled per step (default: the model config's num_tokens_candidates)."}
    )
    num_tokens_probs: list[float] | None = field(default=None, metadata={"help": "Probabilities of the K candidates."})
    random_hflip: bool = field(default=False, metadata={"help": "Flip training images horizontally with probability 0.5."})
    alignment: str = field(
        default="cached",
        metadata={
            "help": "Global-alignment recipe (docs/training.md): 'cached' aligns the main pass's CLS to teacher features "
            "cached once per image; 'paper' (the released code's) runs the encoder a second time at the step's K on a "
            "strong view and the teacher every step on its own random view.",
            "choices": ALIGNMENT_RECIPES,
        },
    )

    trainable: str = field(
        default="all",
        metadata={"help": "'all', or 'decoder' to fine-tune only the decoder of a trained tokenizer (--init_from).", "choices": TRAINABLE_PARTS},
    )
    decode_source_map: str = field(
        default="true",
        metadata={
            "help": "'true', or 'predicted' (with --trainable decoder) to decode through the source recovery's predicted "
            "maps: the decoder random-order generation decodes through (docs/design.md §1.5).",
            "choices": DECODED_SOURCE_MAPS,
        },
    )

    def __post_init__(self):
        if self.trainable not in TRAINABLE_PARTS:
            raise ValueError(f"trainable must be one of {', '.join(map(repr, TRAINABLE_PARTS))}, got {self.trainable!r}")
        if self.decode_source_map not in DECODED_SOURCE_MAPS:
            raise ValueError(f"decode_source_map must be one of {', '.join(map(repr, DECODED_SOURCE_MAPS))}, "
                             f"got {self.decode_source_map!r}")
        if self.decode_source_map == "predicted" and self.trainable != "decoder":
            raise ValueError("decode_source_map='predicted' needs trainable='decoder': the predicted map is not "
                             "differentiable, so the encoder would learn to reconstruct through a map it cannot change")
        if self.alignment not in ALIGNMENT_RECIPES:
            raise ValueError(f"alignment must be one of {', '.join(map(repr, ALIGNMENT_RECIPES))}, got {self.alignment!r}")
        super().__post_init__()
        for name in ("perceptual_weight", "adversarial_weight", "lecam_weight", "discriminator_start"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        if not 0.0 <= self.ema_decay < 1.0:
            raise ValueError(f"ema_decay must lie in [0, 1) (0 disables the EMA), got {self.ema_decay}")
        if self.discriminator_learning_rate is not None and self.discriminator_learning_rate <= 0:
            raise ValueError(f"discriminator_learning_rate must be > 0, got {self.discriminator_learning_rate}")
        if self.fp16:
            raise ValueError("fp16 needs one loss scaler per optimiser, which this trainer does not keep; use --bf16 for mixed precision")
        if self.num_tokens_probs is not None and self.num_tokens_candidates is None:
            raise ValueError("num_tokens_probs needs num_tokens_candidates")


def _check_distribution(candidates, probs, num_patches: int) -> tuple[list[int], np.ndarray]:
    """Validate a K distribution; uniform when ``probs`` is None."""
    candidates = [int(k) for k in candidates]
    if not candidates or any(not 1 <= k <= num_patches for k in candidates):
        raise ValueError(f"num_tokens_candidates must be a non-empty list of K in [1, {num_patches}], got {candidates}")
    if probs is None:
        probs = [1.0 / len(candidates)] * len(candidates)
    probs = np.asarray(probs, dtype=np.float64)
    if len(probs) != len(candidates) or (probs < 0).any() or abs(probs.sum() - 1.0) > 1e-4:
        raise ValueError(f"num_tokens_probs must be {len(candidates)} non-negative numbers summing to 1, got {probs.tolist()}")
    return candidates, probs / probs.sum()


def _check_teacher(alignment: str, teacher: nn.Module | None, config) -> None:
    """A teacher module goes with ``alignment="paper"`` only, and must fit the model's alignment head."""
    if alignment == "cached":
        if teacher is not None:
            raise ValueError("teacher= is run only by alignment='paper'; with 'cached' the batches carry precomputed teacher_features (precompute_teacher_features)")
        return
    if teacher is None:
        raise ValueError("alignment='paper' runs a teacher every step: pass teacher= (build_teacher('mobilenet_v2'), 'dinov2', ...; not 'none'), or use alignment='cached'")
    if config.alignment_head == "none":
        raise ValueError("alignment='paper' needs a model with an alignment head, but this one has alignment_head='none'")
    feature_dim = getattr(teacher, "feature_dim", None)
    if feature_dim and feature_dim != config.alignment_dim:
        raise ValueError(f"the teacher gives {feature_dim}-d features but the model's alignment_dim is {config.alignment_dim}")


@contextlib.contextmanager
def _frozen(module: nn.Module):
    """Parameters of ``module`` are constants for the graphs built inside the block (no grads reach them)."""
    flags = [p.requires_grad for p in module.parameters()]
    module.requires_grad_(False)
    try:
        yield module
    finally:
        for p, flag in zip(module.parameters(), flags):
            p.requires_grad_(flag)


class _EMAUpdate(TrainerCallback):
    """Folds the generator's weights into the EMA after every optimiser step."""

    def __init__(self, ema: EMAModel, model: nn.Module) -> None:
        self.ema, self.model = ema, model

    def on_optimizer_step(self, args, state, control, **kwargs):
        self.ema.step(self.model)


class MergeVQTrainer(ShardedTrainingMixin, AtomicCheckpointMixin, Trainer):
    """``Trainer`` for :class:`~mergevq_hf.MergeVQModel` with a PatchGAN discriminator, LeCAM and EMA.

    Args:
        model: the tokenizer. Its ``config.alignment_dim`` must equal the teacher feature size when the dataset
            provides ``teacher_features``.
        args: :class:`MergeVQTrainingArguments`.
        perceptual: a perceptual-loss module ``(reconstruction, target) -> scalar``; default
            ``PerceptualLoss(args.perceptual_loss)``.
        discriminator: default ``PatchGANDiscriminator`` sized by ``args``.
        teacher: the frozen alignment teacher (:func:`~.teacher.build_teacher`) that ``args.alignment="paper"`` runs
            every step; ``None`` with ``"cached"``. It is held by the trainer, so it is in no optimiser, state dict or
            checkpoint.
        **kwargs: passed to ``Trainer`` (``train_dataset``, ``data_collator`` (default :func:`collate_images`), ...).

    Batches are dicts with ``pixel_values`` ``[B, C, H, W]`` in [-1, 1] and, with ``alignment="cached"``, optionally
    ``teacher_features`` ``[B, alignment_dim]``; with ``alignment="paper"``, ``alignment_pixel_values`` (the strong
    view) and ``teacher_pixel_values`` (the teacher's view), as :class:`~.data.AlignmentViewsTransform` makes them.
    """

    def __init__(self, model, args: MergeVQTrainingArguments, perceptual: nn.Module | None = None, discriminator: nn.Module | None = None, teacher: nn.Module | None = None, **kwargs):
        if not isinstance(args, MergeVQTrainingArguments):
            raise ValueError(f"MergeVQTrainer needs MergeVQTrainingArguments, got {type(args).__name__}")
        _check_teacher(args.alignment, teacher, model.config)
        kwargs.setdefault("data_collator", collate_images)
        # getattr: the grid-VQ baseline of reproduction/ has no separate decoder
        if args.trainable == "decoder" and not isinstance(getattr(model, "decoder", None), nn.Module):
            raise ValueError(f"trainable='decoder' fine-tunes a MergeVQModel's decoder; {type(model).__name__} has "
                             "no .decoder module: train it with trainable='all'")
        if args.decode_source_map == "predicted" and model.source_recovery is None:
            raise ValueError("decode_source_map='predicted' fine-tunes the decoder on the source recovery's maps: "
                             "start from a tokenizer with a trained source recovery (use_source_recovery)")
        if args.trainable == "decoder":  # encoder, quantiser and recovery stay as trained
            model.requires_grad_(False)
            model.decoder.requires_grad_(True)
        super().__init__(model=model, args=args, **kwargs)
        config = model.config
        self.num_tokens_candidates, self.num_tokens_probs = _check_distribution(
            args.num_tokens_candidates or config.num_tokens_candidates or [config.num_tokens],
            args.num_tokens_probs if args.num_tokens_candidates else config.num_tokens_probs,
            config.num_patches,
        )
        device = args.device
        self.perceptual = (perceptual if perceptual is not None else PerceptualLoss(args.perceptual_loss)).to(device)
        self.discriminator = (
            discriminator
            if discriminator is not None
            else PatchGANDiscriminator(config.num_channels, args.discriminator_channels, args.discriminator_layers, args.discriminator_norm)
        ).to(device)
        self.lecam = LeCAMRegularizer(args.lecam_decay).to(device)
        self.teacher = teacher.to(device).eval().requires_grad_(False) if teacher is not None else None
        self.discriminator_optimizer = torch.optim.AdamW(
            self.discriminator.parameters(),
            lr=args.discriminator_learning_rate or args.learning_rate,
            betas=(args.adam_beta1, args.adam_beta2),
            eps=args.adam_epsilon,
            weight_decay=args.weight_decay,
        )
        self.ema = None
        if args.ema_decay > 0:
            if (self.is_fsdp_enabled and not self.accelerator.is_fsdp2) or (self.is_deepspeed_enabled and self.accelerator.state.deepspeed_plugin.zero_stage == 3):
                raise ValueError("the EMA follows the model's own parameter tensors, which FSDP1 and DeepSpeed ZeRO-3 replace by flat buffers; train the tokenizer with DDP, FSDP2 (fsdp_version 2), or ZeRO-1/2, or pass --ema_decay 0")
            self.ema = EMAModel(self.model, decay=args.ema_decay, warmup=args.ema_warmup)
            self.add_callback(_EMAUpdate(self.ema, self.model))
        self._micro_step = 0  # index of the micro-batch inside the current accumulation window
        self._gan_batch: tuple[torch.Tensor, torch.Tensor] | None = None
        self._term_sums: dict[str, torch.Tensor] = {}
        self._term_counts: dict[str, int] = {}
        self._discriminator_synced = False

    # ------------------------------------------------------------------------------------------- per-step randomness

    def _step_rng(self) -> np.random.Generator:
        """Randomness of one micro-batch, a function of (seed, global step, micro-batch) only, so a resumed run
        draws exactly what the uninterrupted run drew."""
        return np.random.default_rng([self.args.seed, self.state.global_step, self._micro_step])

    def sample_num_tokens(self, rng: np.random.Generator | None = None) -> int:
        """K for the current micro-batch (one K per batch: merging needs the same K for every image)."""
        rng = rng if rng is not None else self._step_rng()
        return int(rng.choice(self.num_tokens_candidates, p=self.num_tokens_probs))

    # ------------------------------------------------------------------------------------------------ the two steps

    def training_step(self, model, inputs, num_items_in_batch=None):
        if not self._discriminator_synced:
            self._broadcast_discriminator()
        rng = self._step_rng()
        inputs = dict(inputs, num_tokens=self.sample_num_tokens(rng))
        if self.args.random_hflip:
            pixels = inputs["pixel_values"]
            flip = torch.from_numpy(rng.random(pixels.shape[0]) < 0.5).to(pixels.device)
            inputs["pixel_values"] = torch.where(flip[:, None, None, None], pixels.flip(-1), pixels)

        loss = super().training_step(model, inputs, num_items_in_batch)  # generator: compute_loss + backward

        real, fake = self._gan_batch
        self._gan_batch = None
        if self.state.global_step >= self.args.discriminator_start:
            self.discriminator_step(real, fake)
        self._micro_step = 0 if self.accelerator.sync_gradients else self._micro_step + 1
        return loss

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        """Generator loss of one batch: the model's loss + perceptual + adversarial (discriminator frozen)."""
        args = self.args
        pixel_values = inputs["pixel_values"]
        if args.alignment == "paper":
            model_inputs = self._paper_alignment_inputs(inputs)
        else:
            model_inputs = {"teacher_features": inputs.get("teacher_features")}
        if args.decode_source_map != "true":  # only then: other tokenizers this trainer trains (grid_vq) lack the argument
            model_inputs["decode_source_map"] = args.decode_source_map
        outputs = model(pixel_values=pixel_values, num_tokens=inputs.get("num_tokens"), **model_inputs)
        reconstruction = outputs.reconstruction
        loss = outputs.loss
        terms = {
            name: getattr(outputs, name)
            for name in ("reconstruction_loss", "entropy_loss", "sample_entropy", "batch_entropy", "commitment_loss", "alignment_loss", "source_recovery_loss")
        }
        with self.accelerator.autocast():
            if args.perceptual_weight > 0:
                terms["perceptual_loss"] = self.perceptual(reconstruction, pixel_values)
                loss = loss + args.perceptual_weight * terms["perceptual_loss"]
            if args.adversarial_weight > 0 and self.state.global_step >= args.discriminator_start:
                with _frozen(self.discriminator):
                    terms["generator_adversarial_loss"] = non_saturating_g_loss(self.discriminator(reconstruction).float())
                loss = loss + args.adversarial_weight * terms["generator_adversarial_loss"]
        if model.training:
            self._gan_batch = (pixel_values.detach(), reconstruction.detach())
            self._record(num_tokens=torch.tensor(float(outputs.indices.shape[1]), device=loss.device), **terms)
        return (loss, outputs) if return_outputs else loss

    def _paper_alignment_inputs(self, inputs: dict) -> dict[str, torch.Tensor]:
        """The released recipe's alignment inputs: the teacher's features of its own view (no graph) and the strong
        view, which the model encodes a second time at the step's K; only that pass's CLS is aligned."""
        missing = [key for key in ("alignment_pixel_values", "teacher_pixel_values") if key not in inputs]
        if missing:
            raise ValueError(
                f"alignment='paper' needs batches with {missing} (the student's strong view and the teacher's view); "
                f"build the dataset transform with AlignmentViewsTransform, got keys {sorted(inputs)}"
            )
        with torch.no_grad():
            teacher_features = self.teacher(inputs["teacher_pixel_values"]).float()
        return {"teacher_features": teacher_features, "alignment_pixel_values": inputs["alignment_pixel_values"]}

    def discriminator_step(self, real: torch.Tensor, fake: torch.Tensor) -> torch.Tensor:
        """Discriminator loss on (real, detached reconstruction), backward, and an optimiser step when the
        accumulation window closes. Only the discriminator (and the LeCAM averages) change."""
        args = self.args
        self.discriminator.train()
        with self.accelerator.autocast():
            logits_real = self.discriminator(real.detach()).float()
            logits_fake = self.discriminator(fake.detach()).float()
        hinge = hinge_d_loss(logits_real, logits_fake)
        d_loss = hinge
        terms = {"discriminator_hinge_loss": hinge, "logits_real": logits_real.mean(), "logits_fake": logits_fake.mean()}
        if args.lecam_weight > 0:
            terms["lecam_loss"] = self.lecam(logits_real, logits_fake)
            d_loss = d_loss + args.lecam_weight * terms["lecam_loss"]
        (d_loss / getattr(self, "current_gradient_accumulation_steps", 1)).backward()
        if self.accelerator.sync_gradients:
            self._all_reduce_discriminator_grads()
            self.discriminator_optimizer.step()
            self.discriminator_optimizer.zero_grad(set_to_none=True)
        self._record(discriminator_loss=d_loss, **terms)
        return d_loss.detach()

    # ------------------------------------------------------------------------------------- multi-process helpers

    def _broadcast_discriminator(self) -> None:
        """Start every process from rank 0's discriminator (it is not wrapped by DDP, which would do this)."""
        if self.accelerator.num_processes > 1:
            with torch.no_grad():
                for tensor in list(self.discriminator.parameters()) + list(self.discriminator.buffers()):
                    torch.distributed.broadcast(tensor.data, src=0)
        self._discriminator_synced = True

    def _all_reduce_discriminator_grads(self) -> None:
        world = self.accelerator.num_processes
        if world == 1:
            return
        grads = [p.grad for p in self.discriminator.parameters() if p.grad is not None]
        flat = torch.cat([g.reshape(-1) for g in grads])
        torch.distributed.all_reduce(flat)  # one collective for the whole discriminator
        flat /= world
        offset = 0
        for g in grads:
            g.copy_(flat[offset : offset + g.numel()].view_as(g))
            offset += g.numel()

    # ----------------------------------------------------------------------------------------------------- logging

    def _record(self, **terms) -> None:
        for name, value in terms.items():
            if value is None:
                continue
            value = value.detach().float()
            self._term_sums[name] = self._term_sums[name] + value if name in self._term_sums else value
            self._term_counts[name] = self._term_counts.get(name, 0) + 1

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        """Add the averages of every loss term since the last log (averaged over processes too)."""
        if "loss" in logs and self._term_sums:
            names = sorted(self._term_sums)
            sums = torch.stack([self._term_sums[n] for n in names])
            counts = torch.tensor([float(self._term_counts[n]) for n in names], device=sums.device)
            if self.accelerator.num_processes > 1:
                sums, counts = self.accelerator.reduce(sums, "sum"), self.accelerator.reduce(counts, "sum")
            logs.update({n: float(v) for n, v in zip(names, (sums / counts).tolist())})
            self._term_sums, self._term_counts = {}, {}
        super().log(logs, start_time)

    # ------------------------------------------------------------------------------------ checkpoints and export

    def _critic_state_dict(self) -> dict[str, torch.Tensor]:
        state = {f"discriminator.{k}": v for k, v in self.discriminator.state_dict().items()}
        state.update({f"lecam.{k}": v for k, v in self.lecam.state_dict().items()})
        return {k: v.detach().contiguous() for k, v in state.items()}

    def save_extra_checkpoint_files(self, checkpoint_dir: str) -> None:
        with self.ema.gathered() if self.ema is not None else contextlib.nullcontext():  # every process: FSDP2 gathers the EMA
            if not self.args.should_save:
                return
            from safetensors.torch import save_file

            os.makedirs(checkpoint_dir, exist_ok=True)
            save_file(self._critic_state_dict(), os.path.join(checkpoint_dir, DISCRIMINATOR_NAME), metadata={"format": "pt"})
            torch.save(self.discriminator_optimizer.state_dict(), os.path.join(checkpoint_dir, DISCRIMINATOR_OPTIMIZER_NAME))
            if self.ema is not None:
                self.ema.save(os.path.join(checkpoint_dir, EMA_NAME))

    def on_model_sharded(self, model) -> None:
        if self.ema is not None:
            self.ema.shard_like(model)  # each process averages the shard it updates (after a resume: the loaded EMA)

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model=None) -> None:
        super()._load_from_checkpoint(resume_from_checkpoint, model)
        from safetensors.torch import load_file

        path = os.path.join(resume_from_checkpoint, DISCRIMINATOR_NAME)
        if not os.path.isfile(path):
            raise ValueError(f"{resume_from_checkpoint} has no {DISCRIMINATOR_NAME}: resume needs a checkpoint written by MergeVQTrainer without save_only_model")
        state = load_file(path)  # load_state_dict copies onto the modules' devices
        self.discriminator.load_state_dict({k.removeprefix("discriminator."): v for k, v in state.items() if k.startswith("discriminator.")})
        self.lecam.load_state_dict({k.removeprefix("lecam."): v for k, v in state.items() if k.startswith("lecam.")})
        self._discriminator_synced = True  # every process loaded the same file
        if self.ema is not None:
            ema_path = os.path.join(resume_from_checkpoint, EMA_NAME)
            if not os.path.isfile(ema_path):
                raise ValueError(f"{resume_from_checkpoint} has no {EMA_NAME} but ema_decay={self.args.ema_decay}; resume with --ema_decay 0 or from a checkpoint written with an EMA")
            self.ema.load(ema_path)

    def _load_optimizer_and_scheduler(self, checkpoint: str | None) -> None:
        super()._load_optimizer_and_scheduler(checkpoint)
        if checkpoint is None:
            return
        path = os.path.join(checkpoint, DISCRIMINATOR_OPTIMIZER_NAME)
        if not os.path.isfile(path):
            raise ValueError(f"{checkpoint} has no {DISCRIMINATOR_OPTIMIZER_NAME}: resume needs a checkpoint written by MergeVQTrainer without save_only_model")
        self.discriminator_optimizer.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))

    def save_model(self, output_dir: str | None = None, _internal_call: bool = False) -> None:
        """Export: EMA weights to ``output_dir`` (what ``from_pretrained`` loads), raw weights to ``output_dir/raw``.

        Inside a checkpoint the raw weights are saved as usual (the EMA goes to ``ema.safetensors``).
        """
        if self.is_saving_checkpoint or self.ema is None:
            return super().save_model(output_dir, _internal_call)
        output_dir = output_dir if output_dir is not None else self.args.output_dir
        super().save_model(os.path.join(output_dir, RAW_WEIGHTS_SUBFOLDER), _internal_call=True)
        with self.ema.average_parameters(self.model):
            super().save_model(output_dir, _internal_call)


@torch.no_grad()
def reconstruction_metrics(model, pixel_values: torch.Tensor, num_tokens: int | None = None, batch_size: int = 64) -> dict[str, float]:
    """Mean L1 and PSNR (dB, images in [-1, 1]) of ``model``'s reconstructions of ``pixel_values`` at K = ``num_tokens``."""
    from ..evaluation.metrics import psnr as per_image_psnr  # the one PSNR definition (per image, on [0, 1])

    if not isinstance(pixel_values, torch.Tensor) or pixel_values.ndim != 4:
        raise ValueError(f"pixel_values must be a tensor [N, C, H, W] in [-1, 1], got {getattr(pixel_values, 'shape', type(pixel_values))}")
    was_training = model.training
    model.eval()
    l1, psnr = [], []
    device = next(model.parameters()).device
    for batch in torch.split(pixel_values, batch_size):
        batch = batch.to(device)
        enc = model.encode(batch, num_tokens=num_tokens)
        rec = model.decode(enc.indices, enc.source_map)
        l1.append((rec - batch).abs().flatten(1).mean(1))
        psnr.append(per_image_psnr(rec.float().cpu(), batch.float().cpu(), reduction="none"))
    model.train(was_training)
    return {"l1": float(torch.cat(l1).mean()), "psnr": float(torch.cat(psnr).mean())}
