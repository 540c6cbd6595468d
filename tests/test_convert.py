"""Conversion of official MergeVQ checkpoints, tested on synthetic Lightning checkpoints with the official layout."""

import json

import pytest
import torch
import torch.nn.functional as F

from mergevq_hf import MergeVQConfig, MergeVQModel
from mergevq_hf.modeling_mergevq import current_parameter_name
from mergevq_hf.convert import (
    config_from_official_yaml,
    convert_official_checkpoint,
    main,
    official_config,
    official_state_dict_shapes,
)

# Tiny stand-ins for the three released variants: G (f8 CNN, 2-layer alignment head with LayerNorm), G+R (CNN,
# 3-layer head) and R (ViT patchify stem). All 32x32, L = 64, 10-bit codes.
TINY = dict(
    image_size=32, base_channels=16, num_res_blocks=1, norm_num_groups=8, hidden_size=32, num_hidden_layers=2,
    num_attention_heads=4, num_tokens=16, num_tokens_candidates=None, decoder_num_hidden_layers=1,
    decoder_num_attention_heads=4, codebook_bits=10, factorized_bits=[4, 6], alignment_dim=64,
    use_source_recovery=False,
)
VARIANTS = {
    "G": dict(TINY, channel_multipliers=[1, 2, 2], alignment_head="mlp2ln"),
    "G+R": dict(TINY, channel_multipliers=[1, 1, 2], alignment_head="mlp3"),
    "R": dict(TINY, stem_type="patchify", patch_size=4, channel_multipliers=[1, 2, 2], alignment_head="mlp3"),
}

# A tiny G as an official training YAML (LightningCLI layout of configs/gpu_s1/*.yaml). The official code fixes
# GroupNorm at 32 groups, so every width is 32 here.
TINY_G_YAML = """
model:
  class_path: taming.models.lfqgan_rep.MergeVQModel
  init_args:
    ddconfig: {double_z: false, z_channels: 10, resolution: 32, in_channels: 3, out_ch: 3, ch: 32, ch_mult: [1, 1, 1],
               num_res_blocks: 1, num_att_blocks: 2, num_heads: 4, dist_head: true, num_classes: 64, merge_num: 48}
    k2lconfig: {learn_source: false}
    lossconfig:
      target: taming.modules.losses.vqperceptual.VQLPIPSWithDiscriminator
      params: {cls_loss_weight: 0.1, codebook_weight: 0.1, commit_weight: 0.25}
    n_embed: 1024
    embed_dim: 10
    use_ema: true
"""


def tiny_config(variant):
    return MergeVQConfig(**VARIANTS[variant])


def official_state_dict(config, seed=0, ema=True):
    """Random tensors under the official names, plus EMA shadows and training-only parts as Lightning saves them."""
    generator = torch.Generator().manual_seed(seed)
    shapes = official_state_dict_shapes(config)
    state = {name: torch.randn(shape, generator=generator) * 0.1 for name, shape in shapes.items()}
    if ema:
        for name, shape in shapes.items():
            state["model_ema." + name.replace(".", "")] = torch.randn(shape, generator=generator) * 0.1
        state["model_ema.decay"], state["model_ema.num_updates"] = torch.tensor(0.999), torch.tensor(10, dtype=torch.int)
        state["model_ema.lossdiscriminatormain0weight"] = torch.randn(64, 3, 4, 4)
    state["loss.discriminator.main.0.weight"] = torch.randn(64, 3, 4, 4)
    state["loss.perceptual_loss.net.slice1.0.weight"] = torch.randn(64, 3, 3, 3)
    state["dist_model.embeddings.cls_token"] = torch.randn(1, 1, 768)
    return state


def save_lightning(path, state):
    torch.save({"epoch": 3, "global_step": 1200, "pytorch-lightning_version": "2.4.0", "state_dict": state}, path)
    return path


# ---- the official layout ------------------------------------------------------------------------------------------


