"""MergeRandAR: random-order generation of MergeVQ's K merged tokens with position instructions (docs/design.md §3.4).

The paper's best generator (Table 3) produces the K merged tokens of an image in random order, RandAR style, and
decodes them after the tokenizer's learned source recovery has predicted the merge map. This module is that path,
built from MergeAR's blocks (decoder layers, 2-D RoPE, factorised image embedding, class token with a null class for
guidance) and its code head, logits, loss and argument checks (``MergeARGeneratorMixin``, ``sampling_utils``); only
the sequence layout, the position head and the decoding loop are new.

Sequence (teacher forcing)::

    [cls, M(K), P(p_1), y_1, P(p_2), y_2, ..., P(p_K), y_K]

* ``p_n`` is a merged token's position: its group's first (raster-minimum) grid position, as the tokenizer orders its
  tokens (docs/design.md §3.4). Training permutes the K (code, position) pairs randomly per example.
* ``P(p)`` is a learned *position instruction* saying which slot comes next; the hidden state at ``P(p_n)`` predicts
  the code ``y_n``. ``P(p_n)`` and ``y_n`` both carry the 2-D RoPE of ``p_n``; the prefix carries none.
* Which positions? RandAR fills all L positions, so its order is all it samples. Here only K of the L positions
  hold a token, and that set depends on the image, so the model also predicts it: a *position head* reads the
  state at ``M(K)`` (for ``p_1``) and at ``P(p_n)`` (for ``p_{n+1}``) and is trained towards the uniform
  distribution over the positions of the image not used yet (the exact expectation of the cross-entropy over all
  random orders, so it has no sampling noise). At generation the next position is sampled from that head with
  the used positions masked out, or taken from a given order. Reading it at ``P(p_n)`` rather than at ``y_n`` lets
  one forward of the pair ``[y_n, P(p_{n+1})]`` serve a whole step: K + 1 forwards per image instead of 2K.

Ids (``V = 2**codebook_bits``, ``C = num_classes``, ``L = grid_size**2``): codes ``[0, V)``; class ``c`` is
``V + c`` (``V + C`` = null class); ``M(K)`` is ``V + C + 1 + K``; ``P(p)`` is ``V + C + L + 2 + p``.
"""

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from transformers import AutoConfig, AutoModel, TopKLogitsWarper, TopPLogitsWarper
# diffusers finds a component's loading method by looking `PreTrainedModel` up in the component's own module.
from transformers import PreTrainedModel  # noqa: F401
from transformers.cache_utils import Cache, DynamicCache
from transformers.modeling_outputs import BaseModelOutputWithPast
from transformers.utils import ModelOutput, can_return_tuple
from transformers.utils.output_capturing import capture_outputs

# diffusers' remote-code loader copies only the sibling files a component's module imports directly (one level,
# not transitively), so the siblings that modeling_mergear and configuration_randar need are named here as well.
from .cache_mergear import MergeARCache  # noqa: F401
from .checkpoint_errors import ClearCheckpointErrorsMixin  # noqa: F401
from .config_checks import check_attention_outputs
from .configuration_mergear import MergeARConfig  # noqa: F401
from .configuration_randar import MergeRandARConfig
from .generation_mergear import MergeARSampler  # noqa: F401
from .modeling_mergear import (
    NUM_PREFIX,
    MergeARGeneratorMixin,
    MergeARModel,
    MergeARPreTrainedModel,
    rotary_2d,
)
from .quantization_lfq import merge_indices
from .sampling_utils import (
    check_guidance_scale, check_guidance_schedule, check_sampling_arguments, renamed_keyword, sample_rows,
    scheduled_guidance,
)

IGNORE_INDEX = -100  # padding of `labels` / `token_positions` when a batch mixes several K


