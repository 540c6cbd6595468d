"""MergeVQ tokenizer: merge ViT tokens down to K, quantise them look-up-free, rebuild all L positions to decode.

Layout (parameter names follow the official release so that converting its checkpoints is a key mapping):

    pixels -> encoder.conv_in/down (CNN stem) or encoder.conv_in (patchify) -> L tokens + CLS
           -> encoder.attn.blocks (attention, then merge, then MLP) -> K tokens in canonical order + source map
           -> encoder.norm_out, SiLU, encoder.proj_out -> LFQ (quantize) -> K codes / indices
    codes  -> unmerge through the source map -> decoder.conv_in -> decoder.attn (depthwise-conv position term,
           MixFFN) -> decoder.up (adaptive group norm, ResBlocks, depth-to-space) -> RGB in [-1, 1]
"""

from dataclasses import dataclass
from functools import lru_cache

import torch
import torch.nn.functional as F
from torch import nn
from transformers import PreTrainedModel
from transformers import initialization as init
from transformers.utils import ModelOutput

from .checkpoint_errors import ClearCheckpointErrorsMixin
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


class SelfAttention(nn.Module):
    """Multi-head self-attention that also returns the head-averaged keys (the token-merging metric)."""

    def __init__(self, dim: int, num_heads: int):
        super().__init__()
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor, bias: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        batch, length, dim = x.shape
        q, k, v = self.qkv(x).view(batch, length, 3, self.num_heads, -1).permute(2, 0, 3, 1, 4)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias)
        return self.proj(out.transpose(1, 2).reshape(batch, length, dim)), k.mean(dim=1)


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

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float, layer_scale: float, mix_ffn: bool = False):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)  # eps 1e-5, as the released timm blocks
        self.attn = SelfAttention(dim, num_heads)
        self.ls1 = LayerScale(dim, layer_scale)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = (MixMlp if mix_ffn else Mlp)(dim, int(dim * mlp_ratio))
        self.ls2 = LayerScale(dim, layer_scale)

    def attention(self, x: torch.Tensor, bias: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        out, keys = self.attn(self.norm1(x), bias)
        return x + self.ls1(out), keys

    def feed_forward(self, x: torch.Tensor, grid_shape=None) -> torch.Tensor:
        return x + self.ls2(self.mlp(self.norm2(x), grid_shape))


class TransformerStack(nn.Module):
    """The blocks, with the encoder's CLS token or the decoder's depthwise-conv position term."""

    def __init__(self, dim, num_layers, num_heads, mlp_ratio, layer_scale, with_cls_token: bool, with_dw_conv: bool):
        super().__init__()
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim)) if with_cls_token else None
        self.pos_embed = nn.Conv2d(dim, dim, 3, padding=1, groups=dim) if with_dw_conv else None
        self.blocks = nn.ModuleList(
            TransformerBlock(dim, num_heads, mlp_ratio, layer_scale, mix_ffn=with_dw_conv) for _ in range(num_layers)
        )


# ---- encoder and decoder ----------------------------------------------------------------------------------------


@lru_cache(maxsize=256)
def _cached_schedule(num_patches: int, num_kept: int, num_blocks: int, mode: str, inflect: float) -> tuple[int, ...]:
    return tuple(merge_schedule(num_patches, num_kept, num_blocks, mode=mode, inflect=inflect))


