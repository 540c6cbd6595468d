"""MergeAR: class-conditional raster generation of MergeVQ tokens with a repeat-evicting KV cache.

A sequence is ``[class token, merge-instruction token(K)] + y[0..L-1]``: ``y`` is the tokenizer's ``L``-token raster
grid in which every position carries the code of its merged parent, so only about ``K`` codes are distinct. The
backbone is Llama-style (pre-norm RMSNorm, SwiGLU, SDPA) with a 2-D rotary embedding over each image token's
(row, column). A repeated code is visible as context only within ``W`` steps of its position (first occurrences
and the prompt stay visible): a boolean mask in training, :class:`MergeARCache` eviction at inference.

This mask rule is this project's reading of the paper's garbled Eq. 12 (method-spec §3.3), not released code.

Vocabulary seen by ``generate`` (``V = 2**codebook_bits``, ``C = num_classes``): image codes are ids ``[0, V)``;
class ``c`` is id ``V + c`` (``V + C`` is the null class); merge instruction ``K`` is id ``V + C + 1 + K``. The
logits only cover the ``V`` image codes, so prompt ids are never sampled.
"""

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from transformers import AutoConfig, AutoModel, AutoModelForCausalLM, GenerationMixin, PreTrainedModel
from transformers import initialization as init
from transformers.cache_utils import Cache, DynamicCache
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.modeling_outputs import BaseModelOutputWithPast, CausalLMOutputWithPast
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
from transformers.utils import can_return_tuple

from .cache_mergear import MergeARCache, build_sparsity_mask
from .configuration_mergear import MergeARConfig
from .quantization_lfq import split_indices

NUM_PREFIX = 2  # class token + merge-instruction token
# transformers 5.24 renamed the output field `past_key_values` to `cache`; support both releases.
_CACHE_FIELD = "cache" if "cache" in CausalLMOutputWithPast.__dataclass_fields__ else "past_key_values"


@dataclass
class MergeARCausalLMOutput(CausalLMOutputWithPast):
    """``CausalLMOutputWithPast`` plus the factorised head's teacher-forced logits of the training path.

    low_logits: ``[B, L, 2**low_bits]``; high_logits: ``[B, L, 2**high_bits]``, given the true low bits.
    """

    low_logits: torch.FloatTensor | None = None
    high_logits: torch.FloatTensor | None = None


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
        attention = ALL_ATTENTION_FUNCTIONS.get_interface(self.config._attn_implementation, sdpa_attention_forward)
        output, _ = attention(self, query, key, value, attention_mask, scaling=self.scaling, dropout=0.0)
        return self.o_proj(output.reshape(batch, length, -1))


class MergeARMLP(nn.Module):
    def __init__(self, config: MergeARConfig):
        super().__init__()
        self.gate_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.up_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.down_proj = nn.Linear(config.intermediate_size, config.hidden_size, bias=False)
        self.dropout = nn.Dropout(config.ffn_dropout)

    def forward(self, x):
        return self.down_proj(self.dropout(F.silu(self.gate_proj(x)) * self.up_proj(x)))


class MergeARDecoderLayer(nn.Module):
    def __init__(self, config: MergeARConfig, layer_idx: int):
        super().__init__()
        self.input_layernorm = nn.RMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.self_attn = MergeARAttention(config, layer_idx)
        self.post_attention_layernorm = nn.RMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.mlp = MergeARMLP(config)
        self.resid_dropout = nn.Dropout(config.resid_dropout)

    def forward(self, hidden_states, rotary=None, attention_mask=None, cache=None):
        attended = self.self_attn(self.input_layernorm(hidden_states), rotary, attention_mask, cache)
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

    def joint_log_probs(self, hidden_states):
        """``[..., d]`` -> ``[..., 2**codebook_bits]``: ``log p(lo) + log p(hi | lo)`` at code ``(hi << lo_bits) | lo``.

        Exact: slot 0 runs once, then slot 1 runs for all ``2**low_bits`` low values against its cached K/V.
        """
        lead, width = hidden_states.shape[:-1], hidden_states.shape[-1]
        cache = DynamicCache()
        first = self._run(hidden_states.reshape(-1, 1, width), cache)
        low_log_probs = self.low_head(first[:, 0]).float().log_softmax(-1)  # [N, M]
        count, num_low = low_log_probs.shape
        cache.batch_repeat_interleave(num_low)
        lows = self.embed_low.weight.repeat(count, 1)[:, None]  # row n * M + l holds low value l
        second = self._run(lows, cache)
        high_log_probs = self.high_head(second[:, 0]).float().log_softmax(-1).view(count, num_low, -1)
        joint = low_log_probs[:, :, None] + high_log_probs  # [N, lo, hi]
        return joint.transpose(1, 2).reshape(*lead, -1)  # flat index hi * 2**low_bits + lo


