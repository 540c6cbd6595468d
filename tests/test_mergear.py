"""MergeARForCausalLM: config, factorised head, training loss, generation, CFG, save/load, bad inputs."""

import os
import subprocess
import sys
import textwrap

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from transformers import AutoConfig, AutoModelForCausalLM, DynamicCache
from transformers.generation.utils import GenerateDecoderOnlyOutput

from mergevq_hf.cache_mergear import MergeARCache, build_sparsity_mask
from mergevq_hf.configuration_mergear import MergeARConfig
from mergevq_hf.modeling_mergear import MergeARForCausalLM, register_mergear_auto_classes
from mergevq_hf.quantization_lfq import merge_indices, split_indices

SMALL = {"grid_size": 6, "codebook_bits": 6, "factorized_bits": [3, 3]}  # L = 36 tokens: generation tests stay fast on 2 cores
L = 36


def test_presets_and_config_round_trip(tmp_path):
    large = MergeARConfig.from_preset("L")
    assert (large.num_hidden_layers, large.hidden_size, large.num_patches) == (24, 1024, 256)
    assert MergeARConfig.from_preset("L-1024").num_patches == 1024
    with torch.device("meta"):
        params = sum(p.numel() for p in MergeARForCausalLM(large).parameters())
    assert 330e6 < params < 350e6  # the paper's 343M
    tiny = MergeARConfig.from_preset("tiny", repeat_window=2, use_cache=False)
    tiny.save_pretrained(tmp_path)
    loaded = MergeARConfig.from_pretrained(tmp_path)
    assert loaded.to_dict() == tiny.to_dict() and loaded.factorized_bits == [4, 6] and loaded.use_cache is False


@pytest.mark.parametrize(
    "field, value",
    [
        ("factorized_bits", None),  # 18-bit dense head
        ("factorized_bits", [6, 10]),
        ("hidden_size", 1000),
        ("repeat_window", 0),
        ("num_tokens", 257),
        ("class_dropout_prob", 1.0),
        ("grid_size", "16"),
    ],
)
def test_bad_config_values_name_the_field(field, value):
    with pytest.raises(TypeError if isinstance(value, str) else ValueError, match=field):  # wrong type: TypeError
        MergeARConfig(**{field: value})


