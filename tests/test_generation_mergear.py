"""MergeAR generate: per-sub-token sampling, the token budget, the GC pause and the generate contract."""

import gc

import numpy as np
import pytest
import torch
from transformers import GenerationConfig, StoppingCriteria, StoppingCriteriaList
from transformers.generation.utils import GenerateDecoderOnlyOutput

from mergevq_hf.cache_mergear import MergeARCache, build_sparsity_mask
from mergevq_hf.generation_mergear import MergeARSubTokenOutput, distinct_counts, paused_gc
from mergevq_hf.quantization_lfq import merge_indices

GRID = {"grid_size": 4}  # L = 16: many generate calls stay fast on 2 cores
L = 16


def filtered(scores, temperature, top_k, top_p):
    """Temperature, then top-k, then top-p, written out (the order transformers applies its warpers in)."""
    scores = scores / temperature
    if top_k:
        kth = scores.topk(top_k, dim=-1).values[:, -1:]
        scores = scores.masked_fill(scores < kth, float("-inf"))
    if top_p < 1.0:
        ordered, order = scores.sort(dim=-1, descending=True)
        mass_before = ordered.softmax(-1).cumsum(-1) - ordered.softmax(-1)
        drop = (mass_before >= top_p).scatter(1, order, mass_before >= top_p)
        scores = scores.masked_fill(drop, float("-inf"))
    return scores


def reference_sub_token_loop(
    model, null_swapped, class_labels, num_tokens, guidance_scale, do_sample, temperature, top_k, top_p,
    guidance_schedule="constant",
):
    """Open-MAGVIT2-style sampling without any cache: the whole sequence is recomputed under the sparsity mask."""
    head, window = model.lm_head, model.config.repeat_window
    sequence = model.build_prompt(class_labels, num_tokens)

    def guided(logits_of):
        cond = logits_of(sequence)
        if guidance_scale is None:
            return cond
        uncond = logits_of(null_swapped(model, sequence))
        step = sequence.shape[1] - 2
        scale = guidance_scale if guidance_schedule == "constant" else 1 + (guidance_scale - 1) * step / (L - 1)
        return uncond + scale * (cond - uncond)

    def draw(scores):
        scores = filtered(scores, temperature, top_k, top_p)
        return torch.multinomial(scores.softmax(-1), 1)[:, 0] if do_sample else scores.argmax(-1)

    def last_state(ids):
        mask = build_sparsity_mask(ids[:, 2:], window)
        return model.model(ids, attention_mask=mask, use_cache=False).last_hidden_state[:, -1]

    with torch.no_grad():
        for _ in range(L):
            low = draw(guided(lambda ids: head(last_state(ids), torch.zeros(len(ids), dtype=torch.long))[0]))
            high = draw(guided(lambda ids: head(last_state(ids), low)[1]))
            sequence = torch.cat([sequence, merge_indices(low, high, head.low_bits)[:, None]], dim=1)
    return sequence


@pytest.mark.parametrize(
    "guidance_scale, do_sample, temperature, top_k, top_p, guidance_schedule",
    [(None, True, 1.0, 0, 1.0, "constant"), (2.5, True, 1.0, 0, 1.0, "constant"), (2.0, True, 0.8, 5, 0.9, "constant"),
     (None, True, 1.3, 3, 1.0, "constant"), (None, True, 1.0, 0, 0.7, "constant"), (1.5, False, 1.0, 0, 1.0, "constant"),
     (3.0, True, 1.0, 0, 1.0, "linear")],
)
def test_sub_token_sampling_equals_a_plain_reference_loop(
    tiny_model, null_swapped, guidance_scale, do_sample, temperature, top_k, top_p, guidance_schedule
):
    model = tiny_model(seed=3, **GRID)
    kwargs = {"class_labels": [1, 4, 10], "num_tokens": [3, 8, L], "guidance_scale": guidance_scale,
              "guidance_schedule": guidance_schedule}
    sampling = {"do_sample": do_sample, "temperature": temperature, "top_k": top_k, "top_p": top_p}
    torch.manual_seed(7)
    generated = model.generate(**kwargs, **sampling, sampling="sub_token")
    torch.manual_seed(7)
    expected = reference_sub_token_loop(model, null_swapped, **kwargs, **sampling)
    assert torch.equal(generated, expected)


