"""The transformers model contract on MergeVQModel, MergeARForCausalLM and MergeRandARForCausalLM: hidden states and
attention weights, eager vs SDPA, return_dict, gradient checkpointing, vocab_size, configs (presets that pair, field
types), Auto classes and clear errors for bad checkpoints (tiny random models)."""

import json
from pathlib import Path

import pytest
import torch
from transformers import AutoModel, AutoModelForCausalLM

from mergevq_hf import (
    MergeARConfig,
    MergeARForCausalLM,
    MergeRandARConfig,
    MergeRandARForCausalLM,
    MergeVQConfig,
    MergeVQModel,
)
from mergevq_hf.bundled import bundled_model_path
from mergevq_hf.training.trainer_mergear import mergear_config_for_tokenizer

NO_DROPOUT = {"token_dropout": 0.0, "resid_dropout": 0.0, "ffn_dropout": 0.0, "class_dropout_prob": 0.0}
SMALL_GRID = {"grid_size": 4, "num_tokens": 4}  # L = 16: fast on 2 cores


def randomized(model):
    # The output heads start at zero; random weights everywhere make logits and gradients informative.
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.normal_(0.0, 0.1)
    return model


def mergear(**overrides):
    torch.manual_seed(0)
    config = MergeARConfig.from_preset("tiny", **{**NO_DROPOUT, **SMALL_GRID, **overrides})
    return randomized(MergeARForCausalLM(config)).eval()


def randar(**overrides):
    torch.manual_seed(0)
    config = MergeRandARConfig.from_preset("tiny", **{**NO_DROPOUT, **SMALL_GRID, **overrides})
    return randomized(MergeRandARForCausalLM(config)).eval()


def mergevq():
    torch.manual_seed(0)
    return MergeVQModel(MergeVQConfig.from_preset("tiny")).eval()


def images(batch=2):
    return torch.rand(batch, 3, 32, 32, generator=torch.Generator().manual_seed(0)) * 2 - 1


def teacher():
    return torch.randn(2, MergeVQConfig.from_preset("tiny").alignment_dim, generator=torch.Generator().manual_seed(3))


def ar_labels():
    # Raster codes with repeats (merged parents cover several positions), so the sparsity mask is not plain causal.
    generator = torch.Generator().manual_seed(1)
    palette = torch.randint(0, 1024, (2, 5), generator=generator)
    return palette.gather(1, torch.randint(0, 5, (2, 16), generator=generator))


def randar_batch():
    generator = torch.Generator().manual_seed(2)
    codes = torch.randint(0, 1024, (2, 3), generator=generator)
    positions = torch.stack([torch.randperm(16, generator=generator)[:3] for _ in range(2)])
    return dict(class_labels=[1, 2], labels=codes, token_positions=positions)


# Each model's training entry, as (build, call): call(model, **flags) runs it.
TRAINING_ENTRIES = {
    "mergear": (mergear, lambda model, **flags: model(class_labels=[1, 2], num_tokens=4, labels=ar_labels(), **flags)),
    "randar": (randar, lambda model, **flags: model(**randar_batch(), **flags)),
    "mergevq": (mergevq, lambda model, **flags: model(images(), num_tokens=9, teacher_features=teacher(), **flags)),
}


# ---- hidden states ------------------------------------------------------------------------------------------------


