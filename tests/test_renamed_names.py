"""One name per concept: K is `num_tokens`, L is `num_patches`, guidance is `guidance_scale` / `guidance_schedule`,
a source map is `source_map`. The former names (saved configs, keywords, the pipeline output field) still work,
with a FutureWarning, and give the same results (the CLI's `--guidance` alias: test_cli.py)."""

import json
import shutil
import warnings

import pytest
import torch

from mergevq_hf import MergeARConfig, MergeARForCausalLM, MergeVQConfig
from mergevq_hf.bundled import bundled_model_path
from mergevq_hf.configuration_randar import MergeRandARConfig
from mergevq_hf.modeling_randar import MergeRandARForCausalLM
from mergevq_hf.pipeline_mergevq import MergeVQReconstructionOutput

IGNORED_KEYS = ("_name_or_path", "transformers_version")


def _comparable(config) -> dict:
    return {key: value for key, value in config.to_dict().items() if key not in IGNORED_KEYS}


@pytest.fixture(scope="module")
def bundled_transformer():
    return bundled_model_path() / "transformer"


def test_bundled_config_uses_the_new_key_and_loads_without_warnings(bundled_transformer):
    saved = json.loads((bundled_transformer / "config.json").read_text())
    assert "num_tokens" in saved and "default_num_tokens" not in saved
    with warnings.catch_warnings():
        warnings.simplefilter("error", FutureWarning)
        config = MergeARConfig.from_pretrained(bundled_transformer)
    assert config.num_tokens == saved["num_tokens"]


def test_a_saved_config_with_default_num_tokens_loads_and_equals_the_new_one(bundled_transformer, tmp_path):
    """The bundled generator saved before the rename: same weights, config.json with the former key."""
    old_folder = tmp_path / "transformer"
    shutil.copytree(bundled_transformer, old_folder)
    saved = json.loads((old_folder / "config.json").read_text())
    saved["default_num_tokens"] = saved.pop("num_tokens")
    (old_folder / "config.json").write_text(json.dumps(saved))

    with pytest.warns(FutureWarning, match="default_num_tokens"):
        old = MergeARForCausalLM.from_pretrained(old_folder)
    new = MergeARForCausalLM.from_pretrained(bundled_transformer)
    assert old.config.num_tokens == saved["default_num_tokens"]
    assert _comparable(old.config) == _comparable(new.config)
    for (name, old_tensor), new_tensor in zip(old.state_dict().items(), new.state_dict().values()):
        torch.testing.assert_close(old_tensor, new_tensor, msg=name)

    old.config.save_pretrained(tmp_path / "resaved")  # saving writes the new key only
    resaved = json.loads((tmp_path / "resaved" / "config.json").read_text())
    assert resaved["num_tokens"] == saved["default_num_tokens"] and "default_num_tokens" not in resaved


def test_a_hand_written_old_config_loads_for_both_generators(tmp_path):
    for config_class in (MergeARConfig, MergeRandARConfig):
        folder = tmp_path / config_class.model_type
        folder.mkdir()
        old = {"model_type": config_class.model_type, "codebook_bits": 10, "factorized_bits": [4, 6], "grid_size": 8,
               "num_classes": 10, "hidden_size": 64, "num_attention_heads": 4, "default_num_tokens": 25}
        (folder / "config.json").write_text(json.dumps(old))
        with pytest.warns(FutureWarning, match="default_num_tokens"):
            loaded = config_class.from_pretrained(folder)
        expected = config_class(**{k: v for k, v in old.items() if k != "default_num_tokens"}, num_tokens=25)
        assert _comparable(loaded) == _comparable(expected)


def test_old_config_names_are_deprecated_aliases():
    config = MergeARConfig.from_preset("tiny")
    with pytest.warns(FutureWarning, match="num_patches"):
        assert config.num_image_tokens == config.num_patches == MergeVQConfig.from_preset("tiny").num_patches
    with pytest.warns(FutureWarning, match="num_tokens"):
        assert config.default_num_tokens == config.num_tokens == 16
    with pytest.warns(FutureWarning):
        config.default_num_tokens = 9
    assert config.num_tokens == 9
    for build in (
        lambda: MergeARConfig.from_preset("tiny", default_num_tokens=9),
        lambda: MergeARConfig.from_tokenizer_config(MergeVQConfig.from_preset("tiny"), default_num_tokens=9),
        lambda: MergeARConfig(default_num_tokens=9),
    ):
        with pytest.warns(FutureWarning):
            assert build().num_tokens == 9
    with pytest.warns(FutureWarning), pytest.raises(ValueError, match="disagree"):
        MergeARConfig(default_num_tokens=9, num_tokens=10)
    with pytest.warns(FutureWarning), pytest.raises(ValueError, match="num_tokens must be in"):
        MergeARConfig(default_num_tokens=1000)