def test_sub_token_is_the_default_when_sampling_and_scores_have_both_sub_tokens(tiny_model):
    model = tiny_model(**GRID)
    kwargs = {"class_labels": [1, 2], "do_sample": True, "top_k": 0, "guidance_scale": 2.0}
    torch.manual_seed(0)
    default = model.generate(**kwargs)
    torch.manual_seed(0)
    out = model.generate(**kwargs, sampling="sub_token", return_dict_in_generate=True, output_scores=True,
                         output_logits=True)
    assert torch.equal(default, out.sequences) and isinstance(out, MergeARSubTokenOutput)
    low_size, high_size = (2**bits for bits in model.config.factorized_bits)
    assert len(out.low_scores) == len(out.high_scores) == len(out.low_logits) == L
    assert all(s.shape == (2, low_size) for s in out.low_scores + out.low_logits)
    assert all(s.shape == (2, high_size) for s in out.high_scores + out.high_logits)
    assert out.scores is None and isinstance(out.cache, MergeARCache)
    # The sampled sub-tokens are never ones the processed scores ruled out.
    low, high = out.sequences[:, 2:] % low_size, out.sequences[:, 2:] // low_size
    picked_low = torch.stack(out.low_scores, 1).gather(2, low[..., None])
    picked_high = torch.stack(out.high_scores, 1).gather(2, high[..., None])
    assert torch.isfinite(picked_low).all() and torch.isfinite(picked_high).all()


def test_joint_sampling_returns_full_code_scores_and_greedy_stays_joint(tiny_model):
    model = tiny_model(**GRID)
    out = model.generate(class_labels=[3], do_sample=True, top_k=0, sampling="joint", return_dict_in_generate=True,
                         output_scores=True)
    assert isinstance(out, GenerateDecoderOnlyOutput) and out.scores[0].shape == (1, model.config.codebook_size)
    # Greedy defaults to the joint arg-max: the code of highest joint probability, as the full logits say.
    greedy = model.generate(class_labels=[3], return_dict_in_generate=True, output_scores=True)
    assert torch.equal(torch.stack(greedy.scores, 1).argmax(-1), greedy.sequences[:, 2:])


@pytest.mark.parametrize("sampling", ["sub_token", "joint"])
def test_per_row_generators_make_a_row_independent_of_its_batch(tiny_model, sampling):
    model = tiny_model(**GRID)
    kwargs = {"do_sample": True, "top_k": 0, "guidance_scale": 2.0, "sampling": sampling}
    batch = model.generate(class_labels=[1, 2], generators=[torch.Generator().manual_seed(s) for s in (5, 6)], **kwargs)
    alone = model.generate(class_labels=[2], generators=[torch.Generator().manual_seed(6)], **kwargs)
    assert torch.equal(batch[1], alone[0])


@pytest.mark.parametrize("sampling, head", [("sub_token", "factorised"), ("joint", "factorised"), ("joint", "dense")])
def test_token_budget_never_exceeds_k_distinct_codes(tiny_model, sampling, head):
    overrides = {"factorized_bits": None} if head == "dense" else {}
    model = tiny_model(seed=1, **GRID, **overrides)
    for seed in range(6):
        torch.manual_seed(seed)
        budgets = [1, 2, 5, 9]
        sequences = model.generate(class_labels=[0, 3, 6, 9], num_tokens=budgets, do_sample=True, top_k=0,
                                   temperature=1.5, guidance_scale=[None, 2.0][seed % 2], token_budget=True,
                                   sampling=sampling)
        distinct = distinct_counts(sequences[:, 2:])
        assert (distinct <= torch.tensor(budgets)).all(), (seed, distinct)
    torch.manual_seed(0)  # without the budget these random weights go over it
    free = model.generate(class_labels=[0] * 4, num_tokens=2, do_sample=True, top_k=0, temperature=1.5,
                          sampling=sampling)
    assert (distinct_counts(free[:, 2:]) > 2).any()


def test_token_budget_with_beam_search_and_greedy(tiny_model):
    model = tiny_model(seed=2, **GRID)
    beams = model.generate(class_labels=[1, 2], num_tokens=3, num_beams=2, token_budget=True)
    greedy = model.generate(class_labels=[1, 2], num_tokens=3, token_budget=True)
    assert (distinct_counts(beams[:, 2:]) <= 3).all() and (distinct_counts(greedy[:, 2:]) <= 3).all()


