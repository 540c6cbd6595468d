"""MergeAR's decoding machinery: per-sub-token sampling, the token budget, the repeat gate and the GC pause of ``generate``.

* :class:`MergeARSampler` is the decoding loop that ``MergeARForCausalLM.generate`` hands to transformers through
  ``generate(custom_generate=...)``, so everything ``generate`` prepares (generation config, logits processors,
  stopping criteria, streamer, cache, expanded batch) still applies. With a factorised head it samples a code the way
  the official MergeVQ stage-2 sampler (carried over from Open-MAGVIT2) does for the paper's AR models (§4.1): the low
  bits from slot 0 of the head, then the high bits from slot 1 given the sampled low bits. Guidance and the processors (temperature, top-k, top-p) act on each
  sub-token's own distribution. The head runs twice per step instead of ``2**low_bits + 1`` times for the exact joint.
* :class:`TokenBudget` makes the merge instruction ``K`` a hard limit: once a row holds ``K`` distinct codes it may
  only repeat codes it already produced. :class:`TokenBudgetLogitsProcessor` applies it to full-code scores.
* :func:`count_tokens_left` counts, at every position, how many new codes the merge instruction still allows (the input
  of ``MergeARConfig.tokens_left_embedding``); :func:`held_codes` and :func:`draw_repeats` serve the repeat gate
  (``MergeARConfig.repeat_gate``), whose restrictions are :class:`TokenBudget`'s.
* :func:`paused_gc` switches Python's cyclic garbage collector off for the length of a generation: the decode loop
  allocates many short-lived objects, and collections triggered by them cost time without freeing anything useful.
"""

import gc
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from transformers import LogitsProcessor
from transformers.generation.utils import GenerateDecoderOnlyOutput

from .cache_mergear import first_occurrence
from .quantization_lfq import merge_indices, split_indices
from .sampling_utils import check_generators, sample_rows, scheduled_guidance

SAMPLING_MODES = ("sub_token", "joint")
PROMPT_LENGTH = 2  # class token + merge-instruction token
# transformers 5.24 renamed the output field `past_key_values` to `cache`; support both releases.
_CACHE_FIELD = "cache" if "cache" in GenerateDecoderOnlyOutput.__dataclass_fields__ else "past_key_values"


@contextmanager
def paused_gc():
    """Disable the cyclic GC for the block if it is enabled, and enable it again afterwards, also on an exception."""
    was_enabled = gc.isenabled()
    if was_enabled:
        gc.disable()
    try:
        yield
    finally:
        if was_enabled:
            gc.enable()


def distinct_counts(codes: torch.Tensor) -> torch.Tensor:
    """``[B, t]`` codes -> ``[B]`` number of different codes in each row."""
    if codes.shape[1] == 0:
        return codes.new_zeros(codes.shape[0])
    ordered = codes.sort(dim=1).values
    return 1 + (ordered[:, 1:] != ordered[:, :-1]).sum(1)


def count_tokens_left(input_ids: torch.Tensor, config) -> torch.Tensor:
    """``[B, 2 + t]`` sequences ``[class, merge instruction(K), codes...]`` -> ``[B, 2 + t]``: K minus the distinct
    codes up to and including each position, at least 0 (K itself at the two prompt positions)."""
    merge_base = config.codebook_size + config.num_classes + 1
    num_tokens = input_ids[:, 1:2] - merge_base
    left = (num_tokens - first_occurrence(input_ids[:, PROMPT_LENGTH:]).cumsum(1)).clamp(min=0)
    return torch.cat([num_tokens.expand(-1, PROMPT_LENGTH), left], dim=1)


def value_mask(values: torch.Tensor, size: int, keep: torch.Tensor | None = None) -> torch.Tensor:
    """``[B, n]`` values in ``[0, size)`` -> ``[B, size]`` bool, True at every value of the row (only where ``keep``)."""
    if keep is not None:  # unkept entries land in an extra column that is dropped
        values = torch.where(keep, values, size)
    mask = torch.zeros(values.shape[0], size + 1, dtype=torch.bool, device=values.device)
    return mask.scatter_(1, values, True)[:, :size]


