"""MergeVQ tokenizer: merge ViT tokens down to K, quantise them look-up-free, rebuild all L positions to decode.

Layout:

    pixels -> encoder.conv_in/down (CNN stem) or encoder.conv_in (patchify) -> L tokens + CLS
           -> encoder.transformer.blocks (attention, then merge, then MLP) -> K tokens in canonical order + source map
           -> encoder.norm_out, SiLU, encoder.proj_out -> LFQ (quantize) -> K codes / indices
           (encoder.alignment_head maps the CLS token to the teacher's feature space, for training only)
    codes  -> unmerge through the source map -> decoder.conv_in -> decoder.transformer (depthwise-conv position
           term, MixFFN) -> decoder.up with decoder.adaptive_norms (code-conditioned group norm, ResBlocks,
           depth-to-space) -> RGB in [-1, 1]

Checkpoint names: saved weights keep the names of the official release (`encoder.attn`, `encoder.dist_head`, ...),
which are listed in `RENAMED_MODULES`; transformers renames them on load and back on save (see the table).
"""

import re
from dataclasses import dataclass
from functools import lru_cache

import torch
import torch.nn.functional as F
from torch import nn
from transformers import PreTrainedModel
from transformers import initialization as init
from transformers.conversion_mapping import register_checkpoint_conversion_mapping
from transformers.core_model_loading import WeightRenaming
from transformers.modeling_outputs import BaseModelOutputWithPooling
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
from transformers.utils import ModelOutput, can_return_tuple

try:  # diffusers' model CPU offload then moves the model to the execution device for encode/decode too
    from diffusers.utils.accelerate_utils import apply_forward_hook
except ImportError:  # a transformers-only environment (remote code): no offload hooks to honour

    def apply_forward_hook(method):
        return method


from .checkpoint_errors import ClearCheckpointErrorsMixin
from .config_checks import check_attention_outputs
from .configuration_mergevq import MergeVQConfig
from .quantization_lfq import LookupFreeQuantizer
from .source_recovery import SourceRecovery
from .token_merging import (
    canonical_order,
    init_merge_state,
    merge_schedule,
    merge_tokens,
    proportional_attention_bias,
    unmerge,
)


# ---- checkpoint names -------------------------------------------------------------------------------------------

# (name in saved checkpoints, module name here). The saved names are those of the official release, so that its
# checkpoints convert by a key mapping and every folder written so far (the bundled model included) stays valid.
# Registered below as a transformers checkpoint conversion for model_type "mergevq": `from_pretrained` renames on
# load, `save_pretrained` renames back. No name in the table lies under another entry's name, so renaming in turn
# (as transformers does) equals renaming by the one entry that matches.
RENAMED_MODULES = (
    ("encoder.attn", "encoder.transformer"),  # the whole ViT stack, not one attention layer
    ("encoder.dist_head", "encoder.alignment_head"),  # CLS -> teacher features (the paper's distillation head)
    ("decoder.attn", "decoder.transformer"),
    ("decoder.adaptive", "decoder.adaptive_norms"),
    ("source_recovery.rec_embed", "source_recovery.code_embed"),
    ("source_recovery.rec_tokens", "source_recovery.position_queries"),
    ("source_recovery.rec_head", "source_recovery.query_head"),
)
# A leaf rename inside a renamed module, written on the module's new name: applied after the table on load.
RENAMED_LEAVES = (("decoder.transformer.pos_embed", "decoder.transformer.position_conv"),)


def _rename(name: str, renames) -> str:
    for old, new in renames:
        if name == old or name.startswith(old + "."):
            return new + name[len(old) :]
    return name


def current_parameter_name(checkpoint_name: str) -> str:
    """The name a saved (official-release style) tensor name has in `MergeVQModel` today."""
    return _rename(_rename(checkpoint_name, RENAMED_MODULES), RENAMED_LEAVES)


def checkpoint_parameter_name(name: str) -> str:
    """Inverse of `current_parameter_name`: the name `save_pretrained` writes for a parameter of `MergeVQModel`."""
    leaves, modules = ([(new, old) for old, new in table] for table in (RENAMED_LEAVES, RENAMED_MODULES))
    return _rename(_rename(name, leaves), modules)


def _checkpoint_renamings() -> list[WeightRenaming]:
    # Applied in order on load and undone in reverse order on save; "^" anchors at the start of the key, and
    # transformers ends every pattern at a name boundary ("encoder.attn" does not match "encoder.attn_x").
    return [WeightRenaming("^" + re.escape(old), new) for old, new in RENAMED_MODULES + RENAMED_LEAVES]


# overwrite: a remote-code copy of this file registers the same table again.
register_checkpoint_conversion_mapping("mergevq", _checkpoint_renamings(), overwrite=True)


def _rename_saved_keys(module, state_dict, prefix, *args):
    """`load_state_dict` pre-hook: accept saved names as well as current ones (see `RENAMED_MODULES`)."""
    for key in [key for key in state_dict if key.startswith(prefix)]:
        name = current_parameter_name(key[len(prefix) :])
        if prefix + name != key:
            state_dict[prefix + name] = state_dict.pop(key)


# ---- convolutional pieces ---------------------------------------------------------------------------------------


class ResBlock(nn.Module):
    """GN -> SiLU -> conv3x3 -> GN -> SiLU -> conv3x3, plus a 1x1 shortcut when the width changes (no biases)."""

    def __init__(self, in_channels: int, out_channels: int, num_groups: int):
        super().__init__()
        self.norm1 = nn.GroupNorm(num_groups, in_channels, eps=1e-6)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, padding=1, bias=False)
        self.norm2 = nn.GroupNorm(num_groups, out_channels, eps=1e-6)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1, bias=False)
        self.nin_shortcut = nn.Conv2d(in_channels, out_channels, 1, bias=False) if in_channels != out_channels else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(F.silu(self.norm2(h)))
        return h + (x if self.nin_shortcut is None else self.nin_shortcut(x))