def test_official_names_and_shapes_match_the_official_code():
    # Hand-derived from taming/modules/diffusionmodules/model_mergevq.py for the tiny G config (ch 16, mult [1,2,2]).
    expected = {
        "encoder.conv_in.weight": (16, 3, 3, 3),  # no bias
        "encoder.down.0.downsample.weight": (16, 16, 3, 3),
        "encoder.down.0.downsample.bias": (16,),
        "encoder.down.1.block.0.nin_shortcut.weight": (32, 16, 1, 1),
        "encoder.attn.cls_token": (1, 1, 32),
        "encoder.attn.blocks.0.attn.qkv.weight": (96, 32),
        "encoder.attn.blocks.1.ls2.gamma": (32,),
        "encoder.norm_out.weight": (32,),
        "encoder.conv_out.weight": (10, 32, 1, 1),  # a 1x1 conv on a fake sqrt(K) grid
        "encoder.dist_head.2.weight": (128,),  # Linear, GELU, LayerNorm, Linear
        "encoder.dist_head.3.weight": (64, 128),
        "decoder.conv_in.weight": (32, 10, 3, 3),
        "decoder.attn.pos_embed.weight": (32, 1, 3, 3),
        "decoder.attn.blocks.0.mlp.dwconv.weight": (128, 1, 3, 3),
        "decoder.up.2.upsample.conv1.weight": (128, 32, 3, 3),  # coarsest level; up[0] is the finest
        "decoder.up.1.block.1.conv2.weight": (32, 32, 3, 3),  # num_res_blocks + 1 blocks above the finest level
        "decoder.up.0.block.0.nin_shortcut.weight": (16, 32, 1, 1),
        "decoder.adaptive.0.gamma.weight": (32, 10),
        "decoder.conv_out.weight": (3, 16, 3, 3),
    }
    shapes = official_state_dict_shapes(tiny_config("G"))
    assert {name: tuple(shapes[name]) for name in expected} == expected
    assert "decoder.up.0.block.1.conv1.weight" not in shapes  # the finest level has num_res_blocks blocks
    assert not any("proj_out" in name or "source_recovery" in name for name in shapes)

    r_shapes = official_state_dict_shapes(tiny_config("R"))
    assert tuple(r_shapes["encoder.conv_in.0.weight"]) == (32, 3, 4, 4)  # Sequential(patchify conv, GroupNorm)
    assert tuple(r_shapes["encoder.conv_in.1.weight"]) == (32,)
    assert not any(name.startswith("encoder.down.") for name in r_shapes)


def test_released_variant_configs_have_the_official_shapes():
    shapes = {variant: official_state_dict_shapes(official_config(variant)) for variant in ("G", "G+R", "R")}
    assert tuple(shapes["G"]["encoder.down.3.block.3.conv2.weight"]) == (512, 512, 3, 3)
    assert tuple(shapes["G+R"]["decoder.up.4.upsample.conv1.weight"]) == (2048, 512, 3, 3)
    assert tuple(shapes["G+R"]["encoder.conv_out.weight"]) == (18, 512, 1, 1)
    assert tuple(shapes["R"]["encoder.conv_in.0.weight"]) == (768, 3, 16, 16)
    assert tuple(shapes["R"]["encoder.dist_head.4.weight"]) == (768, 3072)
    assert official_config("G+R", num_tokens=100).num_tokens == 100
    with pytest.raises(ValueError, match="unknown official variant"):
        official_config("GR")


# ---- conversion ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("variant", ["G", "G+R", "R"])
def test_ema_weights_land_under_our_names(tmp_path, variant):
    config = tiny_config(variant)
    state = official_state_dict(config)
    model = convert_official_checkpoint(save_lightning(tmp_path / "last.ckpt", state), config=config)
    ours = model.state_dict()
    for name in official_state_dict_shapes(config):
        ema = state["model_ema." + name.replace(".", "")]
        target = "encoder.proj_out." + name.split(".")[-1] if name.startswith("encoder.conv_out.") else current_parameter_name(name)
        torch.testing.assert_close(ours[target], ema.reshape(ours[target].shape), rtol=0, atol=0)
    assert ours["encoder.proj_out.weight"].shape == (10, 32)
    assert model.source_recovery is None and not model.training


def test_raw_weights_without_ema(tmp_path, caplog):
    config = tiny_config("G")
    state = official_state_dict(config)
    model = convert_official_checkpoint(save_lightning(tmp_path / "a.ckpt", state), config=config, use_ema=False)
    torch.testing.assert_close(model.state_dict()["decoder.conv_out.weight"], state["decoder.conv_out.weight"])

    no_ema = official_state_dict(config, ema=False)
    with caplog.at_level("WARNING"):
        model = convert_official_checkpoint(save_lightning(tmp_path / "b.ckpt", no_ema), config=config)
    assert "no EMA weights" in caplog.text
    torch.testing.assert_close(model.state_dict()["decoder.conv_out.weight"], no_ema["decoder.conv_out.weight"])