class _Probe(StoppingCriteria):
    def __init__(self, fail_at=None):
        self.fail_at, self.gc_states = fail_at, []

    def __call__(self, input_ids, scores, **kwargs):
        self.gc_states.append(gc.isenabled())
        if self.fail_at is not None and len(self.gc_states) == self.fail_at:
            raise RuntimeError("stop here")
        return torch.zeros(input_ids.shape[0], dtype=torch.bool)


@pytest.mark.parametrize("sampling", ["sub_token", "joint"])
def test_gc_is_paused_during_generate_and_restored_after_an_exception(tiny_model, sampling):
    model = tiny_model(**GRID)
    kwargs = {"class_labels": [1], "do_sample": True, "sampling": sampling}
    assert gc.isenabled()
    probe = _Probe()
    model.generate(**kwargs, stopping_criteria=StoppingCriteriaList([probe]))
    assert probe.gc_states and not any(probe.gc_states) and gc.isenabled()
    with pytest.raises(RuntimeError, match="stop here"):
        model.generate(**kwargs, stopping_criteria=StoppingCriteriaList([_Probe(fail_at=3)]))
    assert gc.isenabled()
    gc.disable()
    try:  # a caller who disabled the GC keeps it disabled
        with pytest.raises(RuntimeError):
            with paused_gc():
                raise RuntimeError
        assert not gc.isenabled()
    finally:
        gc.enable()


def test_a_generation_config_is_honoured_and_a_merge_ar_cache_is_made(tiny_model):
    model = tiny_model(**GRID)
    config = GenerationConfig(max_new_tokens=5, do_sample=False, return_dict_in_generate=True)
    out = model.generate(class_labels=[1, 2], generation_config=config)
    assert out.sequences.shape == (2, 2 + 5) and isinstance(out.cache, MergeARCache)
    full = model.generate(class_labels=[1, 2])
    assert torch.equal(out.sequences, full[:, :7])
    assert model.generate(class_labels=[1], max_length=6).shape == (1, 6)
    no_cache = model.generate(class_labels=[1, 2], use_cache=False, return_dict_in_generate=True)
    assert no_cache.cache is None and torch.equal(no_cache.sequences, full)
    explicit = model.generate(class_labels=[1, 2], generation_config=GenerationConfig(use_cache=False))
    assert torch.equal(explicit, full)


@pytest.mark.parametrize("sampling", ["sub_token", "joint"])
def test_own_loop_without_a_cache_recomputes_the_same_codes(tiny_model, sampling):
    model = tiny_model(**GRID)
    kwargs = {"class_labels": [1, 2], "do_sample": True, "top_k": 0, "guidance_scale": 2.0, "sampling": sampling,
              "generators": [torch.Generator().manual_seed(s) for s in (1, 2)]}
    cached = model.generate(**kwargs)
    kwargs["generators"] = [torch.Generator().manual_seed(s) for s in (1, 2)]
    assert torch.equal(model.generate(**kwargs, use_cache=False), cached)
    with pytest.raises(ValueError, match="attentions or hidden states"):
        model.generate(**kwargs, return_dict_in_generate=True, output_attentions=True)


def test_guidance_scale_from_a_generation_config_is_batched_guidance(tiny_model):
    model = tiny_model(**GRID)
    guided = model.generate(class_labels=[1, 2], guidance_scale=2.0)
    assert not torch.equal(guided, model.generate(class_labels=[1, 2]))
    config = GenerationConfig(guidance_scale=2.0)
    assert torch.equal(model.generate(class_labels=[1, 2], generation_config=config), guided)
    model.generation_config.guidance_scale = 2.0  # a saved default counts too
    assert torch.equal(model.generate(class_labels=[1, 2]), guided)


def test_integer_inputs_of_every_kind_are_accepted(tiny_model):
    model = tiny_model(**GRID)
    reference = model.generate(class_labels=[1, 2], num_tokens=[3, 4])
    for labels, counts in [(np.array([1, 2]), np.int64(3)), (torch.tensor([1, 2]), torch.tensor([3, 4])),
                           ([np.int32(1), 2], [3, np.int16(4)])]:
        counts = [3, 4] if isinstance(counts, np.integer) else counts
        assert torch.equal(model.generate(class_labels=labels, num_tokens=counts), reference)
    prompt = model.build_prompt([1, 2], [3, 4])
    assert torch.equal(model.generate(prompt), reference)
    assert torch.equal(model.generate(input_ids=prompt.tolist()), reference)


