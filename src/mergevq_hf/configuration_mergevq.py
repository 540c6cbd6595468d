"""Configuration of the MergeVQ tokenizer, with presets for the paper's variants."""

import math

from transformers import PretrainedConfig

from .config_checks import check_field_ranges, check_field_types


def gaussian_candidate_probs(num_candidates: int, mean: float = 1.0, std: float = 0.5, floor: float = 0.05) -> list[float]:
    """Stage-1 K distribution of the released code: a Gaussian over the candidate *index* plus a floor, normalised."""
    weights = [math.exp(-0.5 * ((i - mean) / std) ** 2) + floor for i in range(num_candidates)]
    total = sum(weights)
    return [w / total for w in weights]


def exponential_candidate_probs(num_candidates: int, rate: float = 2.0, floor: float = 0.1) -> list[float]:
    """The paper's distribution for R (A.3), P(T=k) ~ exp(-rate * k), with the released code's floor."""
    weights = [math.exp(-rate * k) + floor for k in range(num_candidates)]
    total = sum(weights)
    return [w / total for w in weights]


def _square_candidates(root: int, count: int) -> list[int]:
    """(root - 1)^2, root^2, ... : the released code's candidates around a target K = root^2."""
    return [(root + i) ** 2 for i in range(-1, count - 1)]


def _preset_values() -> dict[str, dict]:
    g_candidates = _square_candidates(16, 9)  # 225 ... 529
    gr_candidates = _square_candidates(12, 6)  # 121 ... 256
    r_candidates = [(6 + t) ** 2 for t in range(5)]  # 36 ... 100
    return {
        # f8 CNN stem, L = 32^2 = 1024 -> K = 256.
        "G": dict(
            image_size=256, stem_type="cnn", base_channels=64, channel_multipliers=[1, 2, 4, 8], num_res_blocks=4,
            hidden_size=512, num_hidden_layers=12, num_attention_heads=8, num_tokens=256,
            num_tokens_candidates=g_candidates, num_tokens_probs=gaussian_candidate_probs(len(g_candidates)),
            alignment_head="mlp2ln", alignment_dim=768, alignment_loss_weight=0.1, source_recovery_loss_weight=0.5,
        ),
        # f16 CNN stem, L = 16^2 = 256 -> K = 144.
        "G+R": dict(
            image_size=256, stem_type="cnn", base_channels=64, channel_multipliers=[1, 1, 2, 4, 8], num_res_blocks=4,
            hidden_size=512, num_hidden_layers=12, num_attention_heads=8, num_tokens=144,
            num_tokens_candidates=gr_candidates, num_tokens_probs=gaussian_candidate_probs(len(gr_candidates)),
            alignment_head="mlp3", alignment_dim=768, alignment_loss_weight=1.0, source_recovery_loss_weight=0.5,
        ),
        # ViT-B/16 patchify encoder, L = 256 -> K = 36; the decoder is the G+R one.
        "R": dict(
            image_size=256, stem_type="patchify", patch_size=16, base_channels=64, channel_multipliers=[1, 1, 2, 4, 8],
            num_res_blocks=4, hidden_size=768, num_hidden_layers=12, num_attention_heads=12, num_tokens=36,
            num_tokens_candidates=r_candidates, num_tokens_probs=exponential_candidate_probs(len(r_candidates)),
            alignment_head="mlp3", alignment_dim=768, alignment_loss_weight=1.0, source_recovery_loss_weight=1.0,
        ),
        # 32x32 images, f4, L = 64: for tests, CPU training and the bundled demo model.
        "tiny": dict(
            image_size=32, stem_type="cnn", base_channels=16, channel_multipliers=[1, 2, 2], num_res_blocks=1,
            norm_num_groups=8, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_tokens=16,
            num_tokens_candidates=[9, 16, 25, 36], num_tokens_probs=gaussian_candidate_probs(4),
            decoder_num_hidden_layers=1, decoder_num_attention_heads=4, codebook_bits=10, factorized_bits=[4, 6],
            alignment_head="mlp2ln", alignment_dim=64, alignment_loss_weight=0.1,
            source_recovery_hidden_size=32, source_recovery_num_layers=1, source_recovery_num_heads=4,
            source_recovery_intermediate_size=64,
        ),
    }