def depth_to_space(x: torch.Tensor, block_size: int = 2) -> torch.Tensor:
    """DCR depth-to-space (channel index = (row offset, column offset, channel)); nn.PixelShuffle is CRD."""
    batch, channels, height, width = x.shape
    out_channels = channels // block_size**2
    x = x.view(batch, block_size, block_size, out_channels, height, width)
    x = x.permute(0, 3, 4, 1, 5, 2)
    return x.reshape(batch, out_channels, height * block_size, width * block_size)


class Upsampler(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.conv1 = nn.Conv2d(channels, 4 * channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return depth_to_space(self.conv1(x), 2)


class AdaptiveGroupNorm(nn.Module):
    """Group norm whose scale/shift come from the per-channel std/mean of the quantised code grid."""

    def __init__(self, code_channels: int, channels: int, num_groups: int, eps: float = 1e-6):
        super().__init__()
        self.gn = nn.GroupNorm(num_groups, channels, eps=eps, affine=False)
        self.gamma = nn.Linear(code_channels, channels)
        self.beta = nn.Linear(code_channels, channels)
        self.eps = eps

    def forward(self, x: torch.Tensor, codes: torch.Tensor) -> torch.Tensor:
        flat = codes.flatten(2)
        scale = self.gamma((flat.var(dim=-1) + self.eps).sqrt())  # unbiased variance, as the released code
        shift = self.beta(flat.mean(dim=-1))
        return self.gn(x) * scale[:, :, None, None] + shift[:, :, None, None]


# ---- transformer pieces -----------------------------------------------------------------------------------------


def eager_attention_forward(module, query, key, value, attention_mask, scaling, dropout=0.0, **kwargs):
    """Attention written out, so that it can return its weights [B, H, T, T]; `attention_mask` is an additive bias."""
    scores = torch.matmul(query, key.transpose(2, 3)) * scaling
    if attention_mask is not None:
        scores = scores + attention_mask
    weights = scores.softmax(dim=-1, dtype=torch.float32).to(query.dtype)
    weights = F.dropout(weights, p=dropout, training=module.training)
    return torch.matmul(weights, value).transpose(1, 2).contiguous(), weights


class SelfAttention(nn.Module):
    """Multi-head self-attention that also returns the head-averaged keys (the token-merging metric).

    The kernel is `config._attn_implementation` (read at every call, so `set_attn_implementation` switches it):
    "sdpa" by default, or "eager", the only one that returns the weights [B, H, T, T].
    """

    is_causal = False  # every token sees every token

    def __init__(self, dim: int, num_heads: int, config: MergeVQConfig):
        super().__init__()
        self.config = config
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor, bias: torch.Tensor | None = None):
        """(output [B, T, dim], head-mean keys [B, T, dim / heads], weights or None)."""
        batch, length, dim = x.shape
        q, k, v = self.qkv(x).view(batch, length, 3, self.num_heads, -1).permute(2, 0, 3, 1, 4)
        # "eager" is not in the registry, so it falls back to the written-out attention above.
        attention = ALL_ATTENTION_FUNCTIONS.get_interface(self.config._attn_implementation, eager_attention_forward)
        out, weights = attention(self, q, k, v, bias, scaling=q.shape[-1] ** -0.5, dropout=0.0)
        return self.proj(out.reshape(batch, length, dim)), k.mean(dim=1), weights


class LayerScale(nn.Module):
    def __init__(self, dim: int, init_value: float):
        super().__init__()
        self.gamma = nn.Parameter(torch.full((dim,), init_value))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.gamma


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor, grid_shape=None) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x)))


class MixMlp(nn.Module):
    """MixFFN: fc1 -> depthwise 3x3 conv over the token grid -> GELU -> fc2."""

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.dwconv = nn.Conv2d(hidden, hidden, 3, padding=1, groups=hidden)
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor, grid_shape: tuple[int, int]) -> torch.Tensor:
        h = self.fc1(x)
        batch, length, channels = h.shape
        h = h.transpose(1, 2).reshape(batch, channels, *grid_shape)
        h = self.dwconv(h).flatten(2).transpose(1, 2)
        return self.fc2(F.gelu(h))


class TransformerBlock(nn.Module):
    """Pre-LN ViT block, split in two halves so that the encoder can merge tokens between them."""

    def __init__(
        self,
        dim: int,
        num_heads: int,
        mlp_ratio: float,
        layer_scale: float,
        config: MergeVQConfig,
        mix_ffn: bool = False,
    ):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)  # eps 1e-5, as the released timm blocks
        self.attn = SelfAttention(dim, num_heads, config)
        self.ls1 = LayerScale(dim, layer_scale)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = (MixMlp if mix_ffn else Mlp)(dim, int(dim * mlp_ratio))
        self.ls2 = LayerScale(dim, layer_scale)

    def attention(self, x: torch.Tensor, bias: torch.Tensor | None = None):
        """(x + attention, head-mean keys, attention weights or None): see :class:`SelfAttention`."""
        out, keys, weights = self.attn(self.norm1(x), bias)
        return x + self.ls1(out), keys, weights

    def feed_forward(self, x: torch.Tensor, grid_shape=None) -> torch.Tensor:
        return x + self.ls2(self.mlp(self.norm2(x), grid_shape))


