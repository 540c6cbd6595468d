"""MergeAR's repeat gate (config.repeat_gate): an explicit choice between repeating a held code and a new one."""

import pytest
import torch
import torch.nn.functional as F

from mergevq_hf.cache_mergear import MergeARCache
from mergevq_hf.configuration_randar import MergeRandARConfig
from mergevq_hf.generation_mergear import distinct_counts, held_codes
from mergevq_hf.modeling_mergear import gated_log_probs

GRID = {"grid_size": 4}  # L = 16


def gated_model(tiny_model, bias=None, **overrides):
    model = tiny_model(repeat_gate=True, **overrides)
    if bias is not None:
        with torch.no_grad():
            model.repeat_gate.weight.zero_()
            model.repeat_gate.bias.fill_(bias)
    return model


def test_training_adds_the_gate_loss_on_repeats(tiny_model):
    model = gated_model(tiny_model, **GRID)
    labels = torch.tensor([[3, 3, 5, 3] * 4, [1, 2, 3, 4] * 4])
    out = model(class_labels=[1, 2], num_tokens=4, labels=labels)
    plain = model._code_loss(model.model(torch.cat([model.build_prompt([1, 2], 4), labels[:, :-1]], 1)).last_hidden_state[:, 1:], labels)[0]
    is_repeat = torch.tensor([[0, 1, 0, 1] + [1] * 12, [0] * 4 + [1] * 12], dtype=torch.float)
    expected = plain + F.binary_cross_entropy_with_logits(out.repeat_logits, is_repeat)
    torch.testing.assert_close(out.loss, expected)
    out.loss.backward()
    assert model.repeat_gate.weight.grad.abs().sum() > 0


def test_gated_log_probs_split_the_mass_between_held_and_new_codes():
    log_probs = torch.randn(2, 8).log_softmax(-1)
    held = torch.tensor([[True, True] + [False] * 6, [False] * 8])
    mixture = gated_log_probs(log_probs, torch.tensor([0.4, 3.0]), held)
    probs = mixture.exp()
    torch.testing.assert_close(probs.sum(-1), torch.ones(2))
    torch.testing.assert_close(probs[0, :2].sum(), torch.sigmoid(torch.tensor(0.4)))  # g on the held codes
    torch.testing.assert_close(probs[1], log_probs[1].exp())  # nothing held yet: the head's distribution


@pytest.mark.parametrize("sampling", ["sub_token", "joint"])
@pytest.mark.parametrize("bias, expected", [(30.0, 1), (-30.0, 16)])
def test_a_certain_gate_decides_how_many_codes_an_image_holds(tiny_model, sampling, bias, expected):
    model = gated_model(tiny_model, bias=bias, **GRID)
    kwargs = {"class_labels": [1, 2, 3], "num_tokens": 3, "do_sample": True, "top_k": 0, "sampling": sampling}
    for guidance_scale in (None, 2.0):
        codes = model.image_tokens_from_sequences(model.generate(**kwargs, guidance_scale=guidance_scale))
        assert distinct_counts(codes).tolist() == [expected] * 3
    greedy = model.image_tokens_from_sequences(model.generate(class_labels=[1, 2], num_tokens=3, num_beams=2))
    assert distinct_counts(greedy).tolist() == [expected] * 2  # transformers' loop, on the mixture logits


@pytest.mark.parametrize("sampling", ["sub_token", "joint"])
def test_generate_with_and_without_a_cache_agree(tiny_model, sampling):
    model = gated_model(tiny_model, tokens_left_embedding=True, **GRID)
    kwargs = {"class_labels": [1, 2], "num_tokens": 3, "do_sample": True, "top_k": 0, "guidance_scale": 2.0,
              "sampling": sampling}
    seeded = lambda: [torch.Generator().manual_seed(s) for s in (1, 2)]  # noqa: E731
    cached = model.generate(**kwargs, generators=seeded())
    assert torch.equal(model.generate(**kwargs, generators=seeded(), use_cache=False), cached)
    greedy = {"class_labels": [1, 2], "num_tokens": 3, "num_beams": 2}
    assert torch.equal(model.generate(**greedy), model.generate(**greedy, use_cache=False))


def test_cached_steps_see_what_the_full_sequence_sees(tiny_model):
    model = gated_model(tiny_model)
    torch.manual_seed(0)
    sequence = torch.cat([model.build_prompt([1, 2], [3, 30]), torch.randint(0, 6, (2, 36))], dim=1)
    full = model(input_ids=sequence, use_cache=False)
    cache = MergeARCache(model.config)
    steps = [model(input_ids=sequence[:, :2], cache=cache).logits[:, -1]]
    for t in range(2, sequence.shape[1]):
        held = held_codes(sequence[:, :t], model.config.codebook_size)
        steps.append(model(input_ids=sequence[:, t : t + 1], cache=cache, codes_held=held).logits[:, -1])
    torch.testing.assert_close(torch.stack(steps, dim=1), full.logits[:, 1:], rtol=1e-4, atol=1e-4)
    with pytest.raises(ValueError, match="needs codes_held"):
        model(input_ids=sequence[:, 2:3], cache=cache)
    with pytest.raises(ValueError, match="repeat_gate must be False"):
        MergeRandARConfig.from_preset("tiny", repeat_gate=True)