class MergeVQConfig(PretrainedConfig):
    r"""
    Configuration of [`MergeVQModel`]: CNN (or patchify) stem -> ViT blocks that merge tokens down to K ->
    look-up-free quantiser -> unmerge through the source map -> transformer + CNN pixel decoder.

    Use `MergeVQConfig.from_preset(name)` for the paper's variants `"G"` (f8, 1024 -> 256 tokens), `"G+R"`
    (f16, 256 -> 144), `"R"` (ViT-B/16, 256 -> 36) and `"tiny"` (32x32 images, 64 -> 16) for tests and CPU demos.

    Main fields:
        image_size: side of the square training images; `encode` accepts any size divisible by the stem stride.
        stem_type: `"cnn"` (Open-MAGVIT2 ResBlock stem, stride 2^(len(channel_multipliers)-1)) or `"patchify"`.
        base_channels, channel_multipliers, num_res_blocks: CNN stem and (always) the pixel decoder.
        hidden_size, num_hidden_layers, num_attention_heads: encoder ViT; for a CNN stem the width must equal
            base_channels * channel_multipliers[-1].
        num_tokens: default K kept after merging; num_tokens_candidates / num_tokens_probs: training distribution.
        merge_schedule: `"linear"` (released code: 1.5r -> 0.5r per block) or `"constant"` (paper: K = L - rN).
        codebook_bits: LFQ bits (2^bits codes); factorized_bits: the low/high split used by autoregressive heads.
        alignment_head: `"mlp3"`, `"mlp2ln"` or `"none"`; alignment_dim: teacher feature size.
        use_source_recovery: build the learned source-map predictor (needed for random-order generation).
        source_recovery_with_positions: the predictor also reads each token's grid position (known in random order).
        source_recovery_num_token_layers: self-attention blocks over the K tokens before the predictor's decoder blocks.
    """

    model_type = "mergevq"

    image_size: int = 256
    num_channels: int = 3
    stem_type: str = "cnn"
    patch_size: int = 16
    base_channels: int = 64
    channel_multipliers: list[int] | tuple[int, ...] = (1, 1, 2, 4, 8)
    num_res_blocks: int = 4
    norm_num_groups: int = 32
    hidden_size: int = 512
    num_hidden_layers: int = 12
    num_attention_heads: int = 8
    mlp_ratio: float = 4.0
    layer_scale_init_value: float = 1e-5
    position_embedding: str = "none"
    proportional_attention: bool = True
    merge_schedule: str = "linear"
    merge_inflect: float = -0.5
    num_tokens: int = 144
    num_tokens_candidates: list[int] | None = None
    num_tokens_probs: list[float] | None = None
    codebook_bits: int = 18
    factorized_bits: list[int] | tuple[int, ...] | None = (6, 12)
    entropy_temperature: float = 0.01
    sample_entropy_weight: float = 1.0
    batch_entropy_weight: float = 1.0
    entropy_loss_weight: float = 0.1
    commitment_loss_weight: float = 0.25
    reconstruction_loss_weight: float = 1.0
    decoder_num_hidden_layers: int = 12
    decoder_num_attention_heads: int = 8
    decoder_extra_res_blocks: int = 1
    alignment_head: str = "mlp3"
    alignment_dim: int = 768
    alignment_loss_weight: float = 1.0
    alignment_temperature: float = 4.0
    use_source_recovery: bool = True
    source_recovery_hidden_size: int = 384
    source_recovery_num_layers: int = 2
    source_recovery_num_heads: int = 8
    source_recovery_intermediate_size: int = 1536
    source_recovery_loss_weight: float = 0.5
    source_recovery_with_positions: bool = False
    source_recovery_num_token_layers: int = 0
    initializer_range: float = 0.02

    # Validated like MergeARConfig: the transformers hook `validate_architecture` (ValueError) plus `check_field_types`
    # (TypeError), not huggingface_hub's `@strict`, whose errors are neither and which refuses an int in a float field.
    def __post_init__(self, **kwargs):
        check_field_types(self)
        self.channel_multipliers = list(self.channel_multipliers)
        if self.factorized_bits is not None:
            self.factorized_bits = list(self.factorized_bits)
        super().__post_init__(**kwargs)
        self.validate_architecture()

    @classmethod
    def from_preset(cls, name: str, **overrides) -> "MergeVQConfig":
        """A config for one of the paper's variants (`"G"`, `"G+R"`, `"R"`) or `"tiny"`; keywords override fields."""
        presets = _preset_values()
        if name not in presets:
            raise ValueError(f"unknown MergeVQ preset {name!r}; expected one of {sorted(presets)}")
        return cls(**{**presets[name], **overrides})

    # ---- derived sizes -------------------------------------------------------------------------------------

    @property
    def stem_stride(self) -> int:
        """Pixels per token side: the CNN stem halves the resolution after every stage but the last."""
        if self.stem_type == "patchify":
            return self.patch_size
        return 2 ** (len(self.channel_multipliers) - 1)

    @property
    def grid_size(self) -> int:
        return self.image_size // self.stem_stride

    @property
    def num_patches(self) -> int:
        """L, the number of tokens before merging at `image_size`."""
        return self.grid_size**2

    @property
    def decoder_hidden_size(self) -> int:
        return self.base_channels * self.channel_multipliers[-1]

    # ---- validation ----------------------------------------------------------------------------------------

    def validate_architecture(self):
        """Reject impossible sizes and unknown options with a message that names the field."""
        check_field_ranges(
            self,
            positive_ints=(
                "image_size", "num_channels", "patch_size", "base_channels", "num_res_blocks", "norm_num_groups",
                "hidden_size", "num_hidden_layers", "num_attention_heads", "num_tokens", "codebook_bits",
                "decoder_num_hidden_layers", "decoder_num_attention_heads", "alignment_dim",
                "source_recovery_hidden_size", "source_recovery_num_layers", "source_recovery_num_heads",
                "source_recovery_intermediate_size",
            ),
            positive=("entropy_temperature", "alignment_temperature", "mlp_ratio"),
            non_negative=(
                "entropy_loss_weight", "commitment_loss_weight", "reconstruction_loss_weight", "alignment_loss_weight",
                "source_recovery_loss_weight", "sample_entropy_weight", "batch_entropy_weight",
                "source_recovery_num_token_layers",
            ),
        )
        if self.stem_type not in ("cnn", "patchify"):
            raise ValueError(f"MergeVQConfig.stem_type must be 'cnn' or 'patchify', got {self.stem_type!r}")
        if not self.channel_multipliers or any(m < 1 for m in self.channel_multipliers):
            raise ValueError(
                f"MergeVQConfig.channel_multipliers must be a non-empty list of positive integers, "
                f"got {self.channel_multipliers!r}"
            )
        decoder_stride = 2 ** (len(self.channel_multipliers) - 1)
        if self.stem_type == "cnn" and self.hidden_size != self.decoder_hidden_size:
            raise ValueError(
                f"MergeVQConfig.hidden_size ({self.hidden_size}) must equal base_channels * channel_multipliers[-1] "
                f"({self.decoder_hidden_size}) for a CNN stem"
            )
        if self.stem_type == "patchify" and self.patch_size != decoder_stride:
            raise ValueError(
                f"MergeVQConfig.patch_size ({self.patch_size}) must equal the decoder's upsampling factor "
                f"2^(len(channel_multipliers)-1) = {decoder_stride}"
            )
        if self.image_size % self.stem_stride:
            raise ValueError(
                f"MergeVQConfig.image_size ({self.image_size}) must be divisible by the stem stride {self.stem_stride}"
            )
        for width_name, heads_name in (
            ("hidden_size", "num_attention_heads"),
            ("decoder_hidden_size", "decoder_num_attention_heads"),
            ("source_recovery_hidden_size", "source_recovery_num_heads"),
        ):
            if getattr(self, width_name) % getattr(self, heads_name):
                raise ValueError(
                    f"MergeVQConfig.{width_name} ({getattr(self, width_name)}) must be divisible by "
                    f"{heads_name} ({getattr(self, heads_name)})"
                )
        for channels in [self.base_channels * m for m in self.channel_multipliers] + [self.hidden_size]:
            if channels % self.norm_num_groups:
                raise ValueError(
                    f"MergeVQConfig.norm_num_groups ({self.norm_num_groups}) must divide every stem/decoder width "
                    f"and hidden_size; {channels} is not divisible"
                )
        if not 1 <= self.num_tokens <= self.num_patches:
            raise ValueError(
                f"MergeVQConfig.num_tokens must be in [1, {self.num_patches}] (the token count before merging), "
                f"got {self.num_tokens}"
            )
        if self.codebook_bits > 30:
            raise ValueError(f"MergeVQConfig.codebook_bits must be at most 30, got {self.codebook_bits}")
        if self.factorized_bits is not None and (
            len(self.factorized_bits) != 2
            or any(b < 1 for b in self.factorized_bits)
            or sum(self.factorized_bits) != self.codebook_bits
        ):
            raise ValueError(
                f"MergeVQConfig.factorized_bits must be two positive numbers summing to codebook_bits "
                f"({self.codebook_bits}), got {self.factorized_bits!r}"
            )
        if self.num_tokens_candidates is not None:
            if any(not 1 <= k <= self.num_patches for k in self.num_tokens_candidates):
                raise ValueError(
                    f"MergeVQConfig.num_tokens_candidates must lie in [1, {self.num_patches}], "
                    f"got {self.num_tokens_candidates!r}"
                )
            probs = self.num_tokens_probs
            if probs is not None and (
                len(probs) != len(self.num_tokens_candidates) or any(p < 0 for p in probs) or abs(sum(probs) - 1) > 1e-4
            ):
                raise ValueError(
                    "MergeVQConfig.num_tokens_probs must be non-negative, sum to 1 and have one entry per candidate"
                )
        if self.merge_schedule not in ("linear", "constant"):
            raise ValueError(f"MergeVQConfig.merge_schedule must be 'linear' or 'constant', got {self.merge_schedule!r}")
        if self.position_embedding not in ("none", "learned"):
            raise ValueError(
                f"MergeVQConfig.position_embedding must be 'none' or 'learned', got {self.position_embedding!r}"
            )
        if self.alignment_head not in ("mlp3", "mlp2ln", "none"):
            raise ValueError(
                f"MergeVQConfig.alignment_head must be 'mlp3', 'mlp2ln' or 'none', got {self.alignment_head!r}"
            )


__all__ = ["MergeVQConfig"]