class TransformerStack(nn.Module):
    """The blocks, with the encoder's CLS token or the decoder's depthwise-conv position term."""

    def __init__(
        self, dim, num_layers, num_heads, mlp_ratio, layer_scale, config, with_cls_token: bool, with_dw_conv: bool
    ):
        super().__init__()
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim)) if with_cls_token else None
        self.position_conv = nn.Conv2d(dim, dim, 3, padding=1, groups=dim) if with_dw_conv else None
        self.blocks = nn.ModuleList(
            TransformerBlock(dim, num_heads, mlp_ratio, layer_scale, config, mix_ffn=with_dw_conv)
            for _ in range(num_layers)
        )


# ---- encoder and decoder ----------------------------------------------------------------------------------------


@lru_cache(maxsize=256)
def _cached_schedule(num_patches: int, num_kept: int, num_blocks: int, mode: str, inflect: float) -> tuple[int, ...]:
    return tuple(merge_schedule(num_patches, num_kept, num_blocks, mode=mode, inflect=inflect))


class CheckpointedStack(nn.Module):
    """A stack whose blocks recompute their activations in the backward pass once the model's
    `activation_checkpointing_enable()` (formerly `gradient_checkpointing_enable()`) has set `gradient_checkpointing`
    and `_gradient_checkpointing_func`, as transformers does on every module with that attribute."""

    gradient_checkpointing = False

    def _run(self, function, *args):
        if self.gradient_checkpointing and self.training and torch.is_grad_enabled():
            return self._gradient_checkpointing_func(function, *args)
        return function(*args)


class MergeVQEncoder(CheckpointedStack):
    def __init__(self, config: MergeVQConfig):
        super().__init__()
        self.config = config
        groups, ch = config.norm_num_groups, config.base_channels
        if config.stem_type == "cnn":
            self.conv_in = nn.Conv2d(config.num_channels, ch, 3, padding=1, bias=False)
            self.down = nn.ModuleList()
            in_channels = ch
            for level, mult in enumerate(config.channel_multipliers):
                stage = nn.Module()
                stage.block = nn.ModuleList()
                for _ in range(config.num_res_blocks):
                    stage.block.append(ResBlock(in_channels, ch * mult, groups))
                    in_channels = ch * mult
                if level < len(config.channel_multipliers) - 1:
                    stage.downsample = nn.Conv2d(in_channels, in_channels, 3, stride=2, padding=1)
                self.down.append(stage)
        else:  # ViT patchify: position-agnostic conv + per-channel group norm
            self.conv_in = nn.Sequential(
                nn.Conv2d(config.num_channels, config.hidden_size, config.patch_size, stride=config.patch_size),
                nn.GroupNorm(config.hidden_size, config.hidden_size, eps=1e-6),
            )
            self.down = None
        dim = config.hidden_size
        self.position_embeddings = (
            nn.Parameter(torch.zeros(1, dim, config.grid_size, config.grid_size))
            if config.position_embedding == "learned"
            else None
        )
        self.transformer = TransformerStack(
            dim, config.num_hidden_layers, config.num_attention_heads, config.mlp_ratio,
            config.layer_scale_init_value, config, with_cls_token=True, with_dw_conv=False,
        )
        self.norm_out = nn.GroupNorm(groups, dim, eps=1e-6)
        self.proj_out = nn.Linear(dim, config.codebook_bits)
        hidden = 4 * dim
        if config.alignment_head == "mlp3":
            self.alignment_head = nn.Sequential(
                nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, hidden), nn.GELU(),
                nn.Linear(hidden, config.alignment_dim),
            )
        elif config.alignment_head == "mlp2ln":
            self.alignment_head = nn.Sequential(
                nn.Linear(dim, hidden), nn.GELU(), nn.LayerNorm(hidden), nn.Linear(hidden, config.alignment_dim)
            )
        else:
            self.alignment_head = None

    def stem(self, pixel_values: torch.Tensor) -> torch.Tensor:
        x = self.conv_in(pixel_values)
        if self.down is not None:
            for stage in self.down:
                for block in stage.block:
                    x = block(x)
                if hasattr(stage, "downsample"):
                    x = stage.downsample(x)
        if self.position_embeddings is not None:
            x = x + F.interpolate(self.position_embeddings, size=x.shape[-2:], mode="bilinear", align_corners=False)
        return x

    def forward(
        self,
        pixel_values: torch.Tensor,
        num_tokens: int | None,
        output_hidden_states: bool = False,
        output_attentions: bool = False,
    ):
        """
        Returns (hidden [B,1+K,dim] with CLS first, source_map [B,L], token sizes [B,K], hidden_states, attentions);
        `num_tokens=None` = no merge.

        hidden_states (None unless asked): `num_hidden_layers + 1` tensors [B, 1+T, dim], the stem tokens with CLS
        first, then every block's output; T shrinks as tokens merge, and the last one is `hidden` (canonical order).
        attentions (None unless asked; eager attention only): every block's weights [B, heads, 1+T, 1+T], taken
        before the block merges.
        """
        features = self.stem(pixel_values)
        x = features.flatten(2).transpose(1, 2)
        num_patches = x.shape[1]
        x = torch.cat([self.transformer.cls_token.expand(x.shape[0], -1, -1).to(x.dtype), x], dim=1)
        state = init_merge_state(x, has_cls=True)
        num_blocks = len(self.transformer.blocks)
        schedule = (
            _cached_schedule(num_patches, num_tokens, num_blocks, self.config.merge_schedule, self.config.merge_inflect)
            if num_tokens is not None
            else (0,) * num_blocks
        )
        hidden_states = [x] if output_hidden_states else None
        attentions = [] if output_attentions else None
        for block, num_merged in zip(self.transformer.blocks, schedule):
            merged_before = x.shape[1] < num_patches + 1
            bias = None
            if self.config.proportional_attention and merged_before:
                bias = proportional_attention_bias(state.sizes).to(x.dtype)
            x, keys, weights = self._run(block.attention, x, bias)
            if num_merged:
                x, state = merge_tokens(x, keys, state, num_merged)
            x = self._run(block.feed_forward, x)
            if output_hidden_states:
                hidden_states.append(x)
            if output_attentions:
                attentions.append(weights)
        x, state = canonical_order(x, state)
        if output_hidden_states:
            hidden_states[-1] = x
            hidden_states = tuple(hidden_states)
        attentions = tuple(attentions) if output_attentions else None
        return x, state.source_map, state.sizes[:, 1:, 0], hidden_states, attentions

    def project(self, hidden: torch.Tensor) -> torch.Tensor:
        """Merged tokens (CLS dropped) -> pre-quantisation latents [B, K, bits]; group norm runs over the token axis."""
        tokens = F.silu(self.norm_out(hidden[:, 1:].transpose(1, 2))).transpose(1, 2)
        return self.proj_out(tokens)