def test_both_configs_validate_through_validate_architecture():
    """One style: `validate_architecture` raises ValueError naming the field, `check_field_types` a TypeError; an int
    is a fine value for a float field."""
    for config, field, bad in (
        (MergeVQConfig.from_preset("tiny"), "num_tokens", 0),
        (MergeVQConfig.from_preset("tiny"), "alignment_temperature", 0.0),
        (MergeARConfig.from_preset("tiny"), "num_tokens", 0),
        (MergeRandARConfig.from_preset("tiny"), "position_loss_weight", -1.0),
    ):
        config.validate_architecture()
        setattr(config, field, bad)
        with pytest.raises(ValueError, match=rf"{type(config).__name__}\.{field} must be"):
            config.validate_architecture()
    assert MergeVQConfig.from_preset("tiny", mlp_ratio=4).mlp_ratio == 4
    assert MergeARConfig(rope_theta=10000).rope_theta == 10000
    with pytest.raises(TypeError, match=r"MergeVQConfig\.mlp_ratio must be float"):
        MergeVQConfig(mlp_ratio="4")


def _tiny_mergear():
    torch.manual_seed(0)
    config = MergeARConfig.from_preset("tiny", grid_size=4, num_tokens=4, codebook_bits=6, factorized_bits=[3, 3])
    model = MergeARForCausalLM(config).eval()
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.normal_(0.0, 0.1)  # informative logits, so that guidance changes the samples
    return model


def test_cfg_scale_still_works_with_a_warning_and_samples_the_same():
    model = _tiny_mergear()
    kwargs = {"class_labels": [1, 2, 3], "do_sample": True, "top_k": 0}

    def sample(**guidance):
        generators = [torch.Generator().manual_seed(seed) for seed in range(3)]
        return model.generate(**kwargs, generators=generators, **guidance)

    new = sample(guidance_scale=3.0)
    with pytest.warns(FutureWarning, match="cfg_scale"):
        old = sample(cfg_scale=3.0)
    assert torch.equal(old, new) and not torch.equal(new, sample())
    prompt = model.build_prompt([1, 2], 3)
    with pytest.warns(FutureWarning, match="cfg_scale"):
        old_logits = model(input_ids=prompt, cfg_scale=3.0, use_cache=False).logits
    torch.testing.assert_close(old_logits, model(input_ids=prompt, guidance_scale=3.0, use_cache=False).logits)
    with pytest.warns(FutureWarning), pytest.raises(ValueError, match="disagree"):
        model.generate(class_labels=[1], guidance_scale=2.0, cfg_scale=3.0)


def test_random_order_cfg_keywords_still_work_with_a_warning_and_sample_the_same():
    torch.manual_seed(0)
    model = MergeRandARForCausalLM(MergeRandARConfig.from_preset("tiny", grid_size=4, num_tokens=4)).eval()
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.normal_(0.0, 0.1)

    def sample(**guidance):
        generator = torch.Generator().manual_seed(5)
        return model.generate([1, 2], generator=generator, **guidance).image_tokens

    new = sample(guidance_scale=3.0, guidance_schedule="linear")
    with pytest.warns(FutureWarning) as warned:
        old = sample(cfg_scale=3.0, cfg_schedule="linear")
    assert ["cfg_scale", "cfg_schedule"] == [str(w.message).split("`")[1] for w in warned]
    assert torch.equal(old, new)
    with pytest.warns(FutureWarning), pytest.raises(ValueError, match="disagree"):
        model.generate([1], guidance_schedule="linear", cfg_schedule="constant")


def test_reconstruction_output_source_maps_is_a_deprecated_alias(make_tiny_pipeline):
    pipe = make_tiny_pipeline()
    output = pipe.reconstruct(torch.rand(2, 3, 32, 32), num_tokens=9, output_type="pt")
    assert isinstance(output, MergeVQReconstructionOutput) and output.source_map.shape == (2, 64)
    with pytest.warns(FutureWarning, match="source_map"):
        assert output.source_maps is output.source_map
    assert list(output.keys()) == ["images", "indices", "source_map"]