def test_bare_state_dict_and_safetensors(tmp_path):
    from safetensors.torch import save_file

    config = tiny_config("R")
    state = official_state_dict(config, ema=False)
    torch.save(state, tmp_path / "state.pt")
    save_file(state, tmp_path / "state.safetensors")
    a = convert_official_checkpoint(tmp_path / "state.pt", config=config)
    b = convert_official_checkpoint(tmp_path / "state.safetensors", config=config)
    torch.testing.assert_close(a.state_dict(), b.state_dict())


def test_missing_unexpected_and_mismatched_tensors_are_listed(tmp_path):
    config = tiny_config("G")
    state = official_state_dict(config, ema=False)
    del state["decoder.conv_out.bias"]
    state["encoder.rep_attn.blocks.0.norm1.weight"] = torch.ones(32)
    state["recovery.rec_tokens"] = torch.zeros(1, 64, 384)
    with pytest.raises(ValueError) as error:
        convert_official_checkpoint(save_lightning(tmp_path / "x.ckpt", state), config=config)
    message = str(error.value)
    assert "missing from the checkpoint: decoder.conv_out.bias" in message
    assert "encoder.rep_attn.blocks.0.norm1.weight" in message and "recovery.rec_tokens" in message
    assert "loss." not in message and "dist_model" not in message

    # G weights into the G+R config: same names at the top, other shapes deeper down.
    with pytest.raises(ValueError, match="shape mismatches: .*checkpoint .* model"):
        path = save_lightning(tmp_path / "y.ckpt", official_state_dict(config))
        convert_official_checkpoint(path, config=tiny_config("G+R"))


def test_bad_arguments(tmp_path):
    path = save_lightning(tmp_path / "x.ckpt", official_state_dict(tiny_config("G")))
    with pytest.raises(ValueError, match="exactly one of variant"):
        convert_official_checkpoint(path)
    with pytest.raises(ValueError, match="use_source_recovery=False"):
        convert_official_checkpoint(path, config=MergeVQConfig(**dict(VARIANTS["G"], use_source_recovery=True)))
    with pytest.raises(ValueError, match="num_tokens goes with variant"):
        convert_official_checkpoint(path, config=tiny_config("G"), num_tokens=9)


class NotATensor:
    pass


def test_checkpoints_are_read_with_weights_only(tmp_path):
    path = tmp_path / "pickled.ckpt"
    torch.save({"state_dict": official_state_dict(tiny_config("G")), "hyper_parameters": NotATensor()}, path)
    with pytest.raises(ValueError, match="weights_only=True"):
        convert_official_checkpoint(path, config=tiny_config("G"))


# ---- reference computations for the two places where the layouts differ ------------------------------------------


def test_conv_out_on_the_fake_grid_equals_our_linear_projection(tmp_path):
    config = tiny_config("G+R")
    state = official_state_dict(config, ema=False)
    model = convert_official_checkpoint(save_lightning(tmp_path / "x.ckpt", state), config=config)
    hidden = torch.randn(2, 1 + 16, 32)  # CLS + K = 16 merged tokens
    # Official: drop CLS, lay the K tokens out on a 4x4 grid, GroupNorm -> SiLU -> 1x1 conv, read the grid back.
    grid = hidden[:, 1:].transpose(1, 2).reshape(2, 32, 4, 4)
    grid = F.silu(F.group_norm(grid, 8, state["encoder.norm_out.weight"], state["encoder.norm_out.bias"], eps=1e-6))
    reference = F.conv2d(grid, state["encoder.conv_out.weight"], state["encoder.conv_out.bias"])
    reference = reference.flatten(2).transpose(1, 2)
    with torch.no_grad():
        torch.testing.assert_close(model.encoder.project(hidden), reference)


def test_upsampler_depth_to_space_is_dcr_like_the_official_code(tmp_path):
    config = tiny_config("G")
    state = official_state_dict(config, ema=False)
    model = convert_official_checkpoint(save_lightning(tmp_path / "x.ckpt", state), config=config)
    weight, bias = state["decoder.up.2.upsample.conv1.weight"], state["decoder.up.2.upsample.conv1.bias"]
    x = torch.randn(1, 32, 4, 4)
    conv = F.conv2d(x, weight, bias, padding=1)  # [1, 4 * 32, 4, 4]
    # DCR (official depth_to_space): output pixel (2h + i, 2w + j) of channel c is input channel (2i + j) * C + c.
    reference = torch.empty(1, 32, 8, 8)
    for i in range(2):
        for j in range(2):
            reference[:, :, i::2, j::2] = conv[:, (2 * i + j) * 32 : (2 * i + j + 1) * 32]
    with torch.no_grad():
        torch.testing.assert_close(model.decoder.up[2].upsample(x), reference)
        # nn.PixelShuffle is CRD (channel c * 4 + 2i + j): with the same weights it would scramble the channels ...
        assert not torch.allclose(F.pixel_shuffle(conv, 2), reference)
        # ... and needs the conv's output channels permuted from (i, j, c) to (c, i, j) order.
        order = torch.arange(4 * 32).view(4, 32).t().reshape(-1)
        crd = F.conv2d(x, weight[order], bias[order], padding=1)
        torch.testing.assert_close(F.pixel_shuffle(crd, 2), reference)