def test_mergear_hidden_states_are_embeddings_then_every_layer():
    model = mergear()
    out = model(class_labels=[1, 2], num_tokens=4, labels=ar_labels(), output_hidden_states=True)
    sequence = torch.cat([model.build_prompt([1, 2], 4), ar_labels()[:, :-1]], dim=1)  # [cls, M(K)] + labels[:-1]
    assert len(out.hidden_states) == model.config.num_hidden_layers + 1
    assert all(h.shape == (2, 17, model.config.hidden_size) for h in out.hidden_states)
    torch.testing.assert_close(out.hidden_states[0], model.model.embed(sequence))
    backbone = model.model(sequence, use_cache=False, output_hidden_states=True)
    torch.testing.assert_close(out.hidden_states[-1], backbone.last_hidden_state)  # after the final norm
    for ours, theirs in zip(out.hidden_states, backbone.hidden_states):
        torch.testing.assert_close(ours, theirs)
    assert out.attentions is None and model(class_labels=[1, 2], num_tokens=4, labels=ar_labels()).hidden_states is None
    # The generation entry records the sequence it ran (here the prompt).
    step = model(input_ids=model.build_prompt([1, 2], 4), use_cache=False, output_hidden_states=True)
    assert [h.shape for h in step.hidden_states] == [(2, 2, model.config.hidden_size)] * 3


def test_randar_hidden_states_cover_the_teacher_forced_sequence():
    model = randar()
    out = model(**randar_batch(), output_hidden_states=True)
    assert len(out.hidden_states) == model.config.num_hidden_layers + 1
    assert all(h.shape == (2, 7, model.config.hidden_size) for h in out.hidden_states)  # [cls, M(K), P, y, P, y, P]
    input_ids, _ = model.build_sequence(**randar_batch())
    torch.testing.assert_close(out.hidden_states[0], model.model.embed(input_ids))


def test_mergevq_hidden_states_shrink_as_tokens_merge():
    model = mergevq()
    encoded = model.encode(images(), num_tokens=9, output_hidden_states=True)
    states = encoded.hidden_states
    assert len(states) == model.config.num_hidden_layers + 1
    lengths = [h.shape[1] for h in states]
    assert lengths[0] == 1 + 64 and lengths[-1] == 1 + 9 and lengths == sorted(lengths, reverse=True)
    torch.testing.assert_close(states[-1][:, 0], encoded.cls_token)  # the last one is the encoder's output
    torch.testing.assert_close(model.encoder.project(states[-1]), encoded.latents)
    forward = model(images(), num_tokens=9, output_hidden_states=True)
    for ours, theirs in zip(forward.hidden_states, states):
        torch.testing.assert_close(ours, theirs)
    features = model.get_image_features(images(), output_hidden_states=True)  # no merging: all L tokens throughout
    assert [h.shape for h in features.hidden_states] == [(2, 65, 32)] * 3
    torch.testing.assert_close(features.hidden_states[-1], features.last_hidden_state)
    torch.testing.assert_close(features.pooler_output, features.last_hidden_state[:, 0])
    mean = model.get_image_features(images(), pooling="mean")
    torch.testing.assert_close(mean.pooler_output, mean.last_hidden_state[:, 1:].mean(1))


# ---- attention weights: eager vs SDPA -----------------------------------------------------------------------------


@pytest.mark.parametrize("name", TRAINING_ENTRIES)
def test_output_attentions_needs_eager_attention(name):
    build, call = TRAINING_ENTRIES[name]
    model = build()
    assert model.config._attn_implementation == "sdpa"
    with pytest.raises(ValueError, match="output_attentions=True needs eager attention.*set_attn_implementation"):
        call(model, output_attentions=True)


@pytest.mark.parametrize("name", TRAINING_ENTRIES)
def test_eager_attention_equals_sdpa_and_returns_distributions(name):
    build, call = TRAINING_ENTRIES[name]
    model = build()
    reference = call(model)
    model.set_attn_implementation("eager")
    assert model.config._attn_implementation == "eager"
    eager = call(model, output_attentions=True)
    torch.testing.assert_close(eager.loss, reference.loss, rtol=1e-5, atol=1e-6)
    layers = model.config.num_hidden_layers
    assert len(eager.attentions) == layers
    for weights in eager.attentions:
        assert weights.dim() == 4 and weights.shape[-1] == weights.shape[-2]
        torch.testing.assert_close(weights.sum(-1), torch.ones(weights.shape[:-1]))
    model.set_attn_implementation("sdpa")
    torch.testing.assert_close(call(model).loss, reference.loss, rtol=1e-5, atol=1e-6)