def held_codes(input_ids: torch.Tensor, codebook_size: int) -> torch.Tensor:
    """``[B, 2 + t]`` sequences -> ``[B, V]`` bool: True at every code the row holds (``MergeARConfig.repeat_gate``)."""
    return value_mask(input_ids[:, PROMPT_LENGTH:], codebook_size)


def draw_repeats(gate_logits: torch.Tensor, do_sample: bool, generators=None) -> torch.Tensor:
    """``[B]`` repeat-gate logits -> ``[B]`` bool, True where the row repeats a held code (greedy: logit > 0)."""
    if not do_sample:
        return gate_logits > 0
    probs = torch.stack([torch.sigmoid(-gate_logits), torch.sigmoid(gate_logits)], dim=1)
    if generators is not None:
        return sample_rows(probs, generators).bool()
    return torch.multinomial(probs, 1)[:, 0].bool()


class TokenBudget:
    """The merge instruction as a hard limit: a row holding ``K`` distinct codes may only repeat one of them.

    Rows are ``[class, merge instruction(K), codes...]``; ``K`` is read from each row's own prompt, so rows with
    different ``K`` (and beams) are handled alike. The restrictions set the scores of forbidden codes to ``-inf``.
    They run before temperature / top-k / top-p, so those filters choose among the allowed codes only.
    """

    def __init__(self, config):
        self.codebook_size = config.codebook_size
        self.merge_base = config.codebook_size + config.num_classes + 1
        self.low_bits = config.factorized_bits[0] if config.factorized_bits is not None else None

    def held(self, input_ids):
        """``[B, 2 + t]`` sequences -> (``[B, t]`` codes produced so far, ``[B]`` whether the row holds K codes)."""
        codes = input_ids[:, PROMPT_LENGTH:]
        return codes, distinct_counts(codes) >= input_ids[:, 1] - self.merge_base

    def restrict_codes(self, held, scores):
        """``[B, V]`` full-code scores (dense head or exact joint) -> scores with forbidden codes at ``-inf``."""
        codes, full = held
        forbidden = full[:, None] & ~value_mask(codes, self.codebook_size)
        return scores.masked_fill(forbidden, float("-inf"))

    def restrict_low(self, held, scores):
        """``[B, 2**low_bits]`` scores: a full row may only pick the low bits of a code it holds."""
        codes, full = held
        low, _ = split_indices(codes, self.low_bits)
        forbidden = full[:, None] & ~value_mask(low, scores.shape[1])
        return scores.masked_fill(forbidden, float("-inf"))

    def restrict_high(self, held, scores, low):
        """``[B, 2**high_bits]`` scores: given the chosen ``[B]`` low bits, only a held code's high bits."""
        codes, full = held
        held_low, held_high = split_indices(codes, self.low_bits)
        forbidden = full[:, None] & ~value_mask(held_high, scores.shape[1], held_low == low[:, None])
        return scores.masked_fill(forbidden, float("-inf"))

    # The repeat gate's other branch: rows that start a new code may not pick one they hold.
    def exclude_codes(self, held, scores):
        """``[B, V]`` full-code scores -> scores with the held codes of the ``held`` rows at ``-inf``."""
        codes, rows = held
        return scores.masked_fill(rows[:, None] & value_mask(codes, self.codebook_size), float("-inf"))

    def exclude_high(self, held, scores, low):
        """``[B, 2**high_bits]`` scores: given the chosen low bits, no high bits that complete a held code (unless
        every value does: that row then repeats)."""
        codes, rows = held
        held_low, held_high = split_indices(codes, self.low_bits)
        taken = value_mask(held_high, scores.shape[1], held_low == low[:, None])
        rows = rows & ~taken.all(1)
        return scores.masked_fill(rows[:, None] & taken, float("-inf"))


class TokenBudgetLogitsProcessor(LogitsProcessor):
    """:class:`TokenBudget` on full-code scores, for transformers' own loops (joint sampling, greedy, beam search)."""

    def __init__(self, config):
        self.budget = TokenBudget(config)

    def __call__(self, input_ids, scores):
        return self.budget.restrict_codes(self.budget.held(input_ids), scores)


