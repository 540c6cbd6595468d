"""The plain grid-VQ baseline of the reproduction table: diffusers' ``VQModel`` trained with MergeVQ's own recipe.

:class:`GridVQTokenizer` gives a ``VQModel`` the tokenizer interface that ``MergeVQTrainer`` and
``mergevq_hf.evaluation`` use (``forward`` with loss terms, ``encode`` -> indices + source map, ``decode``,
``get_image_features``), so the baseline gets exactly the same trainer, losses (L1 + MobileNetV2 perceptual + PatchGAN
with LeCAM from ``--discriminator_start``), EMA, data and budget as the MergeVQ tokenizers; only the quantiser
(nearest-neighbour VQ, 2^10 codes of 8 dims, diffusers' commitment loss) and the missing teacher alignment differ.
The export is a stock diffusers folder: ``VQModel.from_pretrained(output_dir)`` (EMA weights).

``python -m reproduction train grid-vq-4 grid-vq-8`` trains both with the table's budget; :func:`main` takes the
options of :class:`GridArguments` and ``MergeVQTrainingArguments`` as a list.
"""

from __future__ import annotations

import contextlib
import logging
from dataclasses import dataclass, field
from types import SimpleNamespace

import torch
from diffusers import VQModel
from torch import nn
from torch.nn import functional as F
from transformers import HfArgumentParser, set_seed
from transformers.modeling_outputs import BaseModelOutputWithPooling
from transformers.utils import ModelOutput

from mergevq_hf.training import ImageTransform, load_image_dataset
from mergevq_hf.training.atomic_checkpoints import resolve_resume_checkpoint
from mergevq_hf.training.trainer_tokenizer import MergeVQTrainer, MergeVQTrainingArguments

logger = logging.getLogger(__name__)

# Encoder/decoder widths per grid: one stride-2 stage per halving of 32 px, sized near MergeVQ tiny (438k parameters).
WIDTHS = {4: (16, 32, 32, 48), 8: (16, 32, 48)}
CODEBOOK_BITS = 10  # 1,024 codes, as MergeVQ tiny's LFQ


def build_vq_model(grid_size: int, image_size: int = 32) -> VQModel:
    if grid_size not in WIDTHS or image_size != 32:
        raise ValueError(f"grid_size must be one of {sorted(WIDTHS)} for 32x32 images, got {grid_size} at {image_size}px")
    widths = WIDTHS[grid_size]
    return VQModel(
        down_block_types=("DownEncoderBlock2D",) * len(widths), up_block_types=("UpDecoderBlock2D",) * len(widths),
        block_out_channels=widths, layers_per_block=1, latent_channels=16, vq_embed_dim=8,
        num_vq_embeddings=2**CODEBOOK_BITS, norm_num_groups=8, sample_size=image_size,
    )


@dataclass
class GridVQOutput(ModelOutput):
    loss: torch.Tensor | None = None
    reconstruction: torch.Tensor | None = None
    indices: torch.Tensor | None = None
    reconstruction_loss: torch.Tensor | None = None
    commitment_loss: torch.Tensor | None = None
    # Terms of MergeVQ's loss that a grid VQ does not have (MergeVQTrainer logs the ones that are not None).
    entropy_loss: torch.Tensor | None = None
    sample_entropy: torch.Tensor | None = None
    batch_entropy: torch.Tensor | None = None
    alignment_loss: torch.Tensor | None = None
    source_recovery_loss: torch.Tensor | None = None