@dataclass
class MergeRandAROutput(ModelOutput):
    """
    loss: ``code_loss + position_loss_weight * position_loss`` (training entry).
    code_loss: mean ``CE(lo) + CE(hi | true lo)`` (or ``CE`` of a dense head) over the image tokens.
    position_loss: mean cross-entropy of the position head against the uniform distribution over unused positions.
    logits: generation entry: ``[B, T, V]`` code logits (joint log-probabilities with a factorised head) of the
        kept positions; training entry with a dense head: ``[N, V]`` logits of the N image tokens.
    low_logits, high_logits: training entry with a factorised head: ``[N, 2**low_bits]``, ``[N, 2**high_bits]``.
    position_logits: ``[B, T, L]`` (generation entry) or ``[B, K_max, L]`` (training entry; padded steps included).
    cache: the cache of the generation entry.
    hidden_states, attentions: the backbone's, with ``output_hidden_states`` / ``output_attentions`` (see
        :meth:`MergeRandARModel.forward`).
    """

    loss: torch.FloatTensor | None = None
    code_loss: torch.FloatTensor | None = None
    position_loss: torch.FloatTensor | None = None
    logits: torch.FloatTensor | None = None
    low_logits: torch.FloatTensor | None = None
    high_logits: torch.FloatTensor | None = None
    position_logits: torch.FloatTensor | None = None
    cache: Cache | None = None
    hidden_states: tuple[torch.FloatTensor, ...] | None = None
    attentions: tuple[torch.FloatTensor, ...] | None = None


@dataclass
class MergeRandARGenerationOutput(ModelOutput):
    """
    image_tokens: ``[B, K]`` codes in the tokenizer's canonical order (by position), ready for
        ``MergeVQModel.predict_source_map`` and ``decode``.
    positions: ``[B, K]`` their grid positions, ascending.
    generation_order: ``[B, K]`` positions in the order they were generated.
    generated_tokens: ``[B, K]`` the codes in the order they were generated.
    scores: ``[B, K, V]`` the code logits of every step, after guidance and before temperature / top-k / top-p,
        in generation order (only with ``output_scores=True`` and ``sampling="joint"``).
    low_scores, high_scores: ``[B, K, 2**low_bits]`` and ``[B, K, 2**high_bits]``: the same for the two sub-tokens
        (the high bits' given the low bits drawn at that step), with ``output_scores=True`` and
        ``sampling="sub_token"``.
    """

    image_tokens: torch.LongTensor | None = None
    positions: torch.LongTensor | None = None
    generation_order: torch.LongTensor | None = None
    generated_tokens: torch.LongTensor | None = None
    scores: torch.FloatTensor | None = None
    low_scores: torch.FloatTensor | None = None
    high_scores: torch.FloatTensor | None = None


class MergeRandARPreTrainedModel(MergeARPreTrainedModel):
    config: MergeRandARConfig
    config_class = MergeRandARConfig


