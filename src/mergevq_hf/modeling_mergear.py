"""MergeAR: class-conditional raster generation of MergeVQ tokens with a repeat-evicting KV cache.

A sequence is ``[class token, merge-instruction token(K)] + y[0..L-1]``: ``y`` is the tokenizer's ``L``-token raster
grid in which every position carries the code of its merged parent, so only about ``K`` codes are distinct. The
backbone is Llama-style (pre-norm RMSNorm, SwiGLU, SDPA) with a 2-D rotary embedding over each image token's
(row, column). A repeated code is visible as context only within ``W`` steps of its position (first occurrences
and the prompt stay visible): a boolean mask in training, :class:`MergeARCache` eviction at inference. With
``config.tokens_left_embedding`` every image token also carries how many new codes K still allows after it.

This mask rule is this project's reading of the paper's garbled Eq. 12 (docs/design.md §3.1), not released code.

Vocabulary seen by ``generate`` (``V = 2**codebook_bits``, ``C = num_classes``): image codes are ids ``[0, V)``;
class ``c`` is id ``V + c`` (``V + C`` is the null class); merge instruction ``K`` is id ``V + C + 1 + K``. The
logits only cover the ``V`` image codes, so prompt ids are never sampled.
"""

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from transformers import AutoConfig, AutoModel, AutoModelForCausalLM, GenerationMixin, PreTrainedModel
from transformers import LogitsProcessorList
from transformers import initialization as init
from transformers.cache_utils import Cache, DynamicCache
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.modeling_outputs import BaseModelOutputWithPast, CausalLMOutputWithPast
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
from transformers.utils import can_return_tuple
from transformers.utils.output_capturing import capture_outputs

from .cache_mergear import MergeARCache, build_sparsity_mask, first_occurrence
from .checkpoint_errors import ClearCheckpointErrorsMixin
from .config_checks import check_attention_outputs
from .configuration_mergear import MergeARConfig
from .generation_mergear import (
    SAMPLING_MODES, MergeARSampler, TokenBudgetLogitsProcessor, count_tokens_left, held_codes, paused_gc,
)
from .quantization_lfq import split_indices
from .sampling_utils import (
    check_guidance_scale, check_guidance_schedule, check_sampling_arguments, is_integer, renamed_keyword,
    scheduled_guidance,
)

NUM_PREFIX = 2  # class token + merge-instruction token
# transformers 5.24 renamed the output field `past_key_values` to `cache`; support both releases.
_CACHE_FIELD = "cache" if "cache" in CausalLMOutputWithPast.__dataclass_fields__ else "past_key_values"


@dataclass
class MergeARCausalLMOutput(CausalLMOutputWithPast):
    """``CausalLMOutputWithPast`` plus the factorised head's teacher-forced logits of the training path.

    low_logits: ``[B, L, 2**low_bits]``; high_logits: ``[B, L, 2**high_bits]``, given the true low bits.
    repeat_logits: ``[B, q]`` logits of the repeat gate (``config.repeat_gate``): the next code repeats a held one.
    """

    low_logits: torch.FloatTensor | None = None
    high_logits: torch.FloatTensor | None = None
    repeat_logits: torch.FloatTensor | None = None


def _rotate_half_per_axis(x: torch.Tensor) -> torch.Tensor:
    # Head dim = [row half | column half]; each half rotates its own two quarters, as 1-D RoPE does.
    x1, x2 = x.unflatten(-1, (2, 2, -1)).unbind(-2)
    return torch.stack((-x2, x1), dim=-2).flatten(-3)