# ---- saved folder, YAML configs and the command line ---------------------------------------------------------------


def test_output_folder_round_trip_and_model_card(tmp_path):
    config = tiny_config("G")
    path = save_lightning(tmp_path / "epoch=99.ckpt", official_state_dict(config))
    model = convert_official_checkpoint(path, config=config, output_dir=tmp_path / "hf")
    loaded = MergeVQModel.from_pretrained(tmp_path / "hf")
    pixels = torch.rand(2, 3, 32, 32) * 2 - 1
    with torch.no_grad():
        a, b = model.encode(pixels), loaded.encode(pixels)
        torch.testing.assert_close(a.indices, b.indices, rtol=0, atol=0)
        torch.testing.assert_close(model.decode(a.indices, a.source_map), loaded.decode(b.indices, b.source_map))
    card = (tmp_path / "hf" / "README.md").read_text()
    assert "license: apache-2.0" in card and "arxiv:2504.00999" in card and "library_name: mergevq_hf" in card
    assert "epoch=99.ckpt" in card and "EMA weights" in card
    assert json.loads((tmp_path / "hf" / "config.json").read_text())["use_source_recovery"] is False


def test_config_from_official_yaml(tmp_path):
    (tmp_path / "g.yaml").write_text(TINY_G_YAML)
    config = config_from_official_yaml(tmp_path / "g.yaml")
    expected = dict(
        stem_type="cnn", base_channels=32, channel_multipliers=[1, 1, 1], num_res_blocks=1, hidden_size=32,
        num_hidden_layers=2, num_attention_heads=4, norm_num_groups=32, decoder_num_hidden_layers=2,
        decoder_num_attention_heads=4, decoder_extra_res_blocks=1, num_tokens=16, codebook_bits=10,
        alignment_head="mlp2ln", alignment_dim=64, alignment_loss_weight=0.1, use_source_recovery=False,
    )
    assert {name: getattr(config, name) for name in expected} == expected
    assert config_from_official_yaml(tmp_path / "g.yaml", num_tokens=25).num_tokens == 25

    r_yaml = TINY_G_YAML.replace("num_heads: 4,", "isotropic: 64, head_dim: 8, num_heads: 4,")
    (tmp_path / "r.yaml").write_text(r_yaml.replace("dist_head: true", "dist_head: layer3"))
    config = config_from_official_yaml(tmp_path / "r.yaml")
    assert (config.stem_type, config.patch_size, config.hidden_size, config.alignment_head) == ("patchify", 4, 64, "mlp3")
    assert (config.num_attention_heads, config.decoder_num_attention_heads) == (8, 4)  # max(width // head_dim, 4)

    magvit = TINY_G_YAML.replace("lfqgan_rep.MergeVQModel", "lfqgan.VQModel").replace("k2lconfig", "other")
    (tmp_path / "magvit.yaml").write_text(magvit)
    with pytest.raises(ValueError, match="not an official MergeVQ tokenizer config"):
        config_from_official_yaml(tmp_path / "magvit.yaml")


def test_command_line(tmp_path, capsys):
    (tmp_path / "g.yaml").write_text(TINY_G_YAML)
    path = save_lightning(tmp_path / "last.ckpt", official_state_dict(config_from_official_yaml(tmp_path / "g.yaml")))
    argv = [str(path), str(tmp_path / "out"), "--official-config", str(tmp_path / "g.yaml"), "--num-tokens", "25"]
    assert main(argv) == 0
    assert "saved MergeVQModel" in capsys.readouterr().out
    assert MergeVQModel.from_pretrained(tmp_path / "out").config.num_tokens == 25
    with pytest.raises(SystemExit):
        main([str(path), str(tmp_path / "out")])  # neither --variant nor --official-config