class MergeARPreTrainedModel(PreTrainedModel):
    config: MergeARConfig
    config_class = MergeARConfig
    base_model_prefix = "model"
    main_input_name = "input_ids"
    _no_split_modules = ["MergeARDecoderLayer"]
    _supports_sdpa = True

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
    """The MergeAR backbone: prompt/image embeddings, decoder layers and final norm (no output head)."""

    def __init__(self, config: MergeARConfig):
        super().__init__(config)
        self.embed_image = MergeARImageEmbedding(config)
        self.embed_class = nn.Embedding(config.num_classes + 1, config.hidden_size)  # + null class
        self.embed_merge = nn.Embedding(config.num_image_tokens + 1, config.hidden_size)  # indexed by K itself
        self.token_dropout = nn.Dropout(config.token_dropout)
        self.layers = nn.ModuleList(MergeARDecoderLayer(config, i) for i in range(config.num_hidden_layers))
        self.norm = nn.RMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.post_init()

    def _check_input_ids(self, input_ids):
        config = self.config
        merge_base = config.codebook_size + config.num_classes + 1
        end = merge_base + config.num_image_tokens + 1
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
        class_ids = (input_ids - codebook).clamp(0, classes)
        if self.training and self.config.class_dropout_prob > 0:
            # Label dropout: train the null class, which classifier-free guidance uses as the unconditional branch.
            dropped = torch.rand(class_ids.shape, device=class_ids.device) < self.config.class_dropout_prob
            class_ids = class_ids.masked_fill(dropped, classes)
        image = self.embed_image(input_ids.clamp(0, codebook - 1))
        prompt = torch.where(
            is_class[..., None],
            self.embed_class(class_ids),
            self.embed_merge((input_ids - codebook - classes - 1).clamp(0, self.config.num_image_tokens)),
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

    @can_return_tuple
    def forward(
        self,
        input_ids: torch.LongTensor,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        cache: Cache | None = None,
        use_cache: bool | None = None,
        past_key_values: Cache | None = None,
    ) -> BaseModelOutputWithPast:
        r"""
        input_ids: ``[B, q]`` prompt ids and/or image codes (see the module docstring for the id layout).
        attention_mask: all-ones 2-D (padding is not supported) or an explicit boolean ``[B, 1, q, kv]`` mask.
        position_ids: sequence indices (``arange`` after the tokens already in the cache by default).
        cache / past_key_values: a ``MergeARCache`` (MergeAR eviction) or any other ``Cache`` (keeps every
            token: raster-AR baseline on the same weights). Without a cache the sparsity mask is applied directly.
        use_cache: build a ``MergeARCache`` when no cache is given (default: ``config.use_cache`` in eval mode).
        """
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
                "generate call and keep cfg_scale the same for all steps."
            )
        if position_ids is None:
            position_ids = torch.arange(past, past + input_ids.shape[1], device=input_ids.device)[None]
        if int(position_ids.max()) > NUM_PREFIX + self.config.num_image_tokens - 1:
            raise ValueError(
                f"Sequence longer than the prompt + L = {NUM_PREFIX + self.config.num_image_tokens} tokens."
            )
        mask = self._attention_mask(input_ids, attention_mask, cache, past)
        hidden_states = self.token_dropout(self.embed(input_ids))
        rotary = rotary_2d(position_ids.expand(input_ids.shape[0], -1), self.config, hidden_states.dtype)
        for layer in self.layers:
            hidden_states = layer(hidden_states, rotary, mask, cache)
        return BaseModelOutputWithPast(last_hidden_state=self.norm(hidden_states), **{_CACHE_FIELD: cache})


def _cache_rows(cache) -> int | None:
    # Batch rows a filled cache holds (None when it cannot tell), to reject a mismatched batch early.
    keys = getattr(cache.layers[0], "keys", None) if cache is not None and cache.layers else None
    return keys.shape[0] if isinstance(keys, torch.Tensor) and keys.dim() == 4 else None


