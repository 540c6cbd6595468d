"""Configuration of MergeAR, the class-conditional raster generator over MergeVQ tokens."""

import warnings

from transformers import PretrainedConfig

from .config_checks import check_field_ranges, check_field_types

# Named sizes. "L" is the paper's stage-2 model (LlamaGen-L / Open-MAGVIT2 "AR_256_B", 343M parameters)
# over the 16x16 grid of the G+R tokenizer; "L-1024" is the same network over the 32x32 grid of the G
# tokenizer; "tiny" is a CPU-sized model for tests and demos whose codes, grid and K are those of
# `MergeVQConfig.from_preset("tiny")`.
_PRESETS = {
    "L": {},
    "L-1024": {"grid_size": 32, "num_tokens": 256},
    "tiny": {
        "codebook_bits": 10,
        "factorized_bits": [4, 6],
        "grid_size": 8,
        "num_classes": 10,
        "hidden_size": 64,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "intermediate_size": 176,
        "num_factorized_layers": 1,
        "num_tokens": 16,
    },
}


def _renamed_fields(values: dict) -> dict:
    """``values`` with the former key ``default_num_tokens`` (saved before the rename) moved to ``num_tokens``."""
    if "default_num_tokens" not in values:
        return values
    values = dict(values)
    old = values.pop("default_num_tokens")
    warnings.warn("MergeARConfig's `default_num_tokens` is now `num_tokens`.", FutureWarning, stacklevel=3)
    if values.get("num_tokens", old) != old:
        raise ValueError(
            f"default_num_tokens={old!r} and num_tokens={values['num_tokens']!r} disagree; pass num_tokens only."
        )
    return {**values, "num_tokens": old}


