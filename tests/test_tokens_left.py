"""MergeAR's tokens-left embedding: the merge instruction presented at every image token (config.tokens_left_embedding)."""

import pytest
import torch

from mergevq_hf.cache_mergear import MergeARCache
from mergevq_hf.configuration_randar import MergeRandARConfig
from mergevq_hf.generation_mergear import count_tokens_left
from mergevq_hf.modeling_mergear import MergeARForCausalLM


def test_count_tokens_left_by_hand(tiny_model):
    config = tiny_model().config  # 64 codes, 10 classes: class c is 64 + c, merge instruction K is 75 + K
    sequences = torch.tensor([[64 + 3, 75 + 4, 5, 5, 7, 5, 9, 11, 7, 12], [64 + 1, 75 + 2, 0, 1, 2, 0, 1, 3, 3, 3]])
    expected = torch.tensor([[4, 4, 3, 3, 2, 2, 1, 0, 0, 0], [2, 2, 1, 0, 0, 0, 0, 0, 0, 0]])
    assert torch.equal(count_tokens_left(sequences, config), expected)
    assert torch.equal(count_tokens_left(sequences[:, :2], config), expected[:, :2])  # prompt only


def test_cached_steps_see_what_the_full_sequence_sees(tiny_model):
    model = tiny_model(tokens_left_embedding=True)
    torch.manual_seed(0)
    codes = torch.randint(0, 6, (2, 36))  # few different codes: the count reaches 0 and stays there
    sequence = torch.cat([model.build_prompt([1, 2], [3, 30]), codes], dim=1)
    full = model(input_ids=sequence, use_cache=False).logits
    cache = MergeARCache(model.config)
    steps = [model(input_ids=sequence[:, :2], cache=cache).logits[:, -1]]
    for t in range(2, sequence.shape[1]):
        left = count_tokens_left(sequence[:, : t + 1], model.config)[:, -1:]
        steps.append(model(input_ids=sequence[:, t : t + 1], cache=cache, tokens_left=left).logits[:, -1])
    torch.testing.assert_close(torch.stack(steps, dim=1), full[:, 1:], rtol=1e-4, atol=1e-4)
    # The count is an input: the same codes under another K give other logits.
    other_k = torch.cat([model.build_prompt([1, 2], [30, 3]), codes], dim=1)
    other = model(input_ids=other_k, use_cache=False).logits
    assert (other[:, 2:] - full[:, 2:]).abs().amax() > 1e-2
    cache = MergeARCache(model.config)
    model(input_ids=sequence[:, :2], cache=cache)
    with pytest.raises(ValueError, match="needs tokens_left"):
        model(input_ids=sequence[:, 2:3], cache=cache)


@pytest.mark.parametrize("sampling", ["sub_token", "joint"])
def test_generate_with_and_without_a_cache_agree(tiny_model, sampling):
    model = tiny_model(tokens_left_embedding=True, grid_size=4)
    kwargs = {"class_labels": [1, 2], "num_tokens": 3, "do_sample": True, "top_k": 0, "guidance_scale": 2.0,
              "sampling": sampling}
    seeded = lambda: [torch.Generator().manual_seed(s) for s in (1, 2)]  # noqa: E731
    cached = model.generate(**kwargs, generators=seeded())
    assert torch.equal(model.generate(**kwargs, generators=seeded(), use_cache=False), cached)
    greedy = {"class_labels": [1, 2], "num_tokens": 3, "num_beams": 2}  # transformers' own loop
    assert torch.equal(model.generate(**greedy), model.generate(**greedy, use_cache=False))


def test_refused_where_it_cannot_be_counted(tiny_model, tmp_path):
    model = tiny_model(tokens_left_embedding=True)
    with pytest.raises(ValueError, match=r"start \[class, merge instruction"):
        model.model(torch.tensor([[5, 6, 7]]), use_cache=False)
    with pytest.raises(ValueError, match="tokens_left must be"):
        model.model(model.build_prompt([1], 4), use_cache=False, tokens_left=torch.zeros(1, 3, dtype=torch.long))
    with pytest.raises(ValueError, match="tokens_left_embedding must be False"):
        MergeRandARConfig.from_preset("tiny", tokens_left_embedding=True)
    model.save_pretrained(tmp_path)
    loaded = MergeARForCausalLM.from_pretrained(tmp_path)
    assert loaded.config.tokens_left_embedding
    torch.testing.assert_close(loaded.model.embed_tokens_left.weight, model.model.embed_tokens_left.weight)