def test_bad_generate_arguments_raise_precise_errors(tiny_model):
    model = tiny_model(**GRID)
    dense = tiny_model(factorized_bits=None, **GRID)
    codebook, classes = model.config.codebook_size, model.config.num_classes
    cases = [
        (lambda: model.generate(class_labels=[1.7]), "class_labels must be"),
        (lambda: model.generate(class_labels=[True]), "class_labels must be"),
        (lambda: model.generate(class_labels=["shirt"]), "class_labels must be"),
        (lambda: model.generate(class_labels=torch.tensor([1.0])), "class_labels must hold integers"),
        (lambda: model.generate(class_labels=[1], num_tokens=3.5), "num_tokens must be"),
        (lambda: model.generate(class_labels=[1], num_tokens=True), "num_tokens must be"),
        (lambda: model.generate(class_labels=[1], guidance_scale=float("nan")), "guidance_scale"),
        (lambda: model.generate(class_labels=[1], guidance_scale=-1.0), "guidance_scale"),
        (lambda: model.generate(class_labels=[1], guidance_scale="2"), "guidance_scale"),
        (lambda: model(input_ids=model.build_prompt([1], 3), guidance_scale=float("nan")), "guidance_scale"),
        (lambda: model.generate(class_labels=[1], do_sample=True, top_p=0.0), "top_p"),
        (lambda: model.generate(class_labels=[1], do_sample=True, top_p=1.5), "top_p"),
        (lambda: model.generate(class_labels=[1], do_sample=True, top_p=float("nan")), "top_p"),
        (lambda: model.generate(class_labels=[1], do_sample=True, temperature=0.0), "temperature"),
        (lambda: model.generate(input_ids=[[5, 5]]), "A prompt must be"),
        (lambda: model.generate(input_ids=torch.tensor([[codebook + 1]])), "2 to"),  # class token, no merge token
        (lambda: model.generate(input_ids=torch.tensor([[codebook + 1, codebook + 2]])), "A prompt must be"),
        (lambda: model.generate(input_ids=torch.tensor([[codebook + classes + 2, codebook + 1]])), "A prompt must be"),
        (lambda: model.generate(class_labels=[1], repetition_penalty=1.2), "repetition_penalty"),
        (lambda: model.generate(class_labels=[1], no_repeat_ngram_size=2), "no_repeat_ngram_size"),
        (lambda: model.generate(class_labels=[1], sampling="nucleus"), "sampling must be"),
        (lambda: dense.generate(class_labels=[1], do_sample=True, sampling="sub_token"), "factorised head"),
        (lambda: model.generate(class_labels=[1], num_beams=2, sampling="sub_token"), "Beam search"),
        (lambda: model.generate(class_labels=[1], token_budget="yes"), "token_budget"),
        (lambda: model.generate(class_labels=[1], num_tokens=0, token_budget=True), "num_tokens"),
        (lambda: model.generate(class_labels=[1], num_tokens=L + 1, token_budget=True), "num_tokens"),
        (lambda: model.generate(class_labels=[1], max_new_tokens=L + 1), "new tokens"),
        (lambda: model.generate(class_labels=[1, 2], do_sample=True, generators=[torch.Generator()]), "generators"),
        (lambda: model.generate(class_labels=[1], generators=[torch.Generator()]), "do_sample"),
        (lambda: model.generate(class_labels=[1], negative_prompt_ids=torch.tensor([[5]])), "negative_prompt_ids"),
    ]
    for call, message in cases:
        with pytest.raises(ValueError, match=message):
            call()


def test_pipeline_and_cli_pass_the_token_budget(make_tiny_pipeline):
    from mergevq_hf.cli import build_parser

    pipe = make_tiny_pipeline()
    steps = []

    def record(pipe, step, timestep, callback_kwargs):
        steps.append(callback_kwargs["next_tokens"].clone())

    pipe(class_labels=[1, 2], num_images_per_class=2, num_tokens=3, token_budget=True, output_type="pt",
         generator=torch.Generator().manual_seed(0), callback_on_step_end=record)
    assert len(steps) == pipe.transformer.config.num_patches
    assert (distinct_counts(torch.stack(steps, 1)) <= 3).all()
    with pytest.raises(ValueError, match="token_budget"):
        pipe(class_labels=[1], token_budget="yes")
    assert build_parser().parse_args(["generate", "--token-budget"]).token_budget
    assert not build_parser().parse_args(["generate"]).token_budget