class MergeVQDecoder(CheckpointedStack):
    def __init__(self, config: MergeVQConfig):
        super().__init__()
        groups, ch, mults = config.norm_num_groups, config.base_channels, config.channel_multipliers
        channels = config.decoder_hidden_size
        self.conv_in = nn.Conv2d(config.codebook_bits, channels, 3, padding=1)
        self.transformer = TransformerStack(
            channels, config.decoder_num_hidden_layers, config.decoder_num_attention_heads, config.mlp_ratio,
            config.layer_scale_init_value, config, with_cls_token=False, with_dw_conv=True,
        )
        self.up = nn.ModuleList()
        self.adaptive_norms = nn.ModuleList()
        levels = []
        for level in reversed(range(len(mults))):  # coarse to fine; the finest level has no extra block
            num_blocks = config.num_res_blocks + (config.decoder_extra_res_blocks if level > 0 else 0)
            stage = nn.Module()
            stage.block = nn.ModuleList()
            adaptive = AdaptiveGroupNorm(config.codebook_bits, channels, groups)
            for _ in range(num_blocks):
                stage.block.append(ResBlock(channels, ch * mults[level], groups))
                channels = ch * mults[level]
            if level > 0:
                stage.upsample = Upsampler(channels)
            levels.append((stage, adaptive))
        for stage, adaptive in reversed(levels):  # stored finest first, like the released code
            self.up.append(stage)
            self.adaptive_norms.append(adaptive)
        self.norm_out = nn.GroupNorm(groups, channels, eps=1e-6)
        self.conv_out = nn.Conv2d(channels, config.num_channels, 3, padding=1)

    def forward(self, code_grid: torch.Tensor) -> torch.Tensor:
        """[B, bits, h, w] codes (every position filled) -> [B, C, h*f, w*f] pixels."""
        x = self.conv_in(code_grid)
        grid_shape = x.shape[-2:]
        x = x + self.transformer.position_conv(x)
        x = x.flatten(2).transpose(1, 2)
        for block in self.transformer.blocks:
            x, _, _ = self._run(block.attention, x)
            x = self._run(block.feed_forward, x, grid_shape)
        x = x.transpose(1, 2).reshape(x.shape[0], -1, *grid_shape)
        for level in reversed(range(len(self.up))):
            x = self.adaptive_norms[level](x, code_grid)
            for block in self.up[level].block:
                x = self._run(block, x)
            if hasattr(self.up[level], "upsample"):
                x = self.up[level].upsample(x)
        return self.conv_out(F.silu(self.norm_out(x)))


# ---- outputs ----------------------------------------------------------------------------------------------------


@dataclass
class MergeVQEncoderOutput(ModelOutput):
    """
    indices: [B, K] codebook indices of the merged tokens, in canonical order (by each group's first position).
    source_map: [B, L] for every grid position (raster order), the index in [0, K) of the merged token it belongs to.
    codes: [B, K, bits] quantised codes in {-1, +1} (straight-through: differentiable w.r.t. the encoder).
    cls_token: [B, hidden] encoder CLS token after the last block.
    latents: [B, K, bits] pre-quantisation latents.
    token_sizes: [B, K] how many grid positions each merged token covers.
    hidden_states, attentions: the encoder ViT's, with `output_hidden_states` / `output_attentions` (see
        `MergeVQEncoder.forward`: T shrinks from L to K across the blocks).
    """

    indices: torch.LongTensor | None = None
    source_map: torch.LongTensor | None = None
    codes: torch.FloatTensor | None = None
    cls_token: torch.FloatTensor | None = None
    latents: torch.FloatTensor | None = None
    token_sizes: torch.FloatTensor | None = None
    hidden_states: tuple[torch.FloatTensor, ...] | None = None
    attentions: tuple[torch.FloatTensor, ...] | None = None


@dataclass
class MergeVQOutput(ModelOutput):
    """
    loss: weighted sum of the terms below that were computed (the adversarial and perceptual terms live in the
        trainer, which owns the discriminator and the perceptual network).
    reconstruction: [B, C, H, W] decoded pixels (unclamped).
    reconstruction_loss / entropy_loss / commitment_loss / alignment_loss / source_recovery_loss: unweighted terms;
        alignment needs `teacher_features`, source recovery needs `config.use_source_recovery`.
    hidden_states, attentions: the encoder ViT's, as in `MergeVQEncoderOutput`.
    """

    loss: torch.FloatTensor | None = None
    reconstruction: torch.FloatTensor | None = None
    reconstruction_loss: torch.FloatTensor | None = None
    entropy_loss: torch.FloatTensor | None = None
    sample_entropy: torch.FloatTensor | None = None
    batch_entropy: torch.FloatTensor | None = None
    commitment_loss: torch.FloatTensor | None = None
    alignment_loss: torch.FloatTensor | None = None
    source_recovery_loss: torch.FloatTensor | None = None
    indices: torch.LongTensor | None = None
    source_map: torch.LongTensor | None = None
    codes: torch.FloatTensor | None = None
    alignment_logits: torch.FloatTensor | None = None
    source_logits: torch.FloatTensor | None = None
    hidden_states: tuple[torch.FloatTensor, ...] | None = None
    attentions: tuple[torch.FloatTensor, ...] | None = None