class GridVQTokenizer(nn.Module):
    """A diffusers ``VQModel`` behind MergeVQ's tokenizer interface: every grid position is one token (K = L)."""

    def __init__(self, vq_model: VQModel) -> None:
        super().__init__()
        self.vq_model = vq_model
        num_blocks = len(vq_model.config.block_out_channels)
        self.grid_size = vq_model.config.sample_size // 2 ** (num_blocks - 1)
        num_tokens = self.grid_size**2
        # What MergeVQTrainer and the evaluation suite read from a tokenizer config.
        self.config = SimpleNamespace(
            num_tokens=num_tokens, num_tokens_candidates=[num_tokens], num_tokens_probs=[1.0], num_patches=num_tokens,
            num_channels=vq_model.config.in_channels, image_size=vq_model.config.sample_size, codebook_bits=CODEBOOK_BITS,
        )

    def _check_num_tokens(self, num_tokens: int | None) -> None:
        if num_tokens not in (None, self.config.num_tokens):
            raise ValueError(f"a {self.grid_size}x{self.grid_size} grid VQ always gives {self.config.num_tokens} tokens, got num_tokens={num_tokens}")

    def forward(self, pixel_values: torch.Tensor, num_tokens: int | None = None, teacher_features=None) -> GridVQOutput:
        self._check_num_tokens(num_tokens)
        latents = self.vq_model.encode(pixel_values).latents
        quantized, commitment_loss, (_, _, indices) = self.vq_model.quantize(latents)
        reconstruction = self.vq_model.decode(quantized, force_not_quantize=True).sample
        reconstruction_loss = F.l1_loss(reconstruction, pixel_values)
        return GridVQOutput(
            loss=reconstruction_loss + commitment_loss, reconstruction=reconstruction,
            indices=indices.view(len(pixel_values), -1), reconstruction_loss=reconstruction_loss, commitment_loss=commitment_loss,
        )

    @torch.no_grad()
    def encode(self, pixel_values: torch.Tensor, num_tokens: int | None = None) -> SimpleNamespace:
        """Code indices ``[B, S*S]`` in raster order and the identity source map (no merging)."""
        self._check_num_tokens(num_tokens)
        latents = self.vq_model.encode(pixel_values).latents
        indices = self.vq_model.quantize(latents)[2][2].view(len(pixel_values), -1)
        source_map = torch.arange(indices.shape[1], device=indices.device).expand_as(indices)
        return SimpleNamespace(indices=indices, source_map=source_map)

    @torch.no_grad()
    def decode(self, indices: torch.Tensor, source_map: torch.Tensor | None = None) -> torch.Tensor:
        if indices.ndim != 2 or indices.shape[1] != self.config.num_tokens:
            raise ValueError(f"indices must be [B, {self.config.num_tokens}], got {tuple(indices.shape)}")
        side = self.grid_size
        shape = (len(indices), side, side, self.vq_model.config.vq_embed_dim)
        quantized = self.vq_model.quantize.get_codebook_entry(indices.reshape(-1), shape)
        return self.vq_model.decode(quantized, force_not_quantize=True).sample

    @torch.no_grad()
    def get_image_features(self, pixel_values: torch.Tensor, pooling: str = "mean") -> BaseModelOutputWithPooling:
        """``pooler_output``: the pre-quantisation latents averaged over the grid (a grid VQ has no global token),
        ``[B, vq_embed_dim]``; ``last_hidden_state``: the latents as tokens ``[B, h * w, vq_embed_dim]``."""
        latents = self.vq_model.encode(pixel_values).latents
        return BaseModelOutputWithPooling(
            last_hidden_state=latents.flatten(2).transpose(1, 2), pooler_output=latents.mean(dim=(2, 3))
        )


@dataclass
class GridArguments:
    grid_size: int = field(default=4, metadata={"help": "Token grid side: 4 (16 tokens) or 8 (64 tokens)."})
    dataset: str = field(default="fashion_mnist", metadata={"help": "Dataset spec of mergevq_hf.training.load_image_dataset."})


def parse_args(argv: list[str] | None = None) -> tuple[GridArguments, MergeVQTrainingArguments]:
    return HfArgumentParser((GridArguments, MergeVQTrainingArguments)).parse_args_into_dataclasses(args=argv)


def main(argv: list[str] | None = None) -> None:
    grid_args, args = parse_args(argv)
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=logging.INFO)
    set_seed(args.seed)
    model = GridVQTokenizer(build_vq_model(grid_args.grid_size))
    train = load_image_dataset(grid_args.dataset, "train", image_size=model.config.image_size, seed=args.seed)
    train = train.with_transform(ImageTransform(model.config.image_size, "image", label_column=None))
    trainer = MergeVQTrainer(model=model, args=args, train_dataset=train)
    trainer.train(resume_from_checkpoint=resolve_resume_checkpoint(args.resume_from_checkpoint, args.output_dir))
    if trainer.is_world_process_zero():
        with trainer.ema.average_parameters(model) if trainer.ema is not None else contextlib.nullcontext():
            model.vq_model.save_pretrained(args.output_dir)  # a stock diffusers VQModel folder
        trainer.save_state()
        logger.info("saved VQModel to %s", args.output_dir)