def test_joint_logits_are_the_factorised_probabilities(tiny_model):
    model = tiny_model()
    config, head = model.config, model.lm_head
    prompt = model.build_prompt([3, 4], 9)
    logits = model(input_ids=prompt, use_cache=False).logits[:, -1]
    hidden = model.model(prompt, use_cache=False).last_hidden_state[:, -1]
    low_values = torch.arange(2**head.low_bits)
    expected = torch.empty(2, config.codebook_size)
    for row in range(2):
        low_logits, high_logits = head(hidden[row].expand(len(low_values), -1), low_values)
        p_low = low_logits[0].softmax(-1)  # slot 0 only sees h: identical for every low value
        for low in low_values:
            high = torch.arange(high_logits.shape[-1])
            codes = merge_indices(low.expand_as(high), high, head.low_bits)
            expected[row, codes] = p_low[low] * high_logits[low].softmax(-1)
    torch.testing.assert_close(logits.softmax(-1), expected, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("smoothing", [0.0, 0.1])
def test_training_loss_is_low_plus_high_cross_entropy(tiny_model, smoothing):
    model = tiny_model(label_smoothing=smoothing)
    labels = torch.randint(0, model.config.codebook_size, (2, L))
    out = model(class_labels=[1, 5], num_tokens=[7, 30], labels=labels)
    sequence = torch.cat([model.build_prompt([1, 5], [7, 30]), labels[:, :-1]], dim=1)
    mask = build_sparsity_mask(labels[:, :-1], model.config.repeat_window)
    hidden = model.model(sequence, attention_mask=mask, use_cache=False).last_hidden_state[:, 1:]
    low, high = split_indices(labels, model.lm_head.low_bits)
    low_logits, high_logits = model.lm_head(hidden, low)
    expected = F.cross_entropy(low_logits.flatten(0, 1), low.flatten(), label_smoothing=smoothing)
    expected = expected + F.cross_entropy(high_logits.flatten(0, 1), high.flatten(), label_smoothing=smoothing)
    torch.testing.assert_close(out.loss, expected)
    torch.testing.assert_close(out.low_logits, low_logits)
    assert out.logits is None and out.high_logits.shape == (2, L, 8)


def test_dense_head_variant(tiny_model):
    model = tiny_model(factorized_bits=None)
    labels = torch.randint(0, 64, (2, L))
    out = model(class_labels=[0, 1], num_tokens=5, labels=labels)
    expected = F.cross_entropy(out.logits.flatten(0, 1), labels.flatten(), label_smoothing=0.1)
    torch.testing.assert_close(out.loss, expected)
    assert model.generate(class_labels=[2], num_tokens=5).shape == (1, 2 + L)


def test_training_loss_decreases_with_dropout_and_label_dropout():
    torch.manual_seed(0)
    model = MergeARForCausalLM(MergeARConfig.from_preset("tiny", **SMALL)).train()  # the real init: zero heads
    labels = torch.randint(0, 64, (4, L))
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(8):
        loss = model(class_labels=[0, 1, 2, 3], num_tokens=[4, 8, 16, L], labels=labels).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert all(torch.isfinite(torch.tensor(losses))) and losses[-1] < losses[0] - 0.3


def test_label_dropout_only_in_training(tiny_model):
    model = tiny_model(class_dropout_prob=0.99)
    prompt = model.build_prompt([1] * 64, 4)
    null = model.model.embed_class.weight[model.config.num_classes]
    model.train()
    assert torch.isclose(model.model.embed(prompt)[:, 0], null).all(-1).float().mean() > 0.8
    model.eval()
    assert not torch.isclose(model.model.embed(prompt)[:, 0], null).all(-1).any()


def schedule_at_each_state(guidance_scale, schedule, length):
    """``[length]`` guidance scales of the states of a sequence: state i predicts the code at grid position i - 1."""
    if schedule == "constant":
        return torch.full((length,), guidance_scale)
    return 1 + (guidance_scale - 1) * (torch.arange(length) - 1).clamp(min=0) / (L - 1)


@pytest.mark.parametrize("window", [1, 3])
@pytest.mark.parametrize("guidance_scale, schedule", [(None, "constant"), (2.5, "constant"), (2.5, "linear")])
def test_greedy_generation_equals_sparse_recomputation(tiny_model, null_swapped, window, guidance_scale, schedule):
    model = tiny_model(seed=window, repeat_window=window)
    sequences = model.generate(class_labels=[1, 2, 10], num_tokens=[4, 16, L], guidance_scale=guidance_scale,
                               guidance_schedule=schedule)
    assert sequences.shape == (3, 2 + L)
    inputs = sequences[:, :-1]
    mask = build_sparsity_mask(inputs[:, 2:], window)
    logits = model(input_ids=inputs, attention_mask=mask, use_cache=False).logits
    if guidance_scale is not None:
        uncond = model(input_ids=null_swapped(model, inputs), attention_mask=mask, use_cache=False).logits
        scales = schedule_at_each_state(guidance_scale, schedule, inputs.shape[1])
        logits = uncond + scales[None, :, None] * (logits - uncond)
    assert torch.equal(logits[:, 1:].argmax(-1), sequences[:, 2:])
    codes = model.image_tokens_from_sequences(sequences)
    assert codes.shape == (3, L) and torch.equal(codes, sequences[:, 2:])


@pytest.mark.parametrize("schedule", ["constant", "linear"])
def test_batched_cfg_equals_two_forwards(tiny_model, null_swapped, schedule):
    model = tiny_model()
    sequence = torch.cat([model.build_prompt([3, 7], [8, 30]), torch.randint(0, 64, (2, 20))], dim=1)
    scale = 1.7
    guided = model(input_ids=sequence, guidance_scale=scale, guidance_schedule=schedule).logits
    cond = model(input_ids=sequence, use_cache=False).logits
    uncond = model(input_ids=null_swapped(model, sequence), use_cache=False).logits
    scales = schedule_at_each_state(scale, schedule, sequence.shape[1])[None, :, None]
    torch.testing.assert_close(guided, uncond + scales * (cond - uncond), rtol=1e-4, atol=1e-4)


def test_sampling_is_seeded_and_generate_features_work(tiny_model):
    model = tiny_model()
    kwargs = {"class_labels": [1, 2], "num_tokens": 16, "do_sample": True, "top_k": 20, "top_p": 0.9}
    kwargs["temperature"] = 0.8
    torch.manual_seed(1)
    first = model.generate(**kwargs, num_return_sequences=2, guidance_scale=2.0)
    torch.manual_seed(1)
    again = model.generate(**kwargs, num_return_sequences=2, guidance_scale=2.0)
    torch.manual_seed(2)
    other = model.generate(**kwargs, num_return_sequences=2, guidance_scale=2.0)
    assert first.shape == (4, 2 + L) and torch.equal(first, again) and not torch.equal(first, other)
    out = model.generate(**kwargs, return_dict_in_generate=True, output_scores=True)  # per sub-token by default
    assert isinstance(out, GenerateDecoderOnlyOutput) and len(out.low_scores) == len(out.high_scores) == L
    assert isinstance(out.cache, MergeARCache) and out.cache.get_seq_length() == 1 + L


@pytest.mark.parametrize("guidance_scale", [None, 2.0])
def test_beam_search_reorders_the_cache_rows(tiny_model, guidance_scale):
    model = tiny_model(grid_size=4)
    kwargs = {"class_labels": [1, 2], "num_tokens": 5, "num_beams": 3, "guidance_scale": guidance_scale}
    assert torch.equal(model.generate(**kwargs), model.generate(**kwargs, use_cache=False))


def test_raster_baseline_caches_agree(tiny_model):
    model = tiny_model()
    dynamic = model.generate(class_labels=[1, 2], cache=DynamicCache())
    uncompressed = model.generate(class_labels=[1, 2], cache=MergeARCache(model.config, compress=False))
    causal = torch.ones(1 + L, 1 + L, dtype=torch.bool).tril()[None, None]
    recomputed = model(input_ids=dynamic[:, :-1], attention_mask=causal, use_cache=False).logits.argmax(-1)
    assert torch.equal(dynamic, uncompressed) and torch.equal(recomputed[:, 1:], dynamic[:, 2:])


@pytest.mark.numerics
def test_save_load_keeps_the_weights_and_auto_classes_work(tiny_model, tmp_path):
    model = tiny_model()
    model.save_pretrained(tmp_path)
    prompt = model.build_prompt([1, 2], 5)
    register_mergear_auto_classes()
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert isinstance(loaded, MergeARForCausalLM) and AutoConfig.from_pretrained(tmp_path).model_type == "mergear"
    for (name, a), (_, b) in zip(model.state_dict().items(), loaded.state_dict().items()):
        assert torch.equal(a, b), name  # stored values are exact ...
    # ... but memory-mapped weights are not 64-byte aligned: CPU kernels may take another vector path and round differently
    torch.testing.assert_close(loaded(input_ids=prompt).logits, model(input_ids=prompt).logits, rtol=1e-5, atol=1e-5)


def test_weights_missing_from_a_checkpoint_are_initialised(tmp_path):
    MergeARForCausalLM(MergeARConfig.from_preset("tiny")).save_pretrained(tmp_path)
    weights = load_file(tmp_path / "model.safetensors")
    for name in ("lm_head.high_head.weight", "model.embed_merge.weight", "model.norm.weight"):
        del weights[name]
    save_file(weights, tmp_path / "model.safetensors", metadata={"format": "pt"})
    loaded = MergeARForCausalLM.from_pretrained(tmp_path)
    assert torch.equal(loaded.lm_head.high_head.weight, torch.zeros_like(loaded.lm_head.high_head.weight))
    assert torch.equal(loaded.model.norm.weight, torch.ones(64))
    assert 0.01 < loaded.model.embed_merge.weight.std() < 0.03


def test_remote_code_load_without_the_package(tiny_model, tmp_path):
    model = tiny_model()
    checkpoint = tmp_path / "checkpoint"
    model.save_pretrained(checkpoint)
    prompt = model.build_prompt([1, 2], 5)
    torch.save({"prompt": prompt, "logits": model(input_ids=prompt).logits}, tmp_path / "reference.pt")
    script = textwrap.dedent(
        f"""
        import importlib.abc, sys
        class Block(importlib.abc.MetaPathFinder):
            def find_spec(self, name, path, target=None):
                if name.split(".")[0] == "mergevq_hf":
                    raise ImportError(name)
        sys.meta_path.insert(0, Block())
        try:
            import mergevq_hf
            sys.exit("mergevq_hf is importable")
        except ImportError:
            pass
        import torch
        from transformers import AutoModelForCausalLM
        model = AutoModelForCausalLM.from_pretrained({str(checkpoint)!r}, trust_remote_code=True).eval()
        reference = torch.load({str(tmp_path / "reference.pt")!r})
        torch.testing.assert_close(model(input_ids=reference["prompt"]).logits, reference["logits"], rtol=1e-5, atol=1e-5)
        assert model.generate(class_labels=[1], num_tokens=5).shape[0] == 1
        print("remote ok")
        """
    )
    env = {**os.environ, "HF_HOME": str(tmp_path / "hf_home"), "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    result = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, env=env, capture_output=True, text=True)
    assert result.returncode == 0 and "remote ok" in result.stdout, result.stderr[-2000:]


def test_bad_inputs_raise_precise_errors(tiny_model):
    model = tiny_model()
    labels = torch.zeros(2, L, dtype=torch.long)
    cases = [
        (lambda: model.generate(class_labels=[11]), "class_labels"),
        (lambda: model.generate(class_labels=[-1]), "class_labels"),
        (lambda: model.generate(class_labels=[1], num_tokens=0), "num_tokens"),
        (lambda: model.generate(class_labels=[1], num_tokens=L + 1), "num_tokens"),
        (lambda: model.generate(class_labels=[1, 2], num_tokens=[4, 5, 6]), "num_tokens"),
        (lambda: model.generate(num_tokens=4), "num_tokens needs class_labels"),
        (lambda: model.generate(), "class_labels"),
        (lambda: model(class_labels=[1, 2], num_tokens=4, labels=labels[:, :-1]), "labels must be"),
        (lambda: model(class_labels=[1, 2], num_tokens=4, labels=labels + 64), "image codes"),
        (lambda: model(class_labels=[1, 2], num_tokens=4, labels=labels, guidance_scale=2.0), "guidance_scale"),
        (lambda: model(input_ids=torch.tensor([[64 + 11]])), "merge-instruction"),  # the unused K = 0 id
        (lambda: model(input_ids=torch.tensor([[5, 64]]), use_cache=False), "must come before"),
        (lambda: model(input_ids=torch.tensor([[5, 6]]), guidance_scale=2.0), "class token"),
        (lambda: model(input_ids=torch.tensor([[64, 76, 5]]), attention_mask=torch.tensor([[0, 1, 1]])), "padding"),
        (lambda: model(input_ids=torch.zeros(1, L + 3, dtype=torch.long)), "longer"),
        (lambda: model(input_ids=torch.tensor([[64, 76]]), attention_mask=torch.ones(1, 1, 2, 2).bool()), "4-D"),
        (lambda: model.image_tokens_from_sequences(torch.zeros(2, 10, dtype=torch.long)), "shape"),
    ]
    for call, message in cases:
        with pytest.raises(ValueError, match=message):
            call()