class MergeVQEncoder(nn.Module):
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
        self.attn = TransformerStack(
            dim, config.num_hidden_layers, config.num_attention_heads, config.mlp_ratio,
            config.layer_scale_init_value, with_cls_token=True, with_dw_conv=False,
        )
        self.norm_out = nn.GroupNorm(groups, dim, eps=1e-6)
        self.proj_out = nn.Linear(dim, config.codebook_bits)
        hidden = 4 * dim
        if config.alignment_head == "mlp3":
            self.dist_head = nn.Sequential(
                nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, hidden), nn.GELU(),
                nn.Linear(hidden, config.alignment_dim),
            )
        elif config.alignment_head == "mlp2ln":
            self.dist_head = nn.Sequential(
                nn.Linear(dim, hidden), nn.GELU(), nn.LayerNorm(hidden), nn.Linear(hidden, config.alignment_dim)
            )
        else:
            self.dist_head = None

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

    def forward(self, pixel_values: torch.Tensor, num_tokens: int | None):
        """Returns (hidden [B,1+K,dim] with CLS first, source_map [B,L], token sizes [B,K]); `num_tokens=None` = no merge."""
        features = self.stem(pixel_values)
        x = features.flatten(2).transpose(1, 2)
        num_patches = x.shape[1]
        x = torch.cat([self.attn.cls_token.expand(x.shape[0], -1, -1).to(x.dtype), x], dim=1)
        state = init_merge_state(x, has_cls=True)
        num_blocks = len(self.attn.blocks)
        schedule = (
            _cached_schedule(num_patches, num_tokens, num_blocks, self.config.merge_schedule, self.config.merge_inflect)
            if num_tokens is not None
            else (0,) * num_blocks
        )
        for block, num_merged in zip(self.attn.blocks, schedule):
            merged_before = x.shape[1] < num_patches + 1
            bias = None
            if self.config.proportional_attention and merged_before:
                bias = proportional_attention_bias(state.sizes).to(x.dtype)
            x, keys = block.attention(x, bias)
            if num_merged:
                x, state = merge_tokens(x, keys, state, num_merged)
            x = block.feed_forward(x)
        x, state = canonical_order(x, state)
        return x, state.source_map, state.sizes[:, 1:, 0]

    def project(self, hidden: torch.Tensor) -> torch.Tensor:
        """Merged tokens (CLS dropped) -> pre-quantisation latents [B, K, bits]; group norm runs over the token axis."""
        tokens = F.silu(self.norm_out(hidden[:, 1:].transpose(1, 2))).transpose(1, 2)
        return self.proj_out(tokens)


class MergeVQDecoder(nn.Module):
    def __init__(self, config: MergeVQConfig):
        super().__init__()
        groups, ch, mults = config.norm_num_groups, config.base_channels, config.channel_multipliers
        channels = config.decoder_hidden_size
        self.conv_in = nn.Conv2d(config.codebook_bits, channels, 3, padding=1)
        self.attn = TransformerStack(
            channels, config.decoder_num_hidden_layers, config.decoder_num_attention_heads, config.mlp_ratio,
            config.layer_scale_init_value, with_cls_token=False, with_dw_conv=True,
        )
        self.up = nn.ModuleList()
        self.adaptive = nn.ModuleList()
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
            self.adaptive.append(adaptive)
        self.norm_out = nn.GroupNorm(groups, channels, eps=1e-6)
        self.conv_out = nn.Conv2d(channels, config.num_channels, 3, padding=1)

    def forward(self, code_grid: torch.Tensor) -> torch.Tensor:
        """[B, bits, h, w] codes (every position filled) -> [B, C, h*f, w*f] pixels."""
        x = self.conv_in(code_grid)
        grid_shape = x.shape[-2:]
        x = x + self.attn.pos_embed(x)
        x = x.flatten(2).transpose(1, 2)
        for block in self.attn.blocks:
            x, _ = block.attention(x)
            x = block.feed_forward(x, grid_shape)
        x = x.transpose(1, 2).reshape(x.shape[0], -1, *grid_shape)
        for level in reversed(range(len(self.up))):
            x = self.adaptive[level](x, code_grid)
            for block in self.up[level].block:
                x = block(x)
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
    """

    indices: torch.LongTensor | None = None
    source_map: torch.LongTensor | None = None
    codes: torch.FloatTensor | None = None
    cls_token: torch.FloatTensor | None = None
    latents: torch.FloatTensor | None = None
    token_sizes: torch.FloatTensor | None = None


@dataclass
class MergeVQOutput(ModelOutput):
    """
    loss: weighted sum of the terms below that were computed (the adversarial and perceptual terms live in the
        trainer, which owns the discriminator and the perceptual network).
    reconstruction: [B, C, H, W] decoded pixels (unclamped).
    reconstruction_loss / entropy_loss / commitment_loss / alignment_loss / source_recovery_loss: unweighted terms;
        alignment needs `teacher_features`, source recovery needs `config.use_source_recovery`.
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


# ---- the model --------------------------------------------------------------------------------------------------