def test_mergear_eager_weights_respect_the_sparsity_mask():
    model = mergear(repeat_window=1)
    model.set_attn_implementation("eager")
    sequence = torch.cat([model.build_prompt([1, 2], 4), ar_labels()[:, :-1]], dim=1)
    mask = model.model._attention_mask(sequence, None, None, 0)  # True = visible
    assert not mask.all(-1).all()  # the repeats really hide entries
    out = model.model(sequence, use_cache=False, output_attentions=True)
    for weights in out.attentions:
        assert weights.shape == (2, model.config.num_attention_heads, 17, 17)
        assert torch.all(weights.masked_select(~mask.expand_as(weights)) == 0)


def test_mergear_eager_generation_equals_sdpa_generation():
    model = mergear()
    sdpa = model.generate(class_labels=[1, 2], do_sample=False)
    model.set_attn_implementation("eager")
    assert torch.equal(model.generate(class_labels=[1, 2], do_sample=False), sdpa)
    guided = model.generate(class_labels=[1, 2], do_sample=False, guidance_scale=2.0)
    model.set_attn_implementation("sdpa")
    assert torch.equal(model.generate(class_labels=[1, 2], do_sample=False, guidance_scale=2.0), guided)


@pytest.mark.parametrize("name", TRAINING_ENTRIES)
def test_attn_implementation_eager_at_load_time(name, tmp_path):
    build, call = TRAINING_ENTRIES[name]
    model = build()
    model.save_pretrained(tmp_path)
    assert type(model).from_pretrained(tmp_path).config._attn_implementation == "sdpa"
    loaded = type(model).from_pretrained(tmp_path, attn_implementation="eager").eval()
    assert loaded.config._attn_implementation == "eager"
    out = call(loaded, output_attentions=True)
    assert len(out.attentions) == model.config.num_hidden_layers
    torch.testing.assert_close(out.loss, call(model).loss, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("name", TRAINING_ENTRIES)
def test_gradients_reach_the_returned_hidden_states_and_attentions(name):
    build, call = TRAINING_ENTRIES[name]
    model = build().train()
    model.set_attn_implementation("eager")
    out = call(model, output_hidden_states=True, output_attentions=True)
    first_state, first_weights = out.hidden_states[0], out.attentions[0]
    first_state.retain_grad(), first_weights.retain_grad()
    out.loss.backward()
    assert first_state.grad is not None and first_state.grad.abs().sum() > 0
    assert first_weights.grad is not None and first_weights.grad.abs().sum() > 0


# ---- return_dict --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", TRAINING_ENTRIES)
def test_return_dict_false_gives_a_tuple(name):
    build, call = TRAINING_ENTRIES[name]
    model = build()
    as_tuple = call(model, return_dict=False)
    assert isinstance(as_tuple, tuple)
    torch.testing.assert_close(as_tuple[0], call(model).loss)


def test_backbones_and_features_honour_return_dict():
    model = mergear()
    prompt = model.build_prompt([1, 2], 4)
    hidden, *_ = model.model(prompt, use_cache=False, return_dict=False)
    torch.testing.assert_close(hidden, model.model(prompt, use_cache=False).last_hidden_state)
    step = model(input_ids=prompt, use_cache=False, return_dict=False)
    assert isinstance(step, tuple) and step[0].shape == (2, 2, 1024)
    vq = mergevq()
    last, pooled = vq.get_image_features(images(), return_dict=False)
    torch.testing.assert_close(pooled, last[:, 0])


# ---- gradient checkpointing ---------------------------------------------------------------------------------------


def _gradients(model, call):
    model.zero_grad()
    call(model).loss.backward()
    return {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}


# A module inside a checkpointed block: it runs again in the backward pass when checkpointing is on.
RECOMPUTED_MODULE = {
    "mergear": lambda model: model.model.layers[0].mlp,
    "randar": lambda model: model.model.layers[0].mlp,
    "mergevq": lambda model: model.encoder.transformer.blocks[0].mlp,
}


@pytest.mark.parametrize("name", TRAINING_ENTRIES)
def test_gradient_checkpointing_recomputes_and_keeps_the_gradients(name):
    build, call = TRAINING_ENTRIES[name]
    model = build().train()
    assert model.supports_gradient_checkpointing
    calls = []
    # A pre-hook: the recomputation stops as soon as it has rebuilt the last tensor backward needs.
    RECOMPUTED_MODULE[name](model).register_forward_pre_hook(lambda *args: calls.append(1))
    reference = _gradients(model, call)
    plain_calls = len(calls)
    model.activation_checkpointing_enable()  # transformers 5's name for gradient_checkpointing_enable
    assert model.is_activation_checkpointing
    calls.clear()
    checkpointed = _gradients(model, call)
    assert len(calls) == 2 * plain_calls  # forward, then the recomputation in backward
    assert checkpointed.keys() == reference.keys() and len(reference) == len(list(model.parameters()))
    for key in reference:
        torch.testing.assert_close(checkpointed[key], reference[key], rtol=1e-5, atol=1e-6, msg=key)


# ---- vocab_size and configs ---------------------------------------------------------------------------------------


def test_vocab_size_is_the_width_of_the_logits_generate_scores():
    model = mergear()
    assert model.config.vocab_size == model.config.codebook_size == 1024
    out = model.generate(class_labels=[1, 2], do_sample=False, output_scores=True, return_dict_in_generate=True)
    assert out.scores[0].shape == (2, model.config.vocab_size)
    # transformers reshapes scores by config.vocab_size here.
    transition = model.compute_transition_scores(out.sequences, out.scores, normalize_logits=True)
    assert transition.shape == (2, 16) and bool((transition <= 0).all())


def test_tiny_presets_pair_and_from_tokenizer_config_follows_the_tokenizer():
    tokenizer = MergeVQConfig.from_preset("tiny")
    for config_class in (MergeARConfig, MergeRandARConfig):
        tiny = config_class.from_preset("tiny")
        assert (tiny.codebook_bits, tiny.factorized_bits, tiny.grid_size, tiny.num_tokens) == (
            tokenizer.codebook_bits, tokenizer.factorized_bits, tokenizer.grid_size, tokenizer.num_tokens
        )
    other = MergeVQConfig.from_preset("tiny", codebook_bits=8, factorized_bits=[3, 5], num_tokens=25)
    config = MergeARConfig.from_tokenizer_config(other, num_classes=7, hidden_size=32)
    assert (config.codebook_bits, config.factorized_bits, config.grid_size) == (8, [3, 5], 8)
    assert (config.num_tokens, config.num_classes, config.hidden_size) == (25, 7, 32)
    assert MergeARConfig.from_tokenizer_config(other, num_tokens=9).num_tokens == 9
    large = MergeRandARConfig.from_tokenizer_config(MergeVQConfig.from_preset("G+R"), preset="L")
    assert isinstance(large, MergeRandARConfig) and (large.codebook_bits, large.grid_size) == (18, 16)
    # The trainer's helper is the same implementation.
    assert mergear_config_for_tokenizer("tiny", other, num_classes=7).to_dict() == (
        MergeARConfig.from_tokenizer_config(other, num_classes=7).to_dict()
    )
    with pytest.raises(ValueError, match="grid_size is taken from the tokenizer"):
        MergeARConfig.from_tokenizer_config(other, grid_size=4)
    with pytest.raises(TypeError, match="tokenizer_config must be a MergeVQConfig"):
        MergeARConfig.from_tokenizer_config({"codebook_bits": 10})


def test_bundled_transformer_config_loads_unchanged_and_fits_its_tokenizer():
    folder = Path(bundled_model_path())
    saved = json.loads((folder / "transformer" / "config.json").read_text())
    config = MergeARConfig.from_pretrained(folder / "transformer")
    for key, value in saved.items():
        if key not in ("architectures", "auto_map", "transformers_version", "dtype", "model_type"):
            assert getattr(config, key) == value, key
    matched = MergeARConfig.from_tokenizer_config(MergeVQConfig.from_pretrained(folder / "vq_model"))
    fields = ("codebook_bits", "factorized_bits", "grid_size", "num_tokens")
    assert [getattr(matched, name) for name in fields] == [getattr(config, name) for name in fields]


@pytest.mark.parametrize(
    "config_class, field, value",
    [
        (MergeVQConfig, "proportional_attention", "no"),  # a non-empty string would count as true
        (MergeVQConfig, "entropy_temperature", "hot"),
        (MergeVQConfig, "mlp_ratio", None),
        (MergeVQConfig, "channel_multipliers", [1, "2", 2]),
        (MergeVQConfig, "num_tokens_probs", "uniform"),
        (MergeARConfig, "rope_theta", "big"),
        (MergeARConfig, "use_cache", "yes"),
        (MergeARConfig, "factorized_bits", [4, "6"]),
        (MergeARConfig, "hidden_size", 64.0),
        (MergeARConfig, "num_classes", True),
        (MergeRandARConfig, "position_loss_weight", "1"),
    ],
)
def test_config_fields_of_the_wrong_type_are_named(config_class, field, value, tmp_path):
    with pytest.raises(TypeError, match=rf"{config_class.__name__}\.{field} must be"):
        config_class.from_preset("tiny", **{field: value})
    # The same from a saved config.json.
    config_class.from_preset("tiny").save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**saved, field: value}))
    with pytest.raises(TypeError, match=rf"{field} must be"):
        config_class.from_pretrained(tmp_path)