class MergeARConfig(PretrainedConfig):
    r"""
    Configuration of [`MergeARForCausalLM`]. The defaults are the "L" preset (343M parameters, 2^18 LFQ codes
    predicted by a 6+12-bit factorised head, 16x16 token grid, K = 144 kept tokens). Build one that fits a
    tokenizer with :meth:`from_tokenizer_config`.

    ``vocab_size`` (read-only, ``2**codebook_bits``) is the number of ids ``generate`` can produce and the width of
    the logits. Prompt ids (classes, merge instructions) lie above it: they are inputs only, never sampled.

    Args:
        codebook_bits: the tokenizer's LFQ code length; image codes are ids ``[0, 2**codebook_bits)``.
        factorized_bits: ``[low_bits, high_bits]`` (summing to ``codebook_bits``) for the factorised input
            embedding and output head, or ``None`` for a plain table and a dense head (only up to 14 bits).
        grid_size: side of the square token grid; a sequence holds ``L = num_patches = grid_size**2`` image tokens.
        num_classes: number of classes; class id ``num_classes`` is the null class used for guidance.
        hidden_size, num_hidden_layers, num_attention_heads, intermediate_size: Llama-style backbone sizes
            (SwiGLU MLP). The head dimension must be a multiple of 4 for the 2-D rotary embedding.
        rms_norm_eps: epsilon of the RMSNorm layers.
        rope_theta: base of the 2-D rotary embedding.
        class_dropout_prob: probability of replacing the class by the null class in training (enables CFG).
        token_dropout, resid_dropout, ffn_dropout: dropout on the input embeddings, on the attention/MLP
            outputs before the residual sum, and inside the MLP.
        label_smoothing: label smoothing of the training cross-entropies.
        num_factorized_layers: depth of the small per-position transformer of the factorised head.
        repeat_window: ``W``, how many steps a repeated token stays visible (``W = 1``: only to itself).
        tokens_left_embedding: also present the merge instruction at every image token: add an embedding of how many
            new codes K still allows after it (K minus the distinct codes so far, at least 0). The paper presents K
            once, as the instruction token; this is our option (docs/design.md §3.1).
        repeat_gate: give the model an explicit choice, at every step, between repeating a code the row already holds
            and starting a new one: a binary head on the final state, trained on whether the true next code is a
            repeat; a code is then drawn among the held codes or among the others (docs/design.md §3.3). Our option.
        num_tokens: ``K`` used when ``generate`` gets no ``num_tokens`` (formerly ``default_num_tokens``, still read
            from saved configs).
        use_cache: whether the forward builds a cache by default at inference.
        initializer_range: std of the normal initialisation of linear and embedding weights.
    """

    model_type = "mergear"

    codebook_bits: int = 18
    factorized_bits: list[int] | None = (6, 12)
    grid_size: int = 16
    num_classes: int = 1000
    hidden_size: int = 1024
    num_hidden_layers: int = 24
    num_attention_heads: int = 16
    intermediate_size: int = 2816
    rms_norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    class_dropout_prob: float = 0.1
    token_dropout: float = 0.1
    resid_dropout: float = 0.1
    ffn_dropout: float = 0.1
    label_smoothing: float = 0.1
    num_factorized_layers: int = 2
    repeat_window: int = 1
    tokens_left_embedding: bool = False
    repeat_gate: bool = False
    num_tokens: int = 144
    use_cache: bool = True
    pad_token_id: int | None = None
    bos_token_id: int | None = None
    eos_token_id: int | None = None
    initializer_range: float = 0.02

    # Validated by the transformers hook `validate_architecture` (ValueError) plus `check_field_types` (TypeError),
    # not by huggingface_hub's `@strict`, whose errors are neither and which refuses an int in a float field.
    def __post_init__(self, **kwargs):
        if "default_num_tokens" in kwargs:  # a config saved before the rename
            default = self.__dataclass_fields__["num_tokens"].default
            given = {} if self.num_tokens == default else {"num_tokens": self.num_tokens}
            old = {"default_num_tokens": kwargs.pop("default_num_tokens")}
            self.num_tokens = _renamed_fields({**given, **old})["num_tokens"]
        check_field_types(self)
        # Dataclass defaults must be immutable, JSON gives lists: store a list either way.
        if self.factorized_bits is not None:
            self.factorized_bits = list(self.factorized_bits)
        super().__post_init__(**kwargs)
        self.validate_architecture()

    @property
    def num_patches(self) -> int:
        """``L``, the number of grid positions (image tokens of one sequence), as ``MergeVQConfig.num_patches``."""
        return self.grid_size**2

    @property
    def num_image_tokens(self) -> int:
        """Deprecated name of :attr:`num_patches`."""
        warnings.warn("MergeARConfig.num_image_tokens is now num_patches.", FutureWarning, stacklevel=2)
        return self.num_patches

    @property
    def default_num_tokens(self) -> int:
        """Deprecated name of :attr:`num_tokens`."""
        warnings.warn("MergeARConfig.default_num_tokens is now num_tokens.", FutureWarning, stacklevel=2)
        return self.num_tokens

    @default_num_tokens.setter
    def default_num_tokens(self, value: int) -> None:
        warnings.warn("MergeARConfig.default_num_tokens is now num_tokens.", FutureWarning, stacklevel=2)
        self.num_tokens = value

    @property
    def codebook_size(self) -> int:
        """``V``, the number of image codes."""
        return 2**self.codebook_bits

    @property
    def vocab_size(self) -> int:
        """Ids ``generate`` samples (the image codes) and the width of the logits: ``codebook_size``."""
        return self.codebook_size

    @classmethod
    def from_preset(cls, name: str, **overrides) -> "MergeARConfig":
        """Build a named size: ``"L"`` (paper, 256 tokens), ``"L-1024"`` (1024 tokens) or ``"tiny"``."""
        if name not in _PRESETS:
            raise ValueError(f"Unknown MergeAR preset {name!r}; expected one of {sorted(_PRESETS)}.")
        return cls(**{**_PRESETS[name], **_renamed_fields(overrides)})

    @classmethod
    def from_tokenizer_config(cls, tokenizer_config, preset: str = "tiny", **overrides) -> "MergeARConfig":
        """A ``preset``-sized config whose codes, grid and K are those of ``tokenizer_config`` (a ``MergeVQConfig``).

        ``codebook_bits``, ``factorized_bits`` and ``grid_size`` come from the tokenizer and cannot be overridden;
        ``num_tokens`` (K) defaults to its ``num_tokens``. Other keywords (``num_classes``, ``hidden_size``, ...)
        override the preset.
        """
        overrides = _renamed_fields(overrides)
        for name in ("codebook_bits", "factorized_bits", "grid_size"):
            if name in overrides:
                raise ValueError(f"{name} is taken from the tokenizer (it must match its codes); do not override it")
        missing = [name for name in ("codebook_bits", "factorized_bits", "grid_size", "num_tokens")
                   if not hasattr(tokenizer_config, name)]
        if missing:
            raise TypeError(
                f"tokenizer_config must be a MergeVQConfig (it has no {', '.join(missing)}), "
                f"got {type(tokenizer_config).__name__}"
            )
        matched = dict(
            codebook_bits=tokenizer_config.codebook_bits,
            factorized_bits=tokenizer_config.factorized_bits,
            grid_size=tokenizer_config.grid_size,
            num_tokens=tokenizer_config.num_tokens,
        )
        return cls.from_preset(preset, **{**matched, **overrides})

    def validate_architecture(self):
        """Reject impossible sizes with a message that names the field."""
        check_field_ranges(
            self,
            positive_ints=(
                "codebook_bits", "grid_size", "num_classes", "hidden_size", "num_hidden_layers", "num_attention_heads",
                "intermediate_size", "num_factorized_layers", "repeat_window",
            ),
            positive=("rms_norm_eps", "rope_theta"),
            probabilities=("class_dropout_prob", "token_dropout", "resid_dropout", "ffn_dropout", "label_smoothing"),
        )
        if self.factorized_bits is None:
            if self.codebook_bits > 14:
                raise ValueError(
                    f"MergeARConfig.factorized_bits=None (dense head) needs codebook_bits <= 14, got "
                    f"{self.codebook_bits}; use e.g. factorized_bits=[6, {self.codebook_bits - 6}]."
                )
        elif (
            len(self.factorized_bits) != 2
            or min(self.factorized_bits) < 1
            or sum(self.factorized_bits) != self.codebook_bits
        ):
            raise ValueError(
                "MergeARConfig.factorized_bits must be [low_bits, high_bits], both >= 1, summing to "
                f"codebook_bits={self.codebook_bits}; got {self.factorized_bits!r}."
            )
        if self.hidden_size % self.num_attention_heads or (self.hidden_size // self.num_attention_heads) % 4:
            raise ValueError(
                f"MergeARConfig.hidden_size ({self.hidden_size}) / num_attention_heads ({self.num_attention_heads}) "
                "must be an integer head dimension divisible by 4 (half rotates with the row, half with the column)."
            )
        if not 1 <= self.num_tokens <= self.num_patches:
            raise ValueError(
                f"MergeARConfig.num_tokens must be in [1, grid_size**2 = {self.num_patches}], got {self.num_tokens}."
            )


__all__ = ["MergeARConfig"]