# ---- the model --------------------------------------------------------------------------------------------------

# How far pixels may stray outside [-1, 1] (resampling overshoot, low-precision rounding) before they are refused:
# enough to catch 0..255 images, not to flag legitimately scaled ones.
PIXEL_RANGE_TOLERANCE = 0.01


class MergeVQPreTrainedModel(ClearCheckpointErrorsMixin, PreTrainedModel):
    config_class = MergeVQConfig
    base_model_prefix = "mergevq"
    main_input_name = "pixel_values"
    _no_split_modules = ["TransformerBlock", "ResBlock"]
    _supports_sdpa = True  # and "eager", which returns attention weights
    supports_gradient_checkpointing = True

    def get_input_embeddings(self) -> nn.Module:
        """The pixel stem's first layer (as vision models return their patch embedding; FSDP2 wrapping asks for it)."""
        return self.encoder.conv_in

    def _init_weights(self, module):
        super()._init_weights(module)
        if isinstance(module, LayerScale):
            init.constant_(module.gamma, self.config.layer_scale_init_value)
        elif isinstance(module, TransformerStack) and module.cls_token is not None:
            init.normal_(module.cls_token, std=1e-6)
        elif isinstance(module, MergeVQEncoder) and module.position_embeddings is not None:
            init.normal_(module.position_embeddings, std=self.config.initializer_range)
        elif isinstance(module, SourceRecovery):
            init.normal_(module.position_queries, std=self.config.initializer_range)