@dataclass
class MergeARSubTokenOutput(GenerateDecoderOnlyOutput):
    """``generate`` output of per-sub-token sampling (``return_dict_in_generate=True``).

    ``scores`` / ``logits`` stay None: a step has no full-code distribution. Instead, one entry per generated token:
    low_scores: ``[B, 2**low_bits]`` processed scores of the low bits (after guidance, budget and processors).
    high_scores: ``[B, 2**high_bits]`` processed scores of the high bits, given the sampled low bits.
    low_logits, high_logits: the same before processing (guided when ``guidance_scale`` is set), with ``output_logits``.
    """

    low_scores: tuple[torch.FloatTensor, ...] | None = None
    high_scores: tuple[torch.FloatTensor, ...] | None = None
    low_logits: tuple[torch.FloatTensor, ...] | None = None
    high_logits: tuple[torch.FloatTensor, ...] | None = None


class MergeARSampler:
    """MergeAR's decoding loop for ``generate(custom_generate=MergeARSampler(...))`` (greedy or sampling, one beam).

    Each step runs the backbone once on the new token (``[cond; uncond]`` rows with ``guidance_scale``; the scale of
    the step follows ``guidance_schedule``), then:

    * ``"sub_token"`` (factorised head): slot 0 -> low logits -> guidance ``u + s (c - u)`` -> budget -> the
      generation config's processors and warpers -> pick the low bits; slot 1 with the picked low bits' embedding ->
      high logits -> the same -> pick the high bits; the code is ``(high << low_bits) | low``. Top-k / top-p therefore
      keep the k most likely (or the p-mass of) low values, then of high values given the low value: per sub-token,
      not over the joint distribution of codes.
    * ``"joint"``: the model's full-code logits (the exact joint for a factorised head) -> guidance -> budget ->
      processors -> pick.

    "Pick" draws from the softmax when ``do_sample`` (one ``generators[i]`` per row when given), else takes the
    arg-max. Stopping criteria run after each step and may rewrite the newest token in place (the next step reads it).

    With ``config.repeat_gate`` a step first draws the gate (its logit guided like the codes'; greedy: logit > 0);
    a row that repeats is then restricted as a full budget row is, one that starts a new code may not pick a held
    code (its high bits exclude those that complete one). Without that the step is as above.
    """

    def __init__(self, sampling: str = "sub_token", token_budget: bool = False, generators=None):
        if sampling not in SAMPLING_MODES:
            raise ValueError(f"sampling must be one of {SAMPLING_MODES}, got {sampling!r}")
        self.sampling = sampling
        self.token_budget = token_budget
        self.generators = generators

    def __call__(
        self, model, input_ids, logits_processor, stopping_criteria, generation_config, synced_gpus=False,
        streamer=None, **model_kwargs,
    ):
        config = generation_config
        if config.return_dict_in_generate and (config.output_attentions or config.output_hidden_states):
            raise ValueError(
                "MergeAR's own decoding loop does not collect attentions or hidden states; pass sampling='joint' "
                "(without generators) to use transformers' loop for them."
            )
        mask = model_kwargs.get("attention_mask")
        if mask is not None and not bool(mask.all()):
            raise ValueError(
                "MergeAR prompts all have the same length: padding (zeros in attention_mask) is not supported."
            )
        if self.generators is not None:
            check_generators(self.generators, input_ids.shape[0])
        cache = model_kwargs.get("cache")
        guidance_scale = model_kwargs.get("batched_guidance_scale")
        guidance_schedule = model_kwargs.get("batched_guidance_schedule", "constant")
        guided = guidance_scale is not None and guidance_scale != 1.0
        budget = TokenBudget(model.config) if self.token_budget else None
        record_scores = config.return_dict_in_generate and config.output_scores
        record_logits = config.return_dict_in_generate and config.output_logits
        recorded = {name: [] for name in ("scores", "logits", "low_scores", "high_scores", "low_logits", "high_logits")}

        def guide(logits):
            logits = logits.float()
            if not guided:
                return logits
            cond, uncond = logits.chunk(2)
            step = input_ids.shape[1] - PROMPT_LENGTH  # the grid position being generated
            scale = scheduled_guidance(guidance_scale, guidance_schedule, step, model.config.num_patches)
            return uncond + scale * (cond - uncond)

        def pick(scores):
            if not config.do_sample:
                return scores.argmax(-1)
            probs = scores.softmax(-1)
            if self.generators is not None:
                return sample_rows(probs, self.generators)
            return torch.multinomial(probs, 1)[:, 0]

        gated = model.config.repeat_gate
        restrictions = TokenBudget(model.config)
        # Set in the loop: (codes so far, rows that may only repeat one) when the budget binds or the gate chose to
        # repeat, and (codes so far, rows that may not repeat one) when the gate chose a new code.
        held = new = None

        def process(name, logits, restrict):
            logits = guide(logits)
            scores = logits if held is None and new is None else restrict(logits)
            scores = logits_processor(input_ids, scores)
            if record_scores:
                recorded[name + "scores"].append(scores)
            if record_logits:
                recorded[name + "logits"].append(logits)
            return scores

        unfinished = torch.ones(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)
        while True:
            step_ids = input_ids if cache is None else input_ids[:, cache.get_seq_length() :]
            step_left = None
            if model.config.tokens_left_embedding:
                step_left = count_tokens_left(input_ids, model.config)[:, -step_ids.shape[1] :]
            if guided:
                step_ids = model._guidance_batch(step_ids, None, None, cache)[0]
                step_left = None if step_left is None else step_left.repeat(2, 1)
            hidden = model.model(step_ids, cache=cache, use_cache=False, tokens_left=step_left).last_hidden_state[:, -1]
            held = budget.held(input_ids) if budget is not None else None
            if held is not None and not bool(held[1].any()):
                held = None  # no row holds K codes yet
            if gated and input_ids.shape[1] > PROMPT_LENGTH:
                so_far = input_ids[:, PROMPT_LENGTH:]
                repeat = draw_repeats(guide(model.repeat_gate(hidden))[:, 0], config.do_sample, self.generators)
                if held is not None:
                    repeat |= held[1]
                held, new = (so_far, repeat), (so_far, ~repeat)
            if self.sampling == "joint":
                def restrict_codes(scores):
                    if held is not None:
                        scores = restrictions.restrict_codes(held, scores)
                    return scores if new is None else restrictions.exclude_codes(new, scores)

                scores = process("", model.logits(hidden), restrict_codes)
                codes = pick(scores)
            else:
                def restrict_high(scores):
                    if held is not None:
                        scores = restrictions.restrict_high(held, scores, low)
                    return scores if new is None else restrictions.exclude_high(new, scores, low)

                head = model.lm_head
                low_logits, head_cache = head.predict_low(hidden)
                low = pick(process("low_", low_logits, lambda s: s if held is None else restrictions.restrict_low(held, s)))
                high_logits = head.predict_high(low.repeat(2) if guided else low, head_cache)
                scores = process("high_", high_logits, restrict_high)
                codes = merge_indices(low, pick(scores), head.low_bits)
            input_ids = torch.cat([input_ids, codes[:, None]], dim=1)
            unfinished &= ~stopping_criteria(input_ids, scores)
            if streamer is not None:
                streamer.put(input_ids[:, -1].cpu())
            if not bool(unfinished.any()):
                break
        if streamer is not None:
            streamer.end()
        if not config.return_dict_in_generate:
            return input_ids
        as_tuple = {name: tuple(values) if values else None for name, values in recorded.items()}
        if self.sampling == "joint":
            return GenerateDecoderOnlyOutput(
                sequences=input_ids, scores=as_tuple["scores"], logits=as_tuple["logits"], **{_CACHE_FIELD: cache}
            )
        return MergeARSubTokenOutput(
            sequences=input_ids, low_scores=as_tuple["low_scores"], high_scores=as_tuple["high_scores"],
            low_logits=as_tuple["low_logits"], high_logits=as_tuple["high_logits"], **{_CACHE_FIELD: cache},
        )


__all__ = [
    "MergeARSampler",
    "MergeARSubTokenOutput",
    "SAMPLING_MODES",
    "TokenBudget",
    "TokenBudgetLogitsProcessor",
    "count_tokens_left",
    "distinct_counts",
    "draw_repeats",
    "held_codes",
    "paused_gc",
]