class MergeARForCausalLM(MergeARPreTrainedModel, GenerationMixin):
    """MergeAR generator: backbone + output head (factorised for large codebooks, dense up to 14 bits).

    Logits cover all ``V`` image codes. With the factorised head they are the exact joint log-probabilities
    ``log p(lo) + log p(hi | lo)``, computed by running the head for every low value (one batched pass), so
    greedy, sampling, temperature, top-k, top-p and guidance all act on the joint distribution of a code, not per
    sub-token as in Open-MAGVIT2. With a dense head they are the head's plain output. Training returns
    ``CE(lo) + CE(hi | true lo)`` and the two teacher-forced logit tensors.

    Generation::

        sequences = model.generate(class_labels=[3, 7], num_tokens=144, do_sample=True, top_k=100, cfg_scale=2.0)
        codes = model.image_tokens_from_sequences(sequences)  # [N, L] raster codes for the tokenizer's decoder
    """

    def __init__(self, config: MergeARConfig):
        super().__init__(config)
        self.model = MergeARModel(config)
        if config.factorized_bits is None:
            self.lm_head = nn.Linear(config.hidden_size, config.codebook_size, bias=False)
            self.lm_head.zero_init = True  # as LlamaGen: start from uniform predictions
        else:
            self.lm_head = MergeARFactorizedHead(config)
        self.post_init()

    def build_prompt(self, class_labels, num_tokens=None) -> torch.LongTensor:
        """``[B, 2]`` prompt ids ``[V + class, V + C + 1 + K]``; ``num_tokens`` is an int or ``[B]`` (default K)."""
        config = self.config
        labels = torch.as_tensor(class_labels, dtype=torch.long, device=self.device).reshape(-1)
        if labels.numel() == 0 or ((labels < 0) | (labels > config.num_classes)).any():
            raise ValueError(
                f"class_labels must be class ids in [0, {config.num_classes}] ({config.num_classes} = null class), "
                f"got {labels.tolist()}."
            )
        if num_tokens is None:
            num_tokens = config.default_num_tokens
        counts = torch.as_tensor(num_tokens, dtype=torch.long, device=self.device).reshape(-1)
        if counts.numel() not in (1, labels.numel()):
            raise ValueError(f"num_tokens must be an int or one value per class label, got {counts.numel()} values.")
        if ((counts < 1) | (counts > config.num_image_tokens)).any():
            raise ValueError(f"num_tokens (K) must be in [1, L = {config.num_image_tokens}], got {counts.tolist()}.")
        merge_ids = config.codebook_size + config.num_classes + 1 + counts.expand(labels.numel())
        return torch.stack([config.codebook_size + labels, merge_ids], dim=1)

    def logits(self, hidden_states):
        """``[..., d]`` final states -> ``[..., V]`` logits (joint log-probabilities with the factorised head)."""
        if isinstance(self.lm_head, MergeARFactorizedHead):
            return self.lm_head.joint_log_probs(hidden_states)
        return self.lm_head(hidden_states)

    def _loss(self, hidden_states, labels):
        smoothing = self.config.label_smoothing
        if isinstance(self.lm_head, nn.Linear):
            logits = self.lm_head(hidden_states)
            return F.cross_entropy(logits.flatten(0, 1).float(), labels.flatten(), label_smoothing=smoothing), logits
        low, high = split_indices(labels, self.lm_head.low_bits)
        low_logits, high_logits = self.lm_head(hidden_states, low)
        loss = F.cross_entropy(low_logits.flatten(0, 1).float(), low.flatten(), label_smoothing=smoothing)
        loss = loss + F.cross_entropy(high_logits.flatten(0, 1).float(), high.flatten(), label_smoothing=smoothing)
        return loss, (low_logits, high_logits)

    def _check_labels(self, labels, batch):
        length, codebook = self.config.num_image_tokens, self.config.codebook_size
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
        cfg_scale: float | None = None,
        logits_to_keep: int | torch.Tensor = 0,
        past_key_values: Cache | None = None,
    ) -> MergeARCausalLMOutput:
        r"""
        Two entries:

        * training / scoring: ``class_labels`` ``[B]``, ``num_tokens`` (int or ``[B]``) and ``labels`` ``[B, L]``
          raster codes (each position carries its merged parent's code). Runs ``[cls, M(K)] + labels[:, :-1]``
          under the sparsity mask and returns ``loss`` (mean ``CE(lo) + CE(hi | lo)``, or ``CE`` for a dense head)
          plus ``low_logits``/``high_logits`` (factorised) or ``logits`` (dense) for the L positions.
        * generation: ``input_ids`` (prompt and/or codes) with an optional cache; returns ``logits`` ``[B, k, V]``
          for the last ``logits_to_keep`` positions (0 = all).

        cfg_scale: classifier-free guidance in one batched forward: rows ``[cond; uncond]`` (class token swapped
            for the null class) run as ``2B`` rows, the cache holds ``2B`` rows, and the returned logits are
            ``u + s * (c - u)`` for the ``B`` rows. Keep the same value for every step of a generation.
        """
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
            if cfg_scale is not None:
                raise ValueError("cfg_scale is an inference option; it cannot be combined with labels.")
            self._check_labels(labels, input_ids.shape[0])
            sequence = torch.cat([input_ids, labels[:, :-1]], dim=1)
            hidden_states = self.model(sequence, use_cache=False).last_hidden_state[:, NUM_PREFIX - 1 :]
            loss, logits = self._loss(hidden_states, labels)
            if isinstance(logits, tuple):
                return MergeARCausalLMOutput(loss=loss, low_logits=logits[0], high_logits=logits[1])
            return MergeARCausalLMOutput(loss=loss, logits=logits)

        guided = cfg_scale is not None and cfg_scale != 1.0
        batch = input_ids.shape[0]
        if guided:
            input_ids, attention_mask, position_ids = self._guidance_batch(
                input_ids, attention_mask, position_ids, cache
            )
        outputs = self.model(input_ids, attention_mask, position_ids, cache=cache, use_cache=use_cache)
        hidden_states = outputs.last_hidden_state
        if isinstance(logits_to_keep, int):
            hidden_states = hidden_states[:, -logits_to_keep:]
        else:
            hidden_states = hidden_states[:, logits_to_keep]
        logits = self.logits(hidden_states)
        if guided:
            cond, uncond = logits[:batch], logits[batch:]
            logits = uncond + cfg_scale * (cond - uncond)
        return MergeARCausalLMOutput(logits=logits, **{_CACHE_FIELD: getattr(outputs, _CACHE_FIELD)})

    def _guidance_batch(self, input_ids, attention_mask, position_ids, cache):
        codebook, null_id = self.config.codebook_size, self.config.codebook_size + self.config.num_classes
        is_class = (input_ids >= codebook) & (input_ids <= null_id)
        starting = cache is None or cache.get_seq_length() == 0
        if starting and not is_class.any(1).all():
            raise ValueError("cfg_scale needs a class token in every prompt to swap for the null class.")
        if isinstance(cache, MergeARCache):
            cache.cfg = True  # row operations must then move both halves together
        uncond = input_ids.masked_fill(is_class, null_id)
        input_ids = torch.cat([input_ids, uncond])
        if attention_mask is not None:
            attention_mask = torch.cat([attention_mask, attention_mask])
        if position_ids is not None and position_ids.shape[0] > 1:
            position_ids = torch.cat([position_ids, position_ids])
        return input_ids, attention_mask, position_ids

    def generate(
        self, inputs=None, generation_config=None, class_labels=None, num_tokens=None, cfg_scale=None, **kwargs
    ):
        r"""``GenerationMixin.generate`` with a class-conditional entry and a fresh ``MergeARCache`` by default.

        class_labels: ``[B]`` ids (or a list); the prompt ``[cls, M(K)]`` is built for you.
        num_tokens: ``K`` (int or ``[B]``, default ``config.default_num_tokens``).
        cfg_scale: batched classifier-free guidance scale (None or 1 = off).

        ``max_new_tokens`` and ``min_new_tokens`` default to the tokens left to fill the ``L`` grid. Pass
        ``cache=DynamicCache()`` (or ``MergeARCache(config, compress=False)``) for the raster-AR baseline. Returns
        what ``generate`` returns (sequences ``[N, 2 + L]`` with the prompt); see
        :meth:`image_tokens_from_sequences`.
        """
        if class_labels is not None:
            if inputs is not None or kwargs.get("input_ids") is not None:
                raise ValueError("Pass either class_labels or a prompt in inputs/input_ids, not both.")
            inputs = self.build_prompt(class_labels, num_tokens)
        elif num_tokens is not None:
            raise ValueError("num_tokens needs class_labels (a prompt in input_ids already encodes K).")
        prompt = inputs if inputs is not None else kwargs.get("input_ids")
        if prompt is None:
            raise ValueError("generate needs class_labels (or a prompt [[V + class, V + C + 1 + K]] as input_ids).")
        if cfg_scale is not None:
            kwargs["cfg_scale"] = cfg_scale
        remaining = NUM_PREFIX + self.config.num_image_tokens - prompt.shape[1]
        kwargs.setdefault("max_new_tokens", remaining)
        kwargs.setdefault("min_new_tokens", remaining)
        use_cache = kwargs.get("use_cache", generation_config.use_cache if generation_config is not None else True)
        if use_cache and kwargs.get("cache") is None and kwargs.get("past_key_values") is None:
            kwargs["cache"] = MergeARCache(self.config)
        return super().generate(inputs, generation_config, **kwargs)

    def image_tokens_from_sequences(self, sequences) -> torch.LongTensor:
        """``[N, 2 + L]`` generated sequences (or a generate output) -> ``[N, L]`` raster codes."""
        sequences = getattr(sequences, "sequences", sequences)
        expected = NUM_PREFIX + self.config.num_image_tokens
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