def rotary_2d(position_ids: torch.Tensor, config: MergeARConfig, dtype: torch.dtype) -> tuple[torch.Tensor, ...]:
    """``[B, q]`` sequence indices -> ``(cos, sin)`` of shape ``[B, 1, q, head_dim]`` in ``dtype``.

    Image token ``j`` (sequence index ``j + 2``) sits at (row, col) = ``divmod(j, grid_size)``. The two prompt
    tokens get position (0, 0), i.e. no rotation: unlike LlamaGen, whose all-zero prefix rows zero the class
    token's query and key, they keep their content and simply carry no position.
    """
    head_dim = config.hidden_size // config.num_attention_heads
    raster = (position_ids - NUM_PREFIX).clamp(min=0)
    inv_freq = config.rope_theta ** -(
        torch.arange(0, head_dim // 2, 2, device=position_ids.device, dtype=torch.float32) / (head_dim // 2)
    )
    rows = (raster // config.grid_size).float()[..., None] * inv_freq
    cols = (raster % config.grid_size).float()[..., None] * inv_freq
    angles = torch.cat([rows, rows, cols, cols], dim=-1)[:, None]
    return angles.cos().to(dtype), angles.sin().to(dtype)


def eager_attention_forward(module, query, key, value, attention_mask, scaling, dropout=0.0, **kwargs):
    """Attention written out, so that it can return its weights ``[B, H, q, kv]`` (``output_attentions``).

    A boolean mask marks the visible keys, a float mask is added to the scores. Without a mask, a query block of
    more than one token on a causal module sees the keys up to its own position (the last ``q`` keys are its own).
    """
    scores = torch.matmul(query, key.transpose(2, 3)) * scaling
    query_length, key_length = query.shape[2], key.shape[2]
    if attention_mask is None and query_length > 1 and getattr(module, "is_causal", False):
        attention_mask = torch.ones(query_length, key_length, dtype=torch.bool, device=query.device)
        attention_mask = attention_mask.tril(key_length - query_length)
    if attention_mask is not None and attention_mask.dtype == torch.bool:
        scores = scores.masked_fill(~attention_mask, torch.finfo(scores.dtype).min)
    elif attention_mask is not None:
        scores = scores + attention_mask
    weights = scores.softmax(dim=-1, dtype=torch.float32).to(query.dtype)
    weights = F.dropout(weights, p=dropout, training=module.training)
    return torch.matmul(weights, value).transpose(1, 2).contiguous(), weights


class MergeARAttention(nn.Module):
    def __init__(self, config: MergeARConfig, layer_idx: int):
        super().__init__()
        self.config = config
        self.layer_idx = layer_idx
        self.num_heads = config.num_attention_heads
        self.head_dim = config.hidden_size // config.num_attention_heads
        self.scaling = self.head_dim**-0.5
        self.is_causal = True  # used by SDPA when no mask is given (the factorised head, dense-cache decoding)
        self.q_proj = nn.Linear(config.hidden_size, config.hidden_size, bias=False)
        self.k_proj = nn.Linear(config.hidden_size, config.hidden_size, bias=False)
        self.v_proj = nn.Linear(config.hidden_size, config.hidden_size, bias=False)
        self.o_proj = nn.Linear(config.hidden_size, config.hidden_size, bias=False)

    def forward(self, hidden_states, rotary, attention_mask, cache):
        batch, length, _ = hidden_states.shape
        shape = (batch, length, self.num_heads, self.head_dim)
        query = self.q_proj(hidden_states).view(shape).transpose(1, 2)
        key = self.k_proj(hidden_states).view(shape).transpose(1, 2)
        value = self.v_proj(hidden_states).view(shape).transpose(1, 2)
        if rotary is not None:
            # Rotate before caching, so evicting entries never disturbs the positions of the others.
            cos, sin = rotary
            query = query * cos + _rotate_half_per_axis(query) * sin
            key = key * cos + _rotate_half_per_axis(key) * sin
        if cache is not None:
            key, value = cache.update(key, value, self.layer_idx)
        # "eager" is not in the registry, so it falls back to the written-out attention above.
        attention = ALL_ATTENTION_FUNCTIONS.get_interface(self.config._attn_implementation, eager_attention_forward)
        output, weights = attention(self, query, key, value, attention_mask, scaling=self.scaling, dropout=0.0)
        return self.o_proj(output.reshape(batch, length, -1)), weights


class MergeARMLP(nn.Module):
    def __init__(self, config: MergeARConfig):
        super().__init__()
        self.gate_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.up_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.down_proj = nn.Linear(config.intermediate_size, config.hidden_size, bias=False)
        self.dropout = nn.Dropout(config.ffn_dropout)

    def forward(self, x):
        return self.down_proj(self.dropout(F.silu(self.gate_proj(x)) * self.up_proj(x)))


class MergeARDecoderLayer(GradientCheckpointingLayer):
    """Pre-norm attention + SwiGLU block. Callers pass all but ``hidden_states`` by keyword: under gradient
    checkpointing the layer then runs without the cache (a recomputation must not write to it twice)."""

    def __init__(self, config: MergeARConfig, layer_idx: int):
        super().__init__()
        self.input_layernorm = nn.RMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.self_attn = MergeARAttention(config, layer_idx)
        self.post_attention_layernorm = nn.RMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.mlp = MergeARMLP(config)
        self.resid_dropout = nn.Dropout(config.resid_dropout)

    def forward(self, hidden_states, rotary=None, attention_mask=None, cache=None):
        attended, _ = self.self_attn(self.input_layernorm(hidden_states), rotary, attention_mask, cache)
        hidden_states = hidden_states + self.resid_dropout(attended)
        return hidden_states + self.resid_dropout(self.mlp(self.post_attention_layernorm(hidden_states)))


class MergeARImageEmbedding(nn.Module):
    """Image-code embedding: ``E_lo(lo) + E_hi(hi)`` for a factorised vocabulary (no ``2**18``-row table)."""

    def __init__(self, config: MergeARConfig):
        super().__init__()
        if config.factorized_bits is None:
            self.low_bits = None
            self.table = nn.Embedding(config.codebook_size, config.hidden_size)
        else:
            self.low_bits, high_bits = config.factorized_bits
            self.embed_low = nn.Embedding(2**self.low_bits, config.hidden_size)
            self.embed_high = nn.Embedding(2**high_bits, config.hidden_size)

    def forward(self, codes):
        if self.low_bits is None:
            return self.table(codes)
        low, high = split_indices(codes, self.low_bits)
        return self.embed_low(low) + self.embed_high(high)


class MergeARClassEmbedding(nn.Embedding):
    """Class-token embedding (``num_classes`` classes + the null class), read straight from prompt ids.

    In training, label dropout swaps each class for the null class with probability ``class_dropout_prob``: that
    trains the unconditional branch of classifier-free guidance. Ids that are not class tokens get some class's
    embedding; callers keep it only where the id is a class token.
    """

    def __init__(self, config: MergeARConfig):
        super().__init__(config.num_classes + 1, config.hidden_size)
        self.codebook_size, self.num_classes = config.codebook_size, config.num_classes
        self.dropout_prob = config.class_dropout_prob

    def forward(self, input_ids):
        class_ids = (input_ids - self.codebook_size).clamp(0, self.num_classes)
        if self.training and self.dropout_prob > 0:
            dropped = torch.rand(class_ids.shape, device=class_ids.device) < self.dropout_prob
            class_ids = class_ids.masked_fill(dropped, self.num_classes)
        return super().forward(class_ids)


class MergeARFactorizedHead(nn.Module):
    """Open-MAGVIT2-style output head: a small causal transformer over ``[h_t, E'_lo(lo)]`` per position.

    Slot 0 (which sees only ``h_t``) predicts the low bits, slot 1 predicts the high bits given the low bits.
    """

    def __init__(self, config: MergeARConfig):
        super().__init__()
        self.low_bits, high_bits = config.factorized_bits
        self.embed_low = nn.Embedding(2**self.low_bits, config.hidden_size)
        self.layers = nn.ModuleList(MergeARDecoderLayer(config, i) for i in range(config.num_factorized_layers))
        self.norm = nn.RMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.low_head = nn.Linear(config.hidden_size, 2**self.low_bits, bias=False)
        self.high_head = nn.Linear(config.hidden_size, 2**high_bits, bias=False)
        self.low_head.zero_init = self.high_head.zero_init = True  # read by `_init_weights`

    def _run(self, hidden_states, cache=None):
        for layer in self.layers:
            hidden_states = layer(hidden_states, cache=cache)
        return self.norm(hidden_states)

    def forward(self, hidden_states, low):
        """Teacher forcing: ``[..., d]`` states and true low bits ``[...]`` -> (low, high) logits."""
        lead = hidden_states.shape[:-1]
        pairs = torch.stack([hidden_states, self.embed_low(low)], dim=-2).reshape(-1, 2, hidden_states.shape[-1])
        out = self._run(pairs)
        return self.low_head(out[:, 0]).unflatten(0, lead), self.high_head(out[:, 1]).unflatten(0, lead)

    def predict_low(self, hidden_states):
        """Slot 0 at inference: ``[N, d]`` states -> (``[N, 2**low_bits]`` low logits, the head's cache for slot 1)."""
        cache = DynamicCache()
        return self.low_head(self._run(hidden_states[:, None], cache)[:, 0]), cache

    def predict_high(self, low, cache):
        """Slot 1 at inference: ``[N]`` chosen low values and slot 0's cache -> ``[N, 2**high_bits]`` high logits."""
        return self.high_head(self._run(self.embed_low(low)[:, None], cache)[:, 0])

    def joint_log_probs(self, hidden_states):
        """``[..., d]`` -> ``[..., 2**codebook_bits]``: ``log p(lo) + log p(hi | lo)`` at code ``(hi << lo_bits) | lo``.

        Exact: slot 0 runs once, then slot 1 runs for all ``2**low_bits`` low values against its cached K/V.
        """
        lead, width = hidden_states.shape[:-1], hidden_states.shape[-1]
        low_logits, cache = self.predict_low(hidden_states.reshape(-1, width))
        low_log_probs = low_logits.float().log_softmax(-1)  # [N, M]
        count, num_low = low_log_probs.shape
        cache.batch_repeat_interleave(num_low)
        lows = torch.arange(num_low, device=low_logits.device).repeat(count)  # row n * M + l holds low value l
        high_log_probs = self.predict_high(lows, cache).float().log_softmax(-1).view(count, num_low, -1)
        joint = low_log_probs[:, :, None] + high_log_probs  # [N, lo, hi]
        return joint.transpose(1, 2).reshape(*lead, -1)  # flat index hi * 2**low_bits + lo


class MergeARPreTrainedModel(ClearCheckpointErrorsMixin, PreTrainedModel):
    config: MergeARConfig
    config_class = MergeARConfig
    base_model_prefix = "model"
    main_input_name = "input_ids"
    _no_split_modules = ["MergeARDecoderLayer"]
    _input_embed_layer = "embed_image"  # get_input_embeddings(): the image-code table (asked for by FSDP2 wrapping)
    _supports_sdpa = True
    supports_gradient_checkpointing = True
    # `output_hidden_states` / `output_attentions` of the backbone (transformers' `capture_outputs` hooks).
    _can_record_outputs = {"hidden_states": MergeARDecoderLayer, "attentions": MergeARAttention}

    def _init_weights(self, module):
        std = self.config.initializer_range
        if isinstance(module, nn.Linear):
            if getattr(module, "zero_init", False):
                init.zeros_(module.weight)
            else:
                init.normal_(module.weight, mean=0.0, std=std)
        elif isinstance(module, nn.Embedding):
            init.normal_(module.weight, mean=0.0, std=std)
        elif isinstance(module, nn.RMSNorm):
            init.ones_(module.weight)


class MergeARModel(MergeARPreTrainedModel):
    """The MergeAR backbone: prompt/image embeddings, decoder layers and final norm (no output head).

    MergeRandAR's backbone is this one with one more prompt table (see :meth:`_add_prompt_embeddings`)."""

    def __init__(self, config: MergeARConfig):
        super().__init__(config)
        self.embed_image = MergeARImageEmbedding(config)
        self.embed_class = MergeARClassEmbedding(config)
        self.embed_merge = nn.Embedding(config.num_patches + 1, config.hidden_size)  # indexed by K itself
        if config.tokens_left_embedding:
            self.embed_tokens_left = nn.Embedding(config.num_patches + 1, config.hidden_size)
        self._add_prompt_embeddings(config)
        self.token_dropout = nn.Dropout(config.token_dropout)
        self.layers = nn.ModuleList(MergeARDecoderLayer(config, i) for i in range(config.num_hidden_layers))
        self.norm = nn.RMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.post_init()

    def _add_prompt_embeddings(self, config: MergeARConfig) -> None:
        """Tables for further prompt ids, registered right after ``embed_merge``; MergeAR has none."""

    def _check_input_ids(self, input_ids):
        config = self.config
        merge_base = config.codebook_size + config.num_classes + 1
        end = merge_base + config.num_patches + 1
        if input_ids.dim() != 2:
            raise ValueError(f"input_ids must be [batch, length], got shape {tuple(input_ids.shape)}.")
        if ((input_ids < 0) | (input_ids >= end) | (input_ids == merge_base)).any():
            raise ValueError(
                f"input_ids must be image codes [0, {config.codebook_size}), class ids [{config.codebook_size}, "
                f"{merge_base - 1}] or merge-instruction ids [{merge_base + 1}, {end - 1}] (K in 1..L); got "
                f"min {int(input_ids.min())}, max {int(input_ids.max())}."
            )

    def embed(self, input_ids):
        """Embed a mixed sequence of prompt ids and image codes (each id picks its own table)."""
        codebook, classes = self.config.codebook_size, self.config.num_classes
        is_image = input_ids < codebook
        is_class = ~is_image & (input_ids <= codebook + classes)
        image = self.embed_image(input_ids.clamp(0, codebook - 1))
        prompt = torch.where(
            is_class[..., None],
            self.embed_class(input_ids),
            self.embed_merge((input_ids - codebook - classes - 1).clamp(0, self.config.num_patches)),
        )
        return torch.where(is_image[..., None], image, prompt)

    def _attention_mask(self, input_ids, attention_mask, cache, past):
        if attention_mask is not None and attention_mask.dim() == 4:
            if isinstance(cache, MergeARCache):
                raise ValueError("An explicit 4-D attention_mask cannot be combined with a MergeARCache.")
            return attention_mask  # an explicit mask, e.g. a reference computation in tests
        if attention_mask is not None and not bool(attention_mask.all()):
            raise ValueError("MergeAR does not support padding: attention_mask must be all ones.")
        if isinstance(cache, MergeARCache):
            return cache.observe(input_ids)
        length = input_ids.shape[1]
        if cache is not None:
            # Any other cache holds every token: plain causal attention (the raster-AR baseline).
            if length == 1:
                return None
            index = torch.arange(past + length, device=input_ids.device)
            return (index[past:, None] >= index[None, :])[None, None]
        # No cache: the whole sequence is here, so apply the sparsity rule directly.
        is_prompt = input_ids >= self.config.codebook_size
        num_prompt = int(is_prompt.all(0).long().cumprod(0).sum())
        if is_prompt[:, num_prompt:].any():
            raise ValueError("Prompt ids (class / merge instruction) must come before all image codes.")
        return build_sparsity_mask(input_ids[:, num_prompt:], self.config.repeat_window, num_prompt)

    def _embed_tokens_left(self, input_ids, tokens_left, past):
        if tokens_left is None:
            if past:
                raise ValueError(
                    "This model embeds the tokens left under the merge instruction (config.tokens_left_embedding): "
                    "decoding from a cache needs tokens_left, count_tokens_left(whole sequence)[:, -q:]; generate "
                    "passes it."
                )
            merge_base = self.config.codebook_size + self.config.num_classes + 1
            if input_ids.shape[1] < NUM_PREFIX or not bool((input_ids[:, 1] > merge_base).all()):
                raise ValueError(
                    "This model counts the tokens left from the merge instruction: sequences must start "
                    "[class, merge instruction(K)], or pass tokens_left."
                )
            tokens_left = count_tokens_left(input_ids, self.config)
        if tokens_left.shape != input_ids.shape:
            raise ValueError(f"tokens_left must be {tuple(input_ids.shape)} like input_ids, got {tuple(tokens_left.shape)}.")
        is_image = input_ids < self.config.codebook_size
        embedded = self.embed_tokens_left(tokens_left.clamp(0, self.config.num_patches))
        return embedded * is_image[..., None]

    @capture_outputs
    def forward(
        self,
        input_ids: torch.LongTensor,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        cache: Cache | None = None,
        use_cache: bool | None = None,
        past_key_values: Cache | None = None,
        *,
        tokens_left: torch.LongTensor | None = None,
        output_attentions: bool | None = None,
        output_hidden_states: bool | None = None,
    ) -> BaseModelOutputWithPast:
        r"""
        input_ids: ``[B, q]`` prompt ids and/or image codes (see the module docstring for the id layout).
        attention_mask: all-ones 2-D (padding is not supported) or an explicit boolean ``[B, 1, q, kv]`` mask.
        position_ids: sequence indices (``arange`` after the tokens already in the cache by default).
        cache / past_key_values: a ``MergeARCache`` (MergeAR eviction) or any other ``Cache`` (keeps every
            token: raster-AR baseline on the same weights). Without a cache the sparsity mask is applied directly.
        use_cache: build a ``MergeARCache`` when no cache is given (default: ``config.use_cache`` in eval mode).
        tokens_left: ``[B, q]``, :func:`count_tokens_left` of the whole sequence at these ``q`` positions; used with
            ``config.tokens_left_embedding``, where it is needed once a cache holds the start of the sequence
            (``generate`` passes it). Without a cache it is counted from ``input_ids``.
        output_hidden_states: also return ``hidden_states``, the ``num_hidden_layers + 1`` states ``[B, q, d]``
            (embeddings, then every layer's output; the last one after the final norm). Recorded by transformers'
            ``capture_outputs`` hooks, as are the ``attentions``.
        output_attentions: also return every layer's attention weights ``[B, H, q, kv]`` (eager attention only).
        return_dict: ``False`` returns a tuple.
        """
        check_attention_outputs(self.config, output_attentions)
        cache = cache if cache is not None else past_key_values
        self._check_input_ids(input_ids)
        if use_cache is None:
            use_cache = self.config.use_cache and not self.training
        if use_cache and cache is None:
            cache = MergeARCache(self.config)
        past = cache.get_seq_length() if cache is not None else 0
        rows = _cache_rows(cache)
        if past and rows is not None and rows != input_ids.shape[0]:
            raise ValueError(
                f"The cache holds {rows} rows but input_ids has {input_ids.shape[0]}: use a fresh cache per "
                "generate call and keep guidance_scale the same for all steps."
            )
        if position_ids is None:
            position_ids = torch.arange(past, past + input_ids.shape[1], device=input_ids.device)[None]
        if int(position_ids.max()) > NUM_PREFIX + self.config.num_patches - 1:
            raise ValueError(
                f"Sequence longer than the prompt + L = {NUM_PREFIX + self.config.num_patches} tokens."
            )
        mask = self._attention_mask(input_ids, attention_mask, cache, past)
        hidden_states = self.embed(input_ids)
        if self.config.tokens_left_embedding:
            hidden_states = hidden_states + self._embed_tokens_left(input_ids, tokens_left, past)
        hidden_states = self.token_dropout(hidden_states)
        rotary = rotary_2d(position_ids.expand(input_ids.shape[0], -1), self.config, hidden_states.dtype)
        for layer in self.layers:
            hidden_states = layer(hidden_states, rotary=rotary, attention_mask=mask, cache=cache)
        return BaseModelOutputWithPast(last_hidden_state=self.norm(hidden_states), **{_CACHE_FIELD: cache})


def _integers(values, name: str, device) -> torch.LongTensor:
    # Integer ids as a flat LongTensor. Floats, bools and strings are refused rather than coerced (1.7 -> 1, True -> 1).
    if isinstance(values, torch.Tensor):
        if values.is_floating_point() or values.is_complex() or values.dtype == torch.bool:
            raise ValueError(f"{name} must hold integers, got a {values.dtype} tensor.")
        return values.to(device=device, dtype=torch.long).reshape(-1)
    if isinstance(values, np.ndarray):
        if values.dtype.kind not in "iu":
            raise ValueError(f"{name} must hold integers, got a numpy array of {values.dtype}.")
        return torch.as_tensor(values, dtype=torch.long, device=device).reshape(-1)
    items = list(values) if isinstance(values, (list, tuple)) else [values]
    if not all(is_integer(item) for item in items):
        raise ValueError(
            f"{name} must be an int or a list of ints (numpy ints and integer tensors work), got {values!r}."
        )
    return torch.tensor([int(item) for item in items], dtype=torch.long, device=device)


def _cache_rows(cache) -> int | None:
    # Batch rows a filled cache holds (None when it cannot tell), to reject a mismatched batch early.
    keys = getattr(cache.layers[0], "keys", None) if cache is not None and cache.layers else None
    return keys.shape[0] if isinstance(keys, torch.Tensor) and keys.dim() == 4 else None


def gated_log_probs(log_probs, repeat_logits, held):
    """The repeat gate's code distribution: ``log(g p(c | c held) + (1 - g) p(c | c not held))``, ``g`` = sigmoid of
    ``repeat_logits`` ``[...]``, ``p`` the head's distribution ``log_probs`` ``[..., V]`` renormalised on each side of
    ``held`` ``[..., V]`` (a side with no code gets no mass)."""
    log_probs = log_probs.float()
    minus_inf = torch.tensor(float("-inf"), device=log_probs.device)
    sides = []
    for side, gate in ((held, F.logsigmoid(repeat_logits.float())), (~held, F.logsigmoid(-repeat_logits.float()))):
        renormalised = log_probs.masked_fill(~side, float("-inf")).log_softmax(-1)
        sides.append(torch.where(side.any(-1, keepdim=True), gate[..., None] + renormalised, minus_inf))
    mixture = torch.logaddexp(*sides)
    # Only one side holds codes (the first step holds none): all mass goes to it.
    return mixture - mixture.logsumexp(-1, keepdim=True)


class MergeARGeneratorMixin:
    """What MergeAR and MergeRandAR share on top of their backbones: the code head, its logits and loss, how
    ``generate`` draws a code from it (``sampling``), and the class-label check. The head is factorised
    (``config.factorized_bits``) or a dense ``nn.Linear`` up to 14 bits."""

    def _init_code_head(self, config: MergeARConfig) -> None:
        if config.factorized_bits is None:
            self.lm_head = nn.Linear(config.hidden_size, config.codebook_size, bias=False)
            self.lm_head.zero_init = True  # as LlamaGen: start from uniform predictions
        else:
            self.lm_head = MergeARFactorizedHead(config)

    def logits(self, hidden_states):
        """``[..., d]`` final states -> ``[..., V]`` code logits (joint log-probabilities with the factorised head)."""
        if isinstance(self.lm_head, MergeARFactorizedHead):
            return self.lm_head.joint_log_probs(hidden_states)
        return self.lm_head(hidden_states)

    def _resolve_sampling(self, sampling, do_sample: bool, num_beams: int = 1) -> str:
        """``generate``'s ``sampling``: ``"sub_token"`` (default: factorised head, sampling, one beam) or ``"joint"``."""
        if sampling is not None and sampling not in SAMPLING_MODES:
            raise ValueError(f"sampling must be None or one of {SAMPLING_MODES}, got {sampling!r}.")
        factorised = isinstance(self.lm_head, MergeARFactorizedHead)
        if sampling == "sub_token" and not factorised:
            raise ValueError(
                "sampling='sub_token' needs a factorised head (config.factorized_bits); this one is dense."
            )
        if sampling == "sub_token" and num_beams > 1:
            raise ValueError("Beam search scores whole codes: use sampling='joint' (the default with num_beams > 1).")
        if sampling is None:
            sampling = "sub_token" if factorised and do_sample and num_beams == 1 else "joint"
        return sampling

    def _code_loss(self, hidden_states, codes):
        """Teacher-forced loss of ``codes`` ``[...]`` from states ``[..., d]``: mean ``CE(lo) + CE(hi | true lo)``
        (``CE`` for a dense head), and its logits as output fields (``low_logits``/``high_logits`` or ``logits``)."""
        smoothing = self.config.label_smoothing

        def cross_entropy(logits, targets):
            return F.cross_entropy(logits.flatten(0, -2).float(), targets.flatten(), label_smoothing=smoothing)

        if isinstance(self.lm_head, nn.Linear):
            logits = self.lm_head(hidden_states)
            return cross_entropy(logits, codes), {"logits": logits}
        low, high = split_indices(codes, self.lm_head.low_bits)
        low_logits, high_logits = self.lm_head(hidden_states, low)
        loss = cross_entropy(low_logits, low) + cross_entropy(high_logits, high)
        return loss, {"low_logits": low_logits, "high_logits": high_logits}

    def _check_class_labels(self, class_labels) -> torch.LongTensor:
        """``[B]`` class ids in ``[0, num_classes]`` (``num_classes`` = null class) on the model's device."""
        classes = self.config.num_classes
        labels = _integers(class_labels, "class_labels", self.device)
        if labels.numel() == 0 or ((labels < 0) | (labels > classes)).any():
            raise ValueError(
                f"class_labels must be class ids in [0, {classes}] ({classes} = null class), got {labels.tolist()}."
            )
        return labels


class MergeARForCausalLM(MergeARGeneratorMixin, MergeARPreTrainedModel, GenerationMixin):
    """MergeAR generator: backbone + output head (factorised for large codebooks, dense up to 14 bits).

    ``forward``'s logits cover all ``V`` image codes. With the factorised head they are the exact joint
    log-probabilities ``log p(lo) + log p(hi | lo)``, computed by running the head for every low value (one batched
    pass); with a dense head they are the head's plain output. ``generate`` uses them for greedy decoding, beam
    search and ``sampling="joint"``; when sampling with a factorised head it draws per sub-token instead (low bits,
    then high bits given them, as Open-MAGVIT2 does), running the head twice per step (see :meth:`generate`).
    Training returns ``CE(lo) + CE(hi | true lo)`` and the two teacher-forced logit tensors.

    Generation::

        sequences = model.generate(class_labels=[3, 7], num_tokens=144, do_sample=True, top_k=100, guidance_scale=2.0)
        codes = model.image_tokens_from_sequences(sequences)  # [N, L] raster codes for the tokenizer's decoder
    """

    def __init__(self, config: MergeARConfig):
        super().__init__(config)
        self.model = MergeARModel(config)
        self._init_code_head(config)
        if config.repeat_gate:
            self.repeat_gate = nn.Linear(config.hidden_size, 1)
        self.post_init()

    def build_prompt(self, class_labels, num_tokens=None) -> torch.LongTensor:
        """``[B, 2]`` prompt ids ``[V + class, V + C + 1 + K]``; ``num_tokens`` is an int or ``[B]`` (default K)."""
        config = self.config
        labels = self._check_class_labels(class_labels)
        if num_tokens is None:
            num_tokens = config.num_tokens
        counts = _integers(num_tokens, "num_tokens", self.device)
        if counts.numel() not in (1, labels.numel()):
            raise ValueError(f"num_tokens must be an int or one value per class label, got {counts.numel()} values.")
        if ((counts < 1) | (counts > config.num_patches)).any():
            raise ValueError(f"num_tokens (K) must be in [1, L = {config.num_patches}], got {counts.tolist()}.")
        merge_ids = config.codebook_size + config.num_classes + 1 + counts.expand(labels.numel())
        return torch.stack([config.codebook_size + labels, merge_ids], dim=1)

    def _check_labels(self, labels, batch):
        length, codebook = self.config.num_patches, self.config.codebook_size
        if labels.dim() != 2 or labels.shape != (batch, length):
            raise ValueError(f"labels must be [batch={batch}, L={length}] raster codes, got {tuple(labels.shape)}.")
        if ((labels < 0) | (labels >= codebook)).any():
            raise ValueError(f"labels must be image codes in [0, {codebook}).")

    @can_return_tuple
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        cache: Cache | None = None,
        use_cache: bool | None = None,
        labels: torch.LongTensor | None = None,
        class_labels: torch.LongTensor | None = None,
        num_tokens: int | torch.LongTensor | None = None,
        guidance_scale: float | None = None,
        logits_to_keep: int | torch.Tensor = 0,
        past_key_values: Cache | None = None,
        output_attentions: bool | None = None,
        output_hidden_states: bool | None = None,
        cfg_scale: float | None = None,
        tokens_left: torch.LongTensor | None = None,
        codes_held: torch.BoolTensor | None = None,
        guidance_schedule: str = "constant",
    ) -> MergeARCausalLMOutput:
        r"""
        Two entries:

        * training / scoring: ``class_labels`` ``[B]``, ``num_tokens`` (int or ``[B]``) and ``labels`` ``[B, L]``
          raster codes (each position carries its merged parent's code). Runs ``[cls, M(K)] + labels[:, :-1]``
          under the sparsity mask and returns ``loss`` (mean ``CE(lo) + CE(hi | lo)``, or ``CE`` for a dense head)
          plus ``low_logits``/``high_logits`` (factorised) or ``logits`` (dense) for the L positions.
        * generation: ``input_ids`` (prompt and/or codes) with an optional cache; returns ``logits`` ``[B, k, V]``
          for the last ``logits_to_keep`` positions (0 = all).

        guidance_scale: classifier-free guidance in one batched forward: rows ``[cond; uncond]`` (class token swapped
            for the null class) run as ``2B`` rows, the cache holds ``2B`` rows, and the returned logits are
            ``u + s * (c - u)`` for the ``B`` rows. Keep the same value for every step of a generation.
        guidance_schedule: ``"constant"``, or ``"linear"``: the scale for the code at image position ``t`` is
            ``1 + (s - 1) t / (L - 1)``, rising from 1 at the first code to ``s`` at the last (the position comes from
            the cache's length and the tokens run).
        output_hidden_states, output_attentions: the backbone's (see :meth:`MergeARModel.forward`), over the
            sequence it ran (``[cls, M(K)] + labels[:, :-1]`` in training; ``2B`` rows with ``guidance_scale``).
        return_dict: ``False`` returns a tuple.
        cfg_scale: deprecated name of ``guidance_scale``.
        tokens_left: see :meth:`MergeARModel.forward` (generation with ``config.tokens_left_embedding``).
        codes_held: ``[B, V]`` bool, the codes each row held before ``input_ids`` (generation with a cache and
            ``config.repeat_gate``; :func:`held_codes` of the sequence so far). With the gate, ``logits`` are the
            gate's mixture ``log(g p(c | held) + (1 - g) p(c | not held))`` and ``repeat_logits`` hold the gate.
        """
        guidance_scale = renamed_keyword(guidance_scale, cfg_scale, "guidance_scale", "cfg_scale")
        recorded = dict(output_attentions=output_attentions, output_hidden_states=output_hidden_states)
        cache = cache if cache is not None else past_key_values
        if class_labels is not None:
            if input_ids is not None:
                raise ValueError("Pass either input_ids or class_labels (+ num_tokens, labels), not both.")
            input_ids = self.build_prompt(class_labels, num_tokens)
        elif labels is not None or num_tokens is not None:
            raise ValueError("labels and num_tokens need class_labels (use input_ids for generation-style calls).")
        if input_ids is None:
            raise ValueError("Pass input_ids, or class_labels (+ num_tokens, labels).")

        if labels is not None:
            if guidance_scale is not None:
                raise ValueError("guidance_scale is an inference option; it cannot be combined with labels.")
            self._check_labels(labels, input_ids.shape[0])
            sequence = torch.cat([input_ids, labels[:, :-1]], dim=1)
            outputs = self.model(sequence, use_cache=False, **recorded)
            hidden_states = outputs.last_hidden_state[:, NUM_PREFIX - 1 :]
            loss, logits = self._code_loss(hidden_states, labels)
            if self.config.repeat_gate:
                repeat_logits = self.repeat_gate(hidden_states)[..., 0]
                is_repeat = ~first_occurrence(labels)
                loss = loss + F.binary_cross_entropy_with_logits(repeat_logits.float(), is_repeat.float())
                logits["repeat_logits"] = repeat_logits
            return MergeARCausalLMOutput(
                loss=loss, hidden_states=outputs.hidden_states, attentions=outputs.attentions, **logits
            )

        guidance_scale = check_guidance_scale(guidance_scale)
        check_guidance_schedule(guidance_schedule)
        guided = guidance_scale is not None
        batch = input_ids.shape[0]
        if guided:
            input_ids, attention_mask, position_ids = self._guidance_batch(
                input_ids, attention_mask, position_ids, cache
            )
            if tokens_left is not None:
                tokens_left = tokens_left.repeat(2, 1)
        if self.config.repeat_gate:
            held = self._held_at_each_position(input_ids[:batch], codes_held, cache)
        outputs = self.model(
            input_ids, attention_mask, position_ids, cache=cache, use_cache=use_cache, tokens_left=tokens_left, **recorded
        )
        keep = slice(-logits_to_keep, None) if isinstance(logits_to_keep, int) else logits_to_keep
        hidden_states = outputs.last_hidden_state[:, keep]
        logits = self.logits(hidden_states)
        repeat_logits = self.repeat_gate(hidden_states)[..., 0] if self.config.repeat_gate else None
        if guided:
            past = cache.get_seq_length() if cache is not None else 0
            # The state at sequence index i predicts the code at image position i - 1.
            positions = torch.arange(past, past + input_ids.shape[1], device=logits.device)[keep] - (NUM_PREFIX - 1)
            length = self.config.num_patches
            scale = scheduled_guidance(guidance_scale, guidance_schedule, positions.clamp(min=0), length)
            scale = torch.as_tensor(scale, dtype=logits.dtype, device=logits.device).expand(positions.shape)  # [k]
            logits = logits[batch:] + scale[:, None] * (logits[:batch] - logits[batch:])
            if repeat_logits is not None:
                repeat_logits = repeat_logits[batch:] + scale * (repeat_logits[:batch] - repeat_logits[batch:])
        if repeat_logits is not None:
            logits = gated_log_probs(logits, repeat_logits, held[:, keep])
        return MergeARCausalLMOutput(
            logits=logits, repeat_logits=repeat_logits, hidden_states=outputs.hidden_states,
            attentions=outputs.attentions, **{_CACHE_FIELD: getattr(outputs, _CACHE_FIELD)},
        )

    def _held_at_each_position(self, input_ids, codes_held, cache):
        """``[B, q, V]`` bool: the codes a row holds once each of the ``q`` input tokens is in (repeat gate)."""
        past = cache.get_seq_length() if cache is not None else 0
        if codes_held is None:
            if past:
                raise ValueError(
                    "This model has a repeat gate (config.repeat_gate): decoding from a cache needs codes_held, the "
                    "[B, V] codes the row held before these tokens (held_codes(sequence so far)); generate passes it."
                )
            codes_held = torch.zeros(input_ids.shape[0], self.config.codebook_size, dtype=torch.bool, device=input_ids.device)
        if codes_held.shape != (input_ids.shape[0], self.config.codebook_size) or codes_held.dtype != torch.bool:
            raise ValueError(f"codes_held must be a [{input_ids.shape[0]}, {self.config.codebook_size}] bool tensor.")
        is_code = input_ids < self.config.codebook_size
        added = torch.zeros(*input_ids.shape, self.config.codebook_size, dtype=torch.uint8, device=input_ids.device)
        added.scatter_(2, (input_ids * is_code)[..., None], is_code[..., None].to(torch.uint8))
        return added.cummax(dim=1).values.bool() | codes_held[:, None]

    def _guidance_batch(self, input_ids, attention_mask, position_ids, cache):
        codebook, null_id = self.config.codebook_size, self.config.codebook_size + self.config.num_classes
        is_class = (input_ids >= codebook) & (input_ids <= null_id)
        starting = cache is None or cache.get_seq_length() == 0
        if starting and not is_class.any(1).all():
            raise ValueError("guidance_scale needs a class token in every prompt to swap for the null class.")
        if isinstance(cache, MergeARCache):
            cache.guided = True  # row operations must then move both halves together
        uncond = input_ids.masked_fill(is_class, null_id)
        input_ids = torch.cat([input_ids, uncond])
        if attention_mask is not None:
            attention_mask = torch.cat([attention_mask, attention_mask])
        if position_ids is not None and position_ids.shape[0] > 1:
            position_ids = torch.cat([position_ids, position_ids])
        return input_ids, attention_mask, position_ids

    def generate(
        self, inputs=None, generation_config=None, class_labels=None, num_tokens=None, guidance_scale=None,
        guidance_schedule="constant", sampling=None, token_budget=False, generators=None, **kwargs,
    ):
        r"""``GenerationMixin.generate`` with a class-conditional entry, batched guidance, a fresh ``MergeARCache``,
        per-sub-token sampling and the token budget.

        class_labels: ``[B]`` integer class ids (list, numpy or integer tensor); the prompt ``[cls, M(K)]`` is built
            for you. Or pass a prompt ``[[V + class, V + C + 1 + K, codes...]]`` as ``inputs`` / ``input_ids``.
        num_tokens: ``K`` (int or ``[B]``, default ``config.num_tokens``), the merge instruction.
        guidance_scale: batched classifier-free guidance ``u + s (c - u)`` with the null class as ``u`` (None or
            1 = off). A ``GenerationConfig``'s ``guidance_scale`` is used when the keyword is not given; transformers'
            own unbatched guidance with a negative prompt is never run. ``cfg_scale`` is its deprecated name.
        guidance_schedule: ``"constant"``, or ``"linear"`` (as RandAR's): the scale rises from 1 at the first grid
            position to ``guidance_scale`` at the last (position ``t`` of ``L`` gets ``1 + (s - 1) t / (L - 1)``).
        sampling: how a code is drawn.
            - ``"sub_token"`` (default for a factorised head when sampling with one beam): the low bits, then the
              high bits given them, as Open-MAGVIT2 samples. Guidance, temperature, top-k and top-p act on each
              sub-token: ``top_k=k`` keeps the k most likely low values, then the k most likely high values given
              the drawn low value (not the k most likely codes); ``top_p`` likewise keeps the p-mass of each.
            - ``"joint"`` (default otherwise: greedy, beam search, dense head): the exact joint distribution of codes
              ``log p(lo) + log p(hi | lo)``, so every processor acts on whole codes. Needed for beam search and for
              full-code ``scores``; costs ``2**low_bits`` runs of the head's second slot per row and step.
            ``temperature`` / ``top_k`` / ``top_p`` come from the generation config as usual (transformers'
            default ``top_k`` is 50: pass ``top_k=0`` for plain sampling).
        token_budget: hold the merge instruction: once a row has produced ``K`` distinct codes it may only repeat
            codes it already produced (sub-token: the low bits of a held code, then the high bits of a held code
            with those low bits; joint and dense heads: the held codes). Applied before temperature / top-k / top-p.
        generators: one ``torch.Generator`` per generated row: row i draws only from ``generators[i]``.

        The length defaults to the tokens left to fill the ``L`` grid; ``max_new_tokens`` / ``max_length`` (keyword,
        ``generation_config`` or ``model.generation_config``) can stop earlier. A ``MergeARCache`` is made unless a
        cache is passed or ``use_cache=False`` is set (then every step recomputes the sequence under the sparsity
        mask). Pass ``cache=DynamicCache()`` (or ``MergeARCache(config, compress=False)``) for the raster-AR
        baseline. Processors that punish repeats (``repetition_penalty``, ``no_repeat_ngram_size``) are refused: a
        K-token image repeats each merged code over its whole region. Python's cyclic GC is paused while it runs.

        Returns what ``generate`` returns (sequences ``[N, 2 + L]`` with the prompt; see
        :meth:`image_tokens_from_sequences`). With ``return_dict_in_generate=True, output_scores=True`` per-sub-token
        sampling returns a ``MergeARSubTokenOutput`` whose ``low_scores`` / ``high_scores`` hold both sub-tokens'
        scores per step.
        """
        if class_labels is not None:
            if inputs is not None or kwargs.get("input_ids") is not None:
                raise ValueError("Pass either class_labels or a prompt in inputs/input_ids, not both.")
            inputs = self.build_prompt(class_labels, num_tokens)
        elif num_tokens is not None:
            raise ValueError("num_tokens needs class_labels (a prompt in input_ids already encodes K).")
        if inputs is None:
            inputs = kwargs.pop("input_ids", None)
        if inputs is None:
            raise ValueError("generate needs class_labels (or a prompt [[V + class, V + C + 1 + K]] as input_ids).")
        inputs = self._check_prompt(inputs)
        if kwargs.get("negative_prompt_ids") is not None:
            raise ValueError(
                "MergeAR's guidance swaps the class token for the null class; negative_prompt_ids are not supported."
            )
        if not isinstance(token_budget, bool):
            raise ValueError(f"token_budget must be True or False, got {token_budget!r}.")
        length_given = any(
            getattr(source, name, None) is not None
            for source in (generation_config, self.generation_config)
            for name in ("max_new_tokens", "max_length")
        ) or any(kwargs.get(name) is not None for name in ("max_new_tokens", "max_length"))
        guidance_scale = renamed_keyword(guidance_scale, kwargs.pop("cfg_scale", None), "guidance_scale", "cfg_scale")
        config, model_kwargs = self._prepare_generation_config(generation_config, **kwargs)
        if guidance_scale is not None:  # the keyword overrides the generation config's, as keywords do in transformers
            config.guidance_scale = guidance_scale
        # Carried under its own name: transformers would take a `guidance_scale` model kwarg for its unbatched guidance.
        model_kwargs["batched_guidance_scale"] = self._resolve_guidance(config)
        check_guidance_schedule(guidance_schedule)
        model_kwargs["batched_guidance_schedule"] = guidance_schedule
        self._check_generation_config(config)
        self._set_length(config, inputs.shape[1], length_given)
        if config.use_cache and model_kwargs.get("cache") is None and model_kwargs.get("past_key_values") is None:
            model_kwargs["cache"] = MergeARCache(self.config)

        sampling = self._resolve_sampling(sampling, config.do_sample, config.num_beams)
        if generators is not None and (config.num_beams > 1 or not config.do_sample):
            raise ValueError("generators need do_sample=True with one beam (each row draws from its own generator).")
        if sampling == "sub_token" or generators is not None:
            if model_kwargs.get("custom_generate") is not None:
                raise ValueError("custom_generate replaces MergeAR's decoding loop: use it with sampling='joint'.")
            model_kwargs["custom_generate"] = MergeARSampler(sampling, token_budget, generators)
        elif token_budget:
            # First among the caller's processors, so that filters and draws among them see only allowed codes.
            processors = [TokenBudgetLogitsProcessor(self.config), *(model_kwargs.pop("logits_processor", None) or [])]
            model_kwargs["logits_processor"] = LogitsProcessorList(processors)
        with paused_gc():
            return super().generate(inputs, config, **model_kwargs)

    def prepare_inputs_for_generation(
        self, input_ids, batched_guidance_scale=None, batched_guidance_schedule="constant", **kwargs
    ):
        """transformers' preparation; ``forward`` then gets the guidance scale and schedule of ``generate``, the tokens
        left at the positions it runs (``config.tokens_left_embedding``) and the codes held before them
        (``config.repeat_gate``)."""
        inputs = {
            **super().prepare_inputs_for_generation(input_ids, **kwargs),
            "guidance_scale": batched_guidance_scale, "guidance_schedule": batched_guidance_schedule,
        }
        step = inputs["input_ids"].shape[1]
        if self.config.tokens_left_embedding:
            inputs["tokens_left"] = count_tokens_left(input_ids, self.config)[:, -step:]
        if self.config.repeat_gate:
            inputs["codes_held"] = held_codes(input_ids[:, : input_ids.shape[1] - step], self.config.codebook_size)
        return inputs

    def _check_prompt(self, prompt) -> torch.LongTensor:
        """A generation prompt must be ``[class, merge instruction(K), image codes...]`` with room left to generate."""
        config = self.config
        if not isinstance(prompt, torch.Tensor):
            prompt = torch.as_tensor(prompt)
        if prompt.is_floating_point() or prompt.dtype == torch.bool or prompt.dim() != 2:
            raise ValueError(
                f"A prompt must be a [batch, length] integer tensor, got {prompt.dtype} {tuple(prompt.shape)}."
            )
        codebook, merge_base = config.codebook_size, config.codebook_size + config.num_classes + 1
        longest = NUM_PREFIX + config.num_patches - 1
        if not NUM_PREFIX <= prompt.shape[1] <= longest:
            raise ValueError(
                f"A prompt holds 2 to {longest} ids ([class, merge instruction, codes...]), got {prompt.shape[1]}."
            )
        is_class = (prompt[:, 0] >= codebook) & (prompt[:, 0] < merge_base)
        is_merge = (prompt[:, 1] > merge_base) & (prompt[:, 1] <= merge_base + config.num_patches)
        is_code = (prompt[:, NUM_PREFIX:] >= 0) & (prompt[:, NUM_PREFIX:] < codebook)
        if not (is_class.all() and is_merge.all() and is_code.all()):
            raise ValueError(
                f"A prompt must be [class id in [{codebook}, {merge_base - 1}], merge-instruction id in "
                f"[{merge_base + 1}, {merge_base + config.num_patches}], image codes in [0, {codebook})...]; got "
                f"{prompt[:2].tolist()}{' ...' if len(prompt) > 2 else ''}. build_prompt(class_labels, num_tokens) "
                "makes one."
            )
        return prompt.to(device=self.device, dtype=torch.long)

    @staticmethod
    def _resolve_guidance(config) -> float | None:
        # transformers' `guidance_scale` would run its unbatched CFG with a one-token negative prompt: take it over.
        guidance_scale = config.guidance_scale
        config.guidance_scale = 1.0  # 1.0, not None: None would be refilled from model.generation_config
        return check_guidance_scale(guidance_scale)

    @staticmethod
    def _check_generation_config(config) -> None:
        # None leaves a filter off, as in transformers (an unset temperature is 1).
        temperature = 1.0 if config.temperature is None else config.temperature
        check_sampling_arguments(temperature, config.top_k, config.top_p)
        punishing = {
            "repetition_penalty": config.repetition_penalty not in (None, 1.0),
            "encoder_repetition_penalty": config.encoder_repetition_penalty not in (None, 1.0),
            "no_repeat_ngram_size": bool(config.no_repeat_ngram_size),
            "encoder_no_repeat_ngram_size": bool(config.encoder_no_repeat_ngram_size),
        }
        if any(punishing.values()):
            raise ValueError(
                f"{[name for name, on in punishing.items() if on]} punish repeated tokens, but a MergeAR sequence "
                "must repeat each merged code over its region (that is the merge instruction); unset them."
            )

    def _set_length(self, config, prompt_length: int, length_given: bool) -> None:
        # Generate up to the end of the grid unless a length was asked for; the generation config then carries
        # `max_new_tokens` only (with `max_length` too, transformers would warn about two lengths).
        remaining = NUM_PREFIX + self.config.num_patches - prompt_length
        new_tokens = remaining
        if length_given:
            new_tokens = config.max_new_tokens
            if new_tokens is None:
                new_tokens = config.max_length - prompt_length
        if not 1 <= new_tokens <= remaining:
            raise ValueError(
                f"This prompt leaves {remaining} tokens to generate (L = {self.config.num_patches}), but the "
                f"generation config asks for {new_tokens} new tokens."
            )
        config.max_new_tokens, config.max_length = new_tokens, None

    def image_tokens_from_sequences(self, sequences) -> torch.LongTensor:
        """``[N, 2 + L]`` generated sequences (or a generate output) -> ``[N, L]`` raster codes."""
        sequences = getattr(sequences, "sequences", sequences)
        expected = NUM_PREFIX + self.config.num_patches
        if sequences.dim() != 2 or sequences.shape[1] != expected:
            raise ValueError(f"Expected sequences of shape [N, {expected}], got {tuple(sequences.shape)}.")
        codes = sequences[:, NUM_PREFIX:]
        if ((codes < 0) | (codes >= self.config.codebook_size)).any():
            raise ValueError("The generated part of the sequences contains ids that are not image codes.")
        return codes


MergeARConfig.register_for_auto_class()
MergeARForCausalLM.register_for_auto_class("AutoModelForCausalLM")


def register_mergear_auto_classes() -> None:
    """Register MergeAR with AutoConfig / AutoModel / AutoModelForCausalLM (idempotent)."""
    AutoConfig.register("mergear", MergeARConfig, exist_ok=True)
    AutoModel.register(MergeARConfig, MergeARModel, exist_ok=True)
    AutoModelForCausalLM.register(MergeARConfig, MergeARForCausalLM, exist_ok=True)


__all__ = [
    "MergeARCausalLMOutput",
    "MergeARForCausalLM",
    "MergeARModel",
    "MergeARPreTrainedModel",
    "build_sparsity_mask",
    "register_mergear_auto_classes",
]