class MergeRandARModel(MergeRandARPreTrainedModel, MergeARModel):
    """Backbone: MergeAR's (embeddings of codes, class and merge instruction; decoder layers; final norm) plus the
    position-instruction table, with this model's id layout and attention (no repeat eviction)."""

    def _add_prompt_embeddings(self, config: MergeRandARConfig) -> None:
        self.embed_position = nn.Embedding(config.num_patches, config.hidden_size)  # position instructions

    @property
    def merge_base(self) -> int:
        return self.config.codebook_size + self.config.num_classes + 1

    @property
    def position_base(self) -> int:
        return self.merge_base + self.config.num_patches + 1

    def embed(self, input_ids):
        """Embed a mixed sequence of codes, class, merge-instruction and position-instruction ids."""
        config = self.config
        codebook, length = config.codebook_size, config.num_patches
        embedded = self.embed_image(input_ids.clamp(0, codebook - 1))
        embedded = torch.where((input_ids >= codebook)[..., None], self.embed_class(input_ids), embedded)
        merge = self.embed_merge((input_ids - self.merge_base).clamp(0, length))
        embedded = torch.where((input_ids > self.merge_base)[..., None], merge, embedded)
        position = self.embed_position((input_ids - self.position_base).clamp(0, length - 1))
        return torch.where((input_ids >= self.position_base)[..., None], position, embedded)

    @capture_outputs
    def forward(
        self,
        input_ids,
        grid_positions,
        cache: Cache | None = None,
        *,
        output_attentions: bool | None = None,
        output_hidden_states: bool | None = None,
    ) -> BaseModelOutputWithPast:
        r"""
        input_ids: ``[B, q]`` mixed ids (module docstring). grid_positions: ``[B, q]`` grid position whose 2-D RoPE
        each token gets (use 0, i.e. no rotation, for the prefix). cache: a ``Cache`` holding the tokens before.
        output_hidden_states: also return the ``num_hidden_layers + 1`` states ``[B, q, d]`` (embeddings, then every
        layer's output, the last one after the final norm); output_attentions: every layer's attention weights
        ``[B, H, q, kv]`` (eager attention only); return_dict: ``False`` returns a tuple.
        """
        check_attention_outputs(self.config, output_attentions)
        if input_ids.dim() != 2 or grid_positions.shape != input_ids.shape:
            raise ValueError(
                f"input_ids and grid_positions must both be [batch, length], got {tuple(input_ids.shape)} and "
                f"{tuple(grid_positions.shape)}."
            )
        end = self.position_base + self.config.num_patches
        if ((input_ids < 0) | (input_ids >= end) | (input_ids == self.merge_base)).any():
            raise ValueError(f"input_ids must be valid MergeRandAR ids in [0, {end}) (see modeling_randar).")
        past = cache.get_seq_length() if cache is not None else 0
        length = input_ids.shape[1]
        mask = None  # causal SDPA: right for a whole sequence and for a single new token
        if past and length > 1:
            index = torch.arange(past + length, device=input_ids.device)
            mask = (index[past:, None] >= index[None, :])[None, None]
        hidden_states = self.token_dropout(self.embed(input_ids))
        rotary = rotary_2d(grid_positions + NUM_PREFIX, self.config, hidden_states.dtype)
        for layer in self.layers:
            hidden_states = layer(hidden_states, rotary=rotary, attention_mask=mask, cache=cache)
        return BaseModelOutputWithPast(last_hidden_state=self.norm(hidden_states))


def _sample(probs: torch.Tensor, generator) -> torch.LongTensor:
    if isinstance(generator, (list, tuple)):  # one generator per row: each image draws from its own stream
        return sample_rows(probs, generator)
    # A generator may live on another device than the model (e.g. a CPU generator with a GPU model).
    device = generator.device if generator is not None else probs.device
    return torch.multinomial(probs.to(device), 1, generator=generator)[:, 0].to(probs.device)