def test_ints_are_accepted_in_float_fields():
    assert MergeARConfig.from_preset("tiny", rope_theta=10000).rope_theta == 10000
    assert MergeVQConfig.from_preset("tiny", mlp_ratio=2).mlp_ratio == 2
    with pytest.raises(ValueError, match="rope_theta must be > 0"):
        MergeARConfig.from_preset("tiny", rope_theta=0)


# ---- Auto classes and checkpoints ---------------------------------------------------------------------------------


def test_randar_loads_through_automodel_not_automodel_for_causal_lm(tmp_path):
    model = randar()
    assert not model.can_generate()  # its own generate loop, not GenerationMixin
    model.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["auto_map"]["AutoModel"] == "modeling_randar.MergeRandARForCausalLM"
    assert "AutoModelForCausalLM" not in config["auto_map"]
    loaded = AutoModel.from_pretrained(tmp_path).eval()
    assert type(loaded) is MergeRandARForCausalLM
    torch.testing.assert_close(loaded(**randar_batch()).loss, model(**randar_batch()).loss)
    with pytest.raises(ValueError, match="Unrecognized configuration class"):
        AutoModelForCausalLM.from_pretrained(tmp_path)
    assert type(AutoModelForCausalLM.from_config(mergear().config)) is MergeARForCausalLM


@pytest.mark.parametrize("build", [mergear, randar])
def test_bad_transformer_checkpoints_give_clear_errors(build, tmp_path):
    model = build()
    model.save_pretrained(tmp_path)
    weights = (tmp_path / "model.safetensors").read_bytes()
    (tmp_path / "model.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(OSError, match="not a valid safetensors file"):
        type(model).from_pretrained(tmp_path)
    (tmp_path / "model.safetensors").write_bytes(weights)
    saved = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**saved, "hidden_size": 32}))
    with pytest.raises(ValueError, match=f"do not match the {type(model).__name__} config"):
        type(model).from_pretrained(tmp_path)