class MergeVQModel(MergeVQPreTrainedModel):
    """
    The MergeVQ tokenizer. `encode` merges the L stem tokens down to K and quantises them; `decode` rebuilds every
    grid position from (indices, source_map) alone; `forward` does both and returns the training losses.

    Example:
        >>> model = MergeVQModel(MergeVQConfig.from_preset("tiny"))
        >>> enc = model.encode(torch.rand(2, 3, 32, 32) * 2 - 1, num_tokens=16)
        >>> enc.indices.shape, enc.source_map.shape
        (torch.Size([2, 16]), torch.Size([2, 64]))
        >>> model.decode(enc.indices, enc.source_map).shape
        torch.Size([2, 3, 32, 32])
    """

    def __init__(self, config: MergeVQConfig):
        super().__init__(config)
        self.encoder = MergeVQEncoder(config)
        self.quantize = LookupFreeQuantizer(
            config.codebook_bits, config.entropy_temperature, config.sample_entropy_weight, config.batch_entropy_weight
        )
        self.decoder = MergeVQDecoder(config)
        self.source_recovery = (
            SourceRecovery(
                config.codebook_bits, config.num_patches, config.source_recovery_hidden_size,
                config.source_recovery_num_layers, config.source_recovery_num_heads,
                config.source_recovery_intermediate_size, config.source_recovery_with_positions,
                config.source_recovery_num_token_layers,
            )
            if config.use_source_recovery
            else None
        )
        # `Trainer` resumes by `load_state_dict` on the checkpoint's model.safetensors, which holds the saved names.
        self.register_load_state_dict_pre_hook(_rename_saved_keys)
        self.post_init()

    # ---- input checks ----

    def _check_pixel_values(self, pixel_values, name="pixel_values") -> tuple[torch.Tensor, int, int]:
        """(pixels in the model's dtype, grid height, grid width); any floating dtype is accepted and cast."""
        if not isinstance(pixel_values, torch.Tensor):
            raise ValueError(f"{name} must be a torch.Tensor [B, {self.config.num_channels}, H, W], got {type(pixel_values).__name__}")
        if pixel_values.ndim != 4 or pixel_values.shape[1] != self.config.num_channels:
            raise ValueError(
                f"{name} must have shape [B, {self.config.num_channels}, H, W], got {tuple(pixel_values.shape)}"
            )
        if not pixel_values.is_floating_point():
            raise ValueError(f"{name} must be a floating-point tensor scaled to [-1, 1], got dtype {pixel_values.dtype}")
        if pixel_values.shape[0] == 0:
            raise ValueError(f"{name} is an empty batch; pass at least one image")
        stride = self.config.stem_stride
        height, width = pixel_values.shape[-2:]
        if height == 0 or width == 0 or height % stride or width % stride:
            raise ValueError(f"{name} height and width must be positive multiples of {stride} (the stem stride), got {height}x{width}")
        if not torch.isfinite(pixel_values).all():
            raise ValueError(f"{name} contains NaN or infinite values")
        low, high = pixel_values.aminmax()
        if low < -1 - PIXEL_RANGE_TOLERANCE or high > 1 + PIXEL_RANGE_TOLERANCE:
            raise ValueError(
                f"{name} must be scaled to [-1, 1] (e.g. x / 127.5 - 1 for 8-bit images), got values in "
                f"[{float(low):.4g}, {float(high):.4g}]"
            )
        return pixel_values.to(self.dtype), height // stride, width // stride

    def _check_grid_shape(self, grid_shape) -> tuple[int, int]:
        if grid_shape is None:
            return self.config.grid_size, self.config.grid_size
        if (
            not isinstance(grid_shape, (tuple, list))
            or len(grid_shape) != 2
            or any(isinstance(side, bool) or not isinstance(side, int) or side < 1 for side in grid_shape)
        ):
            raise ValueError(
                f"grid_shape must be a pair of positive integers (height, width) in tokens, got {grid_shape!r}"
            )
        return tuple(grid_shape)

    @staticmethod
    def _check_index_tensor(tensor, name: str, shape: str) -> None:
        if not isinstance(tensor, torch.Tensor):
            raise ValueError(f"{name} must be an integer tensor {shape}, got {type(tensor).__name__}")
        if tensor.ndim != 2 or tensor.is_floating_point() or tensor.is_complex() or tensor.dtype == torch.bool:
            raise ValueError(
                f"{name} must be an integer tensor {shape}, got shape {tuple(tensor.shape)} of dtype {tensor.dtype}"
            )
        if tensor.shape[0] == 0 or tensor.shape[1] == 0:
            raise ValueError(f"{name} must be a non-empty tensor {shape}, got shape {tuple(tensor.shape)}")

    def _check_source_map(self, source_map, batch: int, num_tokens: int, grid: tuple[int, int]) -> None:
        self._check_index_tensor(source_map, "source_map", "[B, L]")
        num_positions = grid[0] * grid[1]
        if source_map.shape != (batch, num_positions):
            raise ValueError(
                f"source_map must have shape [B, L] = [{batch}, {num_positions}] to match the tokens and the "
                f"{grid[0]}x{grid[1]} grid, got {tuple(source_map.shape)}"
            )
        low, high = source_map.long().aminmax()
        if low < 0 or high >= num_tokens:
            raise ValueError(f"source_map values must index the K = {num_tokens} tokens, i.e. lie in [0, {num_tokens})")

    def _recording(self, output_hidden_states, output_attentions) -> tuple[bool, bool]:
        """Resolve the encoder's `output_*` flags against the config (attention weights need eager attention)."""
        check_attention_outputs(self.config, output_attentions)
        if output_hidden_states is None:
            output_hidden_states = self.config.output_hidden_states
        if output_attentions is None:
            output_attentions = self.config.output_attentions
        return bool(output_hidden_states), bool(output_attentions)

    @staticmethod
    def _check_num_tokens(num_tokens, num_patches: int) -> int:
        if isinstance(num_tokens, torch.Tensor) and num_tokens.numel() == 1 and not num_tokens.is_floating_point():
            num_tokens = int(num_tokens)
        if isinstance(num_tokens, bool) or not isinstance(num_tokens, int):
            raise ValueError(f"num_tokens must be an integer K with 1 <= K <= {num_patches}, got {num_tokens!r}")
        if not 1 <= num_tokens <= num_patches:
            raise ValueError(f"num_tokens must satisfy 1 <= K <= L = {num_patches}, got {num_tokens}")
        return num_tokens

    # ---- public API ----

    def _encode(self, pixel_values, num_tokens, output_hidden_states=False, output_attentions=False):
        pixel_values, grid_h, grid_w = self._check_pixel_values(pixel_values)
        num_patches = grid_h * grid_w
        num_tokens = self.config.num_tokens if num_tokens is None else num_tokens
        num_tokens = self._check_num_tokens(num_tokens, num_patches)
        hidden, source_map, sizes, hidden_states, attentions = self.encoder(
            pixel_values, num_tokens, output_hidden_states, output_attentions
        )
        return self.encoder.project(hidden), hidden[:, 0], source_map, sizes, hidden_states, attentions

    @apply_forward_hook
    def encode(
        self,
        pixel_values: torch.Tensor,
        num_tokens: int | None = None,
        *,
        output_hidden_states: bool | None = None,
        output_attentions: bool | None = None,
    ) -> MergeVQEncoderOutput:
        """Merge to `num_tokens` (default `config.num_tokens`; K = L means no merging) and quantise.

        `pixel_values` [B, C, H, W] must be scaled to [-1, 1]; any floating dtype is cast to the model's dtype.
        `output_hidden_states` / `output_attentions` add the encoder ViT's states / weights (see
        `MergeVQEncoder.forward`; weights need eager attention).
        """
        recording = self._recording(output_hidden_states, output_attentions)
        latents, cls, source_map, sizes, hidden_states, attentions = self._encode(pixel_values, num_tokens, *recording)
        quantized = self.quantize(latents, compute_losses=False)
        return MergeVQEncoderOutput(
            indices=quantized.indices, source_map=source_map, codes=quantized.codes, cls_token=cls,
            latents=latents, token_sizes=sizes, hidden_states=hidden_states, attentions=attentions,
        )

    def decode_codes(self, codes: torch.Tensor, source_map: torch.Tensor, grid_shape: tuple[int, int] | None = None):
        """Differentiable decode from codes [B, K, bits] (floating, e.g. {-1, +1}) and the source map [B, L]."""
        grid_h, grid_w = self._check_grid_shape(grid_shape)
        bits = self.config.codebook_bits
        if not isinstance(codes, torch.Tensor):
            raise ValueError(f"codes must be a floating-point tensor [B, K, {bits}], got {type(codes).__name__}")
        if codes.ndim != 3 or codes.shape[-1] != bits or not codes.is_floating_point():
            raise ValueError(
                f"codes must be a floating-point tensor [B, K, {bits}], got shape {tuple(codes.shape)} of dtype "
                f"{codes.dtype}"
            )
        if codes.shape[0] == 0 or codes.shape[1] == 0:
            raise ValueError(f"codes must be a non-empty tensor [B, K, {bits}], got shape {tuple(codes.shape)}")
        self._check_source_map(source_map, codes.shape[0], codes.shape[1], (grid_h, grid_w))
        full = unmerge(codes.to(self.dtype), source_map.long())  # [B, L, bits]: every position gets its parent's code
        return self.decoder(full.transpose(1, 2).reshape(codes.shape[0], -1, grid_h, grid_w))

    @apply_forward_hook
    def decode(
        self, indices: torch.Tensor, source_map: torch.Tensor | None = None, grid_shape: tuple[int, int] | None = None
    ) -> torch.Tensor:
        """
        Pixels [B, C, H, W] in [-1, 1] from `indices` [B, K] and `source_map` [B, L]. Uses nothing but its
        arguments. `source_map=None` means the indices already cover every grid position (K = L, raster order), as
        MergeAR's output does. `grid_shape` defaults to the config's square grid.
        """
        grid_h, grid_w = self._check_grid_shape(grid_shape)
        num_positions = grid_h * grid_w
        self._check_index_tensor(indices, "indices", "[B, K]")
        batch, num_tokens = indices.shape
        if source_map is None:
            if num_tokens != num_positions:
                raise ValueError(
                    f"without a source_map, indices must cover all {num_positions} grid positions, got K = {num_tokens}"
                )
            source_map = torch.arange(num_positions, device=indices.device).expand(batch, -1)
        self._check_source_map(source_map, batch, num_tokens, (grid_h, grid_w))  # before the codes: a clearer error
        codes = self.quantize.indices_to_codes(indices, dtype=self.dtype)
        return self.decode_codes(codes, source_map, (grid_h, grid_w)).clamp(-1, 1)

    @apply_forward_hook
    def predict_source_map(self, indices: torch.Tensor, positions: torch.Tensor | None = None) -> torch.Tensor:
        """The learned source recovery's source map [B, L] for `indices` [B, K] whose merge map is unknown.

        `positions` [B, K]: each token's grid position (its group's first position, ascending), as random-order
        generation produces them. Optional unless the recovery was trained with them; when given, every token owns its
        position and no earlier one.
        """
        if self.source_recovery is None:
            raise ValueError("this model was built with use_source_recovery=False")
        self._check_index_tensor(indices, "indices", "[B, K]")
        if indices.shape[1] > self.config.num_patches:
            raise ValueError(
                f"indices must hold K <= L = {self.config.num_patches} tokens (the source recovery's grid), "
                f"got K = {indices.shape[1]}"
            )
        if positions is not None:
            positions = self._check_token_positions(positions, indices.shape)
        return self.source_recovery.predict(self.quantize.indices_to_codes(indices, dtype=self.dtype), positions)

    def _check_token_positions(self, positions, shape) -> torch.LongTensor:
        positions = torch.as_tensor(positions, device=self.device)
        if positions.is_floating_point() or positions.dtype == torch.bool or tuple(positions.shape) != tuple(shape):
            raise ValueError(f"positions must be an integer tensor of shape {tuple(shape)} (one grid position per token), "
                             f"got {positions.dtype} {tuple(positions.shape)}")
        positions = positions.long()
        length = self.config.num_patches
        if (positions < 0).any() or (positions >= length).any() or (positions[:, 1:] <= positions[:, :-1]).any():
            raise ValueError(f"positions must be the tokens' grid positions in canonical order: strictly increasing, "
                             f"in [0, L = {length})")
        return positions

    @can_return_tuple
    def get_image_features(
        self,
        pixel_values: torch.Tensor,
        pooling: str = "cls",
        *,
        num_tokens: int | None = None,
        output_hidden_states: bool | None = None,
        output_attentions: bool | None = None,
    ) -> BaseModelOutputWithPooling:
        """
        Representation for probes: by default all L tokens, no merging; `num_tokens=K` merges to K tokens first (the
        pass the paper's alignment recipe aligns). `pooler_output` [B, hidden] is the feature, the CLS token
        (`pooling="cls"`) or the mean of the tokens (`"mean"`); `last_hidden_state` [B, 1 + tokens, hidden] holds CLS
        first, then the tokens. `return_dict=False` returns a tuple.
        """
        if pooling not in ("cls", "mean"):
            raise ValueError(f"pooling must be 'cls' or 'mean', got {pooling!r}")
        recording = self._recording(output_hidden_states, output_attentions)
        pixel_values, grid_h, grid_w = self._check_pixel_values(pixel_values)
        if num_tokens is not None:
            num_tokens = self._check_num_tokens(num_tokens, grid_h * grid_w)
        hidden, _, _, hidden_states, attentions = self.encoder(pixel_values, num_tokens, *recording)
        pooled = hidden[:, 0] if pooling == "cls" else hidden[:, 1:].mean(dim=1)
        return BaseModelOutputWithPooling(
            last_hidden_state=hidden, pooler_output=pooled, hidden_states=hidden_states, attentions=attentions
        )

    @can_return_tuple
    def forward(
        self,
        pixel_values: torch.Tensor,
        num_tokens: int | None = None,
        teacher_features: torch.Tensor | None = None,
        alignment_pixel_values: torch.Tensor | None = None,
        output_hidden_states: bool | None = None,
        output_attentions: bool | None = None,
        decode_source_map: str = "true",
    ) -> MergeVQOutput | tuple:
        """
        Encode to `num_tokens`, decode through the true source map (or the predicted one), and compute the losses.

        pixel_values: [B, C, H, W] scaled to [-1, 1]; any floating dtype is cast to the model's dtype.
        teacher_features: [B, alignment_dim] frozen-teacher targets; when given, the CLS of a second encoder pass on
            `alignment_pixel_values` (or of this pass when None) is aligned to them (KL at `alignment_temperature`).
            The second pass merges as many tokens as the first (L' - (L - K), at least 1 kept).
        output_hidden_states / output_attentions: the encoder ViT's states / weights of this pass (see
            `MergeVQEncoder.forward`; weights need eager attention).
        decode_source_map: `"true"`, or `"predicted"` to decode through the source recovery's most likely map instead
            (what random-order generation decodes through; its reconstruction loss then teaches the decoder the
            recovery's errors). `source_map` in the output stays the true map.
        return_dict: `False` returns a tuple.
        """
        config = self.config
        if decode_source_map not in ("true", "predicted"):
            raise ValueError(f"decode_source_map must be 'true' or 'predicted', got {decode_source_map!r}")
        recording = self._recording(output_hidden_states, output_attentions)
        latents, cls, source_map, _, hidden_states, attentions = self._encode(pixel_values, num_tokens, *recording)
        grid_h, grid_w = (side // config.stem_stride for side in pixel_values.shape[-2:])
        quantized = self.quantize(latents)

        source_recovery_loss = source_logits = None
        if self.source_recovery is not None and (grid_h, grid_w) == (config.grid_size, config.grid_size):
            positions = SourceRecovery.token_positions(source_map, quantized.codes.shape[1]) if config.source_recovery_with_positions else None
            source_logits = self.source_recovery(quantized.codes, positions)
            source_recovery_loss = SourceRecovery.loss(source_logits, source_map)
        if decode_source_map == "predicted" and source_logits is None:
            raise ValueError(f"decode_source_map='predicted' needs a source recovery (use_source_recovery) and images of "
                             f"{config.image_size} x {config.image_size} pixels (its grid)")
        decoded_map = source_map if decode_source_map == "true" else source_logits.detach().argmax(-1)
        reconstruction = self.decode_codes(quantized.codes, decoded_map, (grid_h, grid_w))
        reconstruction_loss = F.l1_loss(reconstruction.float(), pixel_values.float())
        loss = (
            config.reconstruction_loss_weight * reconstruction_loss
            + config.entropy_loss_weight * quantized.entropy_loss
            + config.commitment_loss_weight * quantized.commitment_loss
        )

        alignment_loss = alignment_logits = None
        if teacher_features is not None:
            num_merged = grid_h * grid_w - latents.shape[1]
            alignment_logits = self._alignment_logits(cls, alignment_pixel_values, num_merged, pixel_values.shape[0])
            alignment_loss = self._alignment_loss(alignment_logits, teacher_features)
            loss = loss + config.alignment_loss_weight * alignment_loss

        if source_recovery_loss is not None:
            loss = loss + config.source_recovery_loss_weight * source_recovery_loss

        output = MergeVQOutput(
            loss=loss, reconstruction=reconstruction, reconstruction_loss=reconstruction_loss,
            entropy_loss=quantized.entropy_loss, sample_entropy=quantized.sample_entropy,
            batch_entropy=quantized.batch_entropy, commitment_loss=quantized.commitment_loss,
            alignment_loss=alignment_loss, source_recovery_loss=source_recovery_loss, indices=quantized.indices,
            source_map=source_map, codes=quantized.codes, alignment_logits=alignment_logits,
            source_logits=source_logits, hidden_states=hidden_states, attentions=attentions,
        )
        return output

    def _alignment_logits(self, cls, alignment_pixel_values, num_merged, batch_size):
        if self.encoder.alignment_head is None:
            raise ValueError("teacher_features were given but this model has alignment_head='none'")
        if alignment_pixel_values is not None:
            alignment_pixel_values, grid_h, grid_w = self._check_pixel_values(
                alignment_pixel_values, "alignment_pixel_values"
            )
            if alignment_pixel_values.shape[0] != batch_size:
                raise ValueError("alignment_pixel_values must have the same batch size as pixel_values")
            hidden, _, _, _, _ = self.encoder(alignment_pixel_values, max(1, grid_h * grid_w - num_merged))
            cls = hidden[:, 0]
        return self.encoder.alignment_head(cls)

    def _alignment_loss(self, student_logits, teacher_features):
        if (
            not isinstance(teacher_features, torch.Tensor)
            or teacher_features.shape != (student_logits.shape[0], self.config.alignment_dim)
        ):
            raise ValueError(
                f"teacher_features must be a tensor [B, alignment_dim] = [{student_logits.shape[0]}, "
                f"{self.config.alignment_dim}], got {getattr(teacher_features, 'shape', type(teacher_features))}"
            )
        if not torch.isfinite(teacher_features).all():
            raise ValueError("teacher_features contains NaN or infinite values")
        temperature = self.config.alignment_temperature
        teacher = F.softmax(teacher_features.float() / temperature, dim=-1)
        student = F.log_softmax(student_logits.float() / temperature, dim=-1)
        return F.kl_div(student, teacher, reduction="batchmean") * temperature**2


def register_mergevq_auto_classes():
    """Make `AutoConfig`/`AutoModel` resolve model_type "mergevq" to these classes."""
    from transformers import AutoConfig, AutoModel

    AutoConfig.register("mergevq", MergeVQConfig, exist_ok=True)
    AutoModel.register(MergeVQConfig, MergeVQModel, exist_ok=True)


# Saved folders get `auto_map` entries and copies of these files, so they load with trust_remote_code=True.
MergeVQConfig.register_for_auto_class()
MergeVQModel.register_for_auto_class("AutoModel")

__all__ = ["MergeVQModel", "MergeVQPreTrainedModel", "MergeVQEncoderOutput", "MergeVQOutput"]