class MergeRandARForCausalLM(MergeARGeneratorMixin, MergeRandARPreTrainedModel):
    """Random-order generator of MergeVQ's K merged tokens (see the module docstring).

    Training (stock ``Trainer``; see ``mergevq_hf.training.trainer_randar``)::

        out = model(class_labels=[3], labels=codes_in_order[None], token_positions=positions_in_order[None])

    Generation::

        out = model.generate(class_labels=[3, 7], num_tokens=144, guidance_scale=2.0, guidance_schedule="linear")
        source_map = vq_model.predict_source_map(out.image_tokens)
        images = vq_model.decode(out.image_tokens, source_map)
    """

    def __init__(self, config: MergeRandARConfig):
        super().__init__(config)
        self.model = MergeRandARModel(config)
        self._init_code_head(config)
        self.position_head = nn.Linear(config.hidden_size, config.num_patches, bias=False)
        self.position_head.zero_init = True  # uniform over positions at the start
        self.post_init()

    # ---- ids and checks ----------------------------------------------------------------------------------------

    def _class_ids(self, class_labels) -> torch.LongTensor:
        return self._check_class_labels(class_labels) + self.config.codebook_size

    def _check_positions(self, positions, name: str) -> None:
        length = self.config.num_patches
        valid = positions != IGNORE_INDEX
        if ((positions[valid] < 0) | (positions[valid] >= length)).any():
            raise ValueError(f"{name} must be grid positions in [0, L = {length}).")
        ordered = positions.masked_fill(~valid, -1).sort(dim=1).values
        if ((ordered[:, 1:] == ordered[:, :-1]) & (ordered[:, 1:] >= 0)).any():
            raise ValueError(f"{name} must not repeat a position within a row (each merged token has its own).")

    def build_sequence(self, class_labels, labels, token_positions):
        """Teacher-forced ``(input_ids, grid_positions)``, [B, 2 K_max + 1]: ``[cls, M(K), P(p_1), y_1, .., P(p_K)]``.

        ``labels`` / ``token_positions``: ``[B, K_max]`` codes and their grid positions in generation order, padded
        at the end with ``-100`` when rows have different K. Padded steps get dummy ids after all real tokens, which
        causal attention never lets a real token see.
        """
        labels, token_positions = torch.as_tensor(labels), torch.as_tensor(token_positions)
        if labels.dim() != 2 or token_positions.shape != labels.shape or labels.shape[1] == 0:
            raise ValueError(
                f"labels and token_positions must both be [batch, K] (K >= 1), got {tuple(labels.shape)} and "
                f"{tuple(token_positions.shape)}."
            )
        if labels.is_floating_point() or token_positions.is_floating_point():
            raise ValueError("labels and token_positions must be integer tensors.")
        labels, token_positions = labels.to(self.device).long(), token_positions.to(self.device).long()
        class_ids = self._class_ids(class_labels)
        if class_ids.numel() != labels.shape[0]:
            raise ValueError(f"class_labels has {class_ids.numel()} entries but labels has {labels.shape[0]} rows.")
        valid = labels != IGNORE_INDEX
        if not torch.equal(valid, token_positions != IGNORE_INDEX):
            raise ValueError("labels and token_positions must be padded (-100) at the same places.")
        if (valid[:, 1:] & ~valid[:, :-1]).any() or not valid[:, 0].all():
            raise ValueError("Padding (-100) must come after at least one real token, at the end of each row.")
        codebook = self.config.codebook_size
        if ((labels[valid] < 0) | (labels[valid] >= codebook)).any():
            raise ValueError(f"labels must be image codes in [0, {codebook}) (or -100 for padding).")
        self._check_positions(token_positions, "token_positions")

        batch, steps = labels.shape
        codes, positions = labels.clamp(min=0), token_positions.clamp(min=0)  # dummies for the padding
        input_ids = torch.empty(batch, 2 * steps + 1, dtype=torch.long, device=self.device)
        input_ids[:, 0] = class_ids
        input_ids[:, 1] = self.model.merge_base + valid.sum(1)
        input_ids[:, 2::2] = self.model.position_base + positions
        input_ids[:, 3::2] = codes[:, :-1]
        grid_positions = torch.cat([torch.zeros_like(positions[:, :2]), positions.repeat_interleave(2, dim=1)], 1)
        return input_ids, grid_positions[:, :-1]

    # ---- position loss (the code head, its logits and loss come from MergeARGeneratorMixin) -------------------------

    def _position_loss(self, position_logits, token_positions):
        """Cross-entropy against the uniform distribution over the positions not generated yet.

        Step n (predicting ``p_n``) has used ``p_1..p_{n-1}`` and may pick any of ``p_n..p_K`` with equal
        probability under a random order; used positions are masked out as at generation.
        """
        valid = token_positions != IGNORE_INDEX
        one_hot = F.one_hot(token_positions.clamp(min=0), self.config.num_patches) * valid[..., None]
        remaining = one_hot.flip(1).cumsum(1).flip(1)  # positions p_n..p_K at step n
        used = (one_hot.cumsum(1) - one_hot).bool()  # positions p_1..p_{n-1}
        # A large finite value, not -inf: the target is 0 there, and 0 * -inf would be NaN.
        log_probs = position_logits.float().masked_fill(used, -1e9).log_softmax(-1)
        target = remaining / remaining.sum(-1, keepdim=True).clamp(min=1)
        return -(target * log_probs).sum(-1)[valid].mean()

    # ---- forward -----------------------------------------------------------------------------------------------

    @can_return_tuple
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        grid_positions: torch.LongTensor | None = None,
        cache: Cache | None = None,
        class_labels: torch.LongTensor | None = None,
        labels: torch.LongTensor | None = None,
        token_positions: torch.LongTensor | None = None,
        logits_to_keep: int = 0,
        past_key_values: Cache | None = None,
        output_attentions: bool | None = None,
        output_hidden_states: bool | None = None,
    ) -> MergeRandAROutput:
        r"""
        Two entries:

        * training / scoring: ``class_labels`` ``[B]``, ``labels`` ``[B, K_max]`` codes and ``token_positions``
          ``[B, K_max]`` their grid positions, both in generation order (padded with -100). Returns ``loss``,
          ``code_loss``, ``position_loss`` and the logits (see :class:`MergeRandAROutput`).
        * step-wise: ``input_ids`` and ``grid_positions`` ``[B, q]`` (see :meth:`build_sequence`) with an optional
          cache; returns code ``logits`` and ``position_logits`` for the last ``logits_to_keep`` tokens (0 = all).

        ``output_hidden_states`` / ``output_attentions`` add the backbone's states and attention weights over the
        sequence it ran; ``return_dict=False`` returns a tuple.
        """
        recorded = dict(output_attentions=output_attentions, output_hidden_states=output_hidden_states)
        cache = cache if cache is not None else past_key_values
        if labels is not None or token_positions is not None:
            if input_ids is not None or grid_positions is not None:
                raise ValueError("Pass either class_labels + labels + token_positions, or input_ids + grid_positions.")
            if class_labels is None or labels is None or token_positions is None:
                raise ValueError("The training entry needs class_labels, labels and token_positions together.")
            input_ids, grid_positions = self.build_sequence(class_labels, labels, token_positions)
            outputs = self.model(input_ids, grid_positions, **recorded)
            hidden_states = outputs.last_hidden_state
            valid = labels.to(self.device) != IGNORE_INDEX
            code_loss, code_logits = self._code_loss(hidden_states[:, 2::2][valid], labels.to(self.device)[valid])
            # p_1 is read at M(K) (index 1), p_{n+1} at P(p_n) (index 2n).
            slots = torch.cat([hidden_states[:, 1:2], hidden_states[:, 2:-1:2]], dim=1)
            position_logits = self.position_head(slots)
            position_loss = self._position_loss(position_logits, token_positions.to(self.device))
            loss = code_loss + self.config.position_loss_weight * position_loss
            return MergeRandAROutput(
                loss=loss, code_loss=code_loss, position_loss=position_loss, position_logits=position_logits,
                hidden_states=outputs.hidden_states, attentions=outputs.attentions, **code_logits,
            )
        if class_labels is not None:
            raise ValueError("class_labels needs labels and token_positions (generation goes through generate()).")
        if input_ids is None or grid_positions is None:
            raise ValueError("Pass input_ids and grid_positions, or class_labels + labels + token_positions.")
        outputs = self.model(input_ids, grid_positions, cache=cache, **recorded)
        hidden_states = outputs.last_hidden_state[:, -logits_to_keep:]
        return MergeRandAROutput(
            logits=self.logits(hidden_states), position_logits=self.position_head(hidden_states), cache=cache,
            hidden_states=outputs.hidden_states, attentions=outputs.attentions,
        )

    # ---- generation --------------------------------------------------------------------------------------------

    def _generation_order(self, positions, batch: int, num_tokens):
        positions = torch.as_tensor(positions, device=self.device)
        if positions.is_floating_point() or positions.dtype == torch.bool:
            raise ValueError(f"positions must be integer grid positions, got dtype {positions.dtype}.")
        if positions.dim() == 1:
            positions = positions.expand(batch, -1)
        if positions.dim() != 2 or positions.shape[0] != batch or positions.shape[1] == 0:
            raise ValueError(f"positions must be [K] or [batch={batch}, K], got {tuple(positions.shape)}.")
        if num_tokens is not None and num_tokens != positions.shape[1]:
            raise ValueError(f"num_tokens={num_tokens} disagrees with the {positions.shape[1]} given positions.")
        if (positions == IGNORE_INDEX).any():
            raise ValueError("positions must not contain -100: every row generates the same K tokens.")
        self._check_positions(positions, "positions")
        return positions.long()

    @torch.no_grad()
    def generate(
        self,
        class_labels,
        num_tokens: int | None = None,
        positions=None,
        guidance_scale: float | None = None,
        guidance_schedule: str = "constant",
        do_sample: bool = True,
        sampling: str | None = None,
        temperature: float = 1.0,
        top_k: int | None = None,
        top_p: float | None = None,
        generator: torch.Generator | list[torch.Generator] | None = None,
        output_scores: bool = False,
        callback: Callable[[int, torch.LongTensor], torch.LongTensor | None] | None = None,
        cfg_scale: float | None = None,
        cfg_schedule: str | None = None,
    ) -> MergeRandARGenerationOutput:
        r"""
        Generate K merged tokens per class label, one (position, code) pair per step, with a ``DynamicCache``.

        Args:
            class_labels: ``[B]`` class ids (``num_classes`` = null class).
            num_tokens: K (an int, the same for the batch; default ``config.num_tokens``, or the length of
                ``positions``).
            positions: the generation order, ``[K]`` or ``[B, K]`` distinct grid positions; ``None`` starts at
                position 0, which every tokenised image holds, and samples each next position from the position head
                among the unused ones (argmax with ``do_sample=False``).
            guidance_scale: classifier-free guidance ``u + s (c - u)`` on the code logits, as one batched forward of
                ``[cond; uncond]`` rows; ``None`` or 1 = off. Positions are read from the conditional rows.
            guidance_schedule: ``"constant"`` or ``"linear"`` (RandAR): the scale rises from 1 at the first token
                to ``guidance_scale`` at the last.
            do_sample, temperature, top_k, top_p: sampling of the codes (after guidance); greedy when
                ``do_sample=False``.
            sampling: how a code is drawn, as in ``MergeARForCausalLM.generate``:
                - ``"sub_token"`` (default for a factorised head when sampling): the low bits, then the high bits
                  given them, running the head twice per step. Guidance, temperature, top-k and top-p act on each
                  sub-token's distribution.
                - ``"joint"`` (default otherwise: greedy, dense head): the exact joint ``log p(lo) + log p(hi | lo)``
                  over all ``V`` codes, which runs the head's second slot for every low value; guidance and the
                  filters then act on whole codes.
                Without guidance and filters both draw from the same distribution; guidance differs (the sub-token
                rule guides each factor).
            generator: a ``torch.Generator`` for every random draw (positions and codes), or a list of one per row
                (row i's positions and codes then come from ``generator[i]`` alone, whatever the batch).
            output_scores: also return the per-step code logits (``scores``, or ``low_scores`` / ``high_scores``).
            callback: called after every step with the step index and the ``[B]`` codes just drawn (e.g. a progress
                bar); a returned ``[B]`` tensor replaces those codes (the next step reads it).
            cfg_scale, cfg_schedule: deprecated names of ``guidance_scale`` and ``guidance_schedule``.
        """
        guidance_scale = renamed_keyword(guidance_scale, cfg_scale, "guidance_scale", "cfg_scale")
        guidance_schedule = renamed_keyword(
            guidance_schedule, cfg_schedule, "guidance_schedule", "cfg_schedule", default="constant"
        )
        guidance_scale = check_guidance_scale(guidance_scale)
        check_guidance_schedule(guidance_schedule)
        check_sampling_arguments(temperature, top_k, top_p)
        class_ids = self._class_ids(class_labels)
        batch, length = class_ids.numel(), self.config.num_patches
        order = None if positions is None else self._generation_order(positions, batch, num_tokens)
        if order is not None:
            num_tokens = order.shape[1]
        num_tokens = self.config.num_tokens if num_tokens is None else num_tokens
        if isinstance(num_tokens, bool) or not isinstance(num_tokens, int) or not 1 <= num_tokens <= length:
            raise ValueError(f"num_tokens (K) must be an integer in [1, L = {length}], got {num_tokens!r}.")

        sampling = self._resolve_sampling(sampling, do_sample)
        guided = guidance_scale is not None
        rows = torch.arange(batch, device=self.device)
        prompt = torch.stack([class_ids, torch.full_like(class_ids, self.model.merge_base + num_tokens)], 1)
        if guided:
            null = torch.full_like(class_ids, self.config.codebook_size + self.config.num_classes)
            prompt = torch.cat([prompt, torch.stack([null, prompt[:, 1]], 1)])
        warpers = [TopKLogitsWarper(top_k)] if top_k else []
        warpers += [TopPLogitsWarper(top_p)] if top_p is not None and top_p < 1 else []
        scores = {"scores": [], "low_scores": [], "high_scores": []}

        def draw(logits, name, scale):
            """Guide ``[(2)B, n]`` logits, record them, then sample (or take the arg-max of) one value per row."""
            logits = logits.float()
            if guided:
                logits = logits[batch:] + scale * (logits[:batch] - logits[batch:])
            if output_scores:
                scores[name].append(logits)
            if not do_sample:
                return logits.argmax(-1)
            logits = logits / temperature
            for warper in warpers:
                logits = warper(None, logits)
            return _sample(logits.softmax(-1), generator)

        cache = DynamicCache()
        hidden = self.model(prompt, torch.zeros_like(prompt), cache=cache).last_hidden_state[:, -1]
        used = torch.zeros(batch, length, dtype=torch.bool, device=self.device)
        chosen, codes = [], []
        for step in range(num_tokens):
            if order is not None:
                position = order[:, step]
            elif step == 0:
                # Every tokenised image holds position 0 (the top-left patch starts its group), so the first step
                # takes it; the position head, trained on random orders, has seen it first as often as any step.
                position = torch.zeros(batch, dtype=torch.long, device=self.device)
            else:
                position_logits = self.position_head(hidden[:batch]).float().masked_fill(used, float("-inf"))
                position = _sample(position_logits.softmax(-1), generator) if do_sample else position_logits.argmax(-1)
            used[rows, position] = True
            # One forward per step: the previous code (if any) and the next position instruction.
            step_ids = self.model.position_base + position[:, None]
            step_grid = position[:, None]
            if codes:
                step_ids = torch.cat([codes[-1][:, None], step_ids], 1)
                step_grid = torch.cat([chosen[-1][:, None], step_grid], 1)
            if guided:
                step_ids, step_grid = step_ids.repeat(2, 1), step_grid.repeat(2, 1)
            hidden = self.model(step_ids, step_grid, cache=cache).last_hidden_state[:, -1]
            scale = scheduled_guidance(guidance_scale, guidance_schedule, step, num_tokens) if guided else None
            if sampling == "joint":
                code = draw(self.logits(hidden), "scores", scale)
            else:
                low_logits, head_cache = self.lm_head.predict_low(hidden)
                low = draw(low_logits, "low_scores", scale)
                high_logits = self.lm_head.predict_high(low.repeat(2) if guided else low, head_cache)
                code = merge_indices(low, draw(high_logits, "high_scores", scale), self.lm_head.low_bits)
            if callback is not None:
                replacement = callback(step, code)
                code = code if replacement is None else replacement
            chosen.append(position)
            codes.append(code)

        generation_order, codes = torch.stack(chosen, 1), torch.stack(codes, 1)
        sorted_positions, permutation = generation_order.sort(dim=1)
        return MergeRandARGenerationOutput(
            image_tokens=codes.gather(1, permutation),
            positions=sorted_positions,
            generation_order=generation_order,
            generated_tokens=codes,
            **{name: torch.stack(values, 1) for name, values in scores.items() if values},
        )


# `AutoModel`, not `AutoModelForCausalLM`: this model generates with its own loop (a position and a code per step),
# not through `GenerationMixin`, so it is not a causal LM in transformers' sense.
MergeRandARConfig.register_for_auto_class()
MergeRandARForCausalLM.register_for_auto_class("AutoModel")


def register_randar_auto_classes() -> None:
    """Register MergeRandAR with AutoConfig / AutoModel (idempotent); ``AutoModel`` gives the full model."""
    AutoConfig.register("mergevq_randar", MergeRandARConfig, exist_ok=True)
    AutoModel.register(MergeRandARConfig, MergeRandARForCausalLM, exist_ok=True)


__all__ = [
    "MergeRandARConfig",
    "MergeRandARForCausalLM",
    "MergeRandARGenerationOutput",
    "MergeRandARModel",
    "MergeRandAROutput",
    "MergeRandARPreTrainedModel",
    "register_randar_auto_classes",
]