class MergeVQPreTrainedModel(ClearCheckpointErrorsMixin, PreTrainedModel):
    config_class = MergeVQConfig
    base_model_prefix = "mergevq"
    main_input_name = "pixel_values"
    _no_split_modules = ["TransformerBlock", "ResBlock"]

    def _init_weights(self, module):
        super()._init_weights(module)
        if isinstance(module, LayerScale):
            init.constant_(module.gamma, self.config.layer_scale_init_value)
        elif isinstance(module, TransformerStack) and module.cls_token is not None:
            init.normal_(module.cls_token, std=1e-6)
        elif isinstance(module, MergeVQEncoder) and module.position_embeddings is not None:
            init.normal_(module.position_embeddings, std=self.config.initializer_range)
        elif isinstance(module, SourceRecovery):
            init.normal_(module.rec_tokens, std=self.config.initializer_range)


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
                config.source_recovery_intermediate_size,
            )
            if config.use_source_recovery
            else None
        )
        self.post_init()

    # ---- input checks ----

    def _check_pixel_values(self, pixel_values, name="pixel_values") -> tuple[int, int]:
        if not isinstance(pixel_values, torch.Tensor):
            raise ValueError(f"{name} must be a torch.Tensor [B, {self.config.num_channels}, H, W], got {type(pixel_values).__name__}")
        if pixel_values.ndim != 4 or pixel_values.shape[1] != self.config.num_channels:
            raise ValueError(
                f"{name} must have shape [B, {self.config.num_channels}, H, W], got {tuple(pixel_values.shape)}"
            )
        if not pixel_values.is_floating_point():
            raise ValueError(f"{name} must be a floating-point tensor scaled to [-1, 1], got dtype {pixel_values.dtype}")
        stride = self.config.stem_stride
        height, width = pixel_values.shape[-2:]
        if height == 0 or width == 0 or height % stride or width % stride:
            raise ValueError(f"{name} height and width must be positive multiples of {stride} (the stem stride), got {height}x{width}")
        if not torch.isfinite(pixel_values).all():
            raise ValueError(f"{name} contains NaN or infinite values")
        return height // stride, width // stride

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

    def _encode(self, pixel_values, num_tokens):
        grid_h, grid_w = self._check_pixel_values(pixel_values)
        num_patches = grid_h * grid_w
        num_tokens = self.config.num_tokens if num_tokens is None else num_tokens
        num_tokens = self._check_num_tokens(num_tokens, num_patches)
        hidden, source_map, sizes = self.encoder(pixel_values, num_tokens)
        return self.encoder.project(hidden), hidden[:, 0], source_map, sizes

    def encode(self, pixel_values: torch.Tensor, num_tokens: int | None = None) -> MergeVQEncoderOutput:
        """Merge to `num_tokens` (default `config.num_tokens`; K = L means no merging) and quantise."""
        latents, cls, source_map, sizes = self._encode(pixel_values, num_tokens)
        quantized = self.quantize(latents, compute_losses=False)
        return MergeVQEncoderOutput(
            indices=quantized.indices, source_map=source_map, codes=quantized.codes, cls_token=cls,
            latents=latents, token_sizes=sizes,
        )

    def decode_codes(self, codes: torch.Tensor, source_map: torch.Tensor, grid_shape: tuple[int, int] | None = None):
        """Differentiable decode from codes [B, K, bits] and the source map [B, L]."""
        grid_h, grid_w = grid_shape or (self.config.grid_size, self.config.grid_size)
        full = unmerge(codes, source_map)  # [B, L, bits]: every position gets its parent's code
        return self.decoder(full.transpose(1, 2).reshape(codes.shape[0], -1, grid_h, grid_w))

    def decode(
        self, indices: torch.Tensor, source_map: torch.Tensor | None = None, grid_shape: tuple[int, int] | None = None
    ) -> torch.Tensor:
        """
        Pixels [B, C, H, W] in [-1, 1] from `indices` [B, K] and `source_map` [B, L]. Uses nothing but its
        arguments. `source_map=None` means the indices already cover every grid position (K = L, raster order), as
        MergeAR's output does. `grid_shape` defaults to the config's square grid.
        """
        grid_h, grid_w = grid_shape or (self.config.grid_size, self.config.grid_size)
        num_positions = grid_h * grid_w
        if not isinstance(indices, torch.Tensor) or indices.ndim != 2 or indices.is_floating_point():
            raise ValueError(f"indices must be an integer tensor [B, K], got {getattr(indices, 'shape', type(indices))}")
        batch, num_tokens = indices.shape
        if source_map is None:
            if num_tokens != num_positions:
                raise ValueError(
                    f"without a source_map, indices must cover all {num_positions} grid positions, got K = {num_tokens}"
                )
            source_map = torch.arange(num_positions, device=indices.device).expand(batch, -1)
        if not isinstance(source_map, torch.Tensor) or source_map.is_floating_point() or source_map.dtype == torch.bool:
            raise ValueError("source_map must be an integer tensor [B, L]")
        if source_map.shape != (batch, num_positions):
            raise ValueError(
                f"source_map must have shape [B, L] = [{batch}, {num_positions}] to match indices and the "
                f"{grid_h}x{grid_w} grid, got {tuple(source_map.shape)}"
            )
        if source_map.numel() and (source_map.min() < 0 or source_map.max() >= num_tokens):
            raise ValueError(f"source_map values must index the K = {num_tokens} tokens of indices, i.e. lie in [0, {num_tokens})")
        codes = self.quantize.indices_to_codes(indices, dtype=self.dtype)
        return self.decode_codes(codes, source_map.long(), (grid_h, grid_w)).clamp(-1, 1)

    def predict_source_map(self, indices: torch.Tensor) -> torch.Tensor:
        """The learned source recovery's source map [B, L] for `indices` [B, K] whose merge map is unknown."""
        if self.source_recovery is None:
            raise ValueError("this model was built with use_source_recovery=False")
        return self.source_recovery.predict(self.quantize.indices_to_codes(indices, dtype=self.dtype))

    def get_image_features(self, pixel_values: torch.Tensor, pooling: str = "cls") -> torch.Tensor:
        """Representation for probes: all L tokens, no merging; `pooling` is "cls" (CLS token) or "mean" (tokens)."""
        if pooling not in ("cls", "mean"):
            raise ValueError(f"pooling must be 'cls' or 'mean', got {pooling!r}")
        self._check_pixel_values(pixel_values)
        hidden, _, _ = self.encoder(pixel_values, None)
        return hidden[:, 0] if pooling == "cls" else hidden[:, 1:].mean(dim=1)

    def forward(
        self,
        pixel_values: torch.Tensor,
        num_tokens: int | None = None,
        teacher_features: torch.Tensor | None = None,
        alignment_pixel_values: torch.Tensor | None = None,
        return_dict: bool | None = None,
    ) -> MergeVQOutput | tuple:
        """
        Encode to `num_tokens`, decode through the true source map, and compute the losses.

        teacher_features: [B, alignment_dim] frozen-teacher targets; when given, the CLS of a second encoder pass on
            `alignment_pixel_values` (or of this pass when None) is aligned to them (KL at `alignment_temperature`).
            The second pass merges as many tokens as the first (L' - (L - K), at least 1 kept).
        """
        return_dict = return_dict if return_dict is not None else self.config.return_dict
        config = self.config
        latents, cls, source_map, _ = self._encode(pixel_values, num_tokens)  # validates pixel_values
        grid_h, grid_w = (side // config.stem_stride for side in pixel_values.shape[-2:])
        quantized = self.quantize(latents)
        reconstruction = self.decode_codes(quantized.codes, source_map, (grid_h, grid_w))
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

        source_recovery_loss = source_logits = None
        if self.source_recovery is not None and (grid_h, grid_w) == (config.grid_size, config.grid_size):
            source_logits = self.source_recovery(quantized.codes)
            source_recovery_loss = SourceRecovery.loss(source_logits, source_map)
            loss = loss + config.source_recovery_loss_weight * source_recovery_loss

        output = MergeVQOutput(
            loss=loss, reconstruction=reconstruction, reconstruction_loss=reconstruction_loss,
            entropy_loss=quantized.entropy_loss, sample_entropy=quantized.sample_entropy,
            batch_entropy=quantized.batch_entropy, commitment_loss=quantized.commitment_loss,
            alignment_loss=alignment_loss, source_recovery_loss=source_recovery_loss, indices=quantized.indices,
            source_map=source_map, codes=quantized.codes, alignment_logits=alignment_logits,
            source_logits=source_logits,
        )
        return output if return_dict else output.to_tuple()

    def _alignment_logits(self, cls, alignment_pixel_values, num_merged, batch_size):
        if self.encoder.dist_head is None:
            raise ValueError("teacher_features were given but this model has alignment_head='none'")
        if alignment_pixel_values is not None:
            grid_h, grid_w = self._check_pixel_values(alignment_pixel_values, "alignment_pixel_values")
            if alignment_pixel_values.shape[0] != batch_size:
                raise ValueError("alignment_pixel_values must have the same batch size as pixel_values")
            hidden, _, _ = self.encoder(alignment_pixel_values, max(1, grid_h * grid_w - num_merged))
            cls = hidden[:, 0]
        return self.encoder.dist_head(cls)

    def _alignment_loss(self, student_logits, teacher_features):
        if (
            not isinstance(teacher_features, torch.Tensor)
            or teacher_features.shape != (student_logits.shape[0], self.config.alignment_dim)
        ):
            raise ValueError(
                f"teacher_features must be a tensor [B, alignment_dim] = [{student_logits.shape[0]}, "
                f"{self.config.alignment_dim}], got {getattr(teacher_features, 'shape', type(teacher_features))}"
            )
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
