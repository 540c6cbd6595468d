"""Convert an official MergeVQ checkpoint (github.com/ApexGen-X/MergeVQ, Lightning) to a `MergeVQModel` folder.

What the official checkpoint holds (facts read from `taming/models/lfqgan_rep.py`, `taming/modules/ema.py` and
`taming/modules/diffusionmodules/model_mergevq.py`; no code is taken from there):

- `state_dict` of the LightningModule: `encoder.*` and `decoder.*` (the tokenizer), `loss.*` (PatchGAN discriminator
  and LPIPS), `dist_model.*` (the frozen DINOv2 teacher) and `quantize.*` (LFQ: no parameters, at most derived
  constant buffers). `recovery.*` is empty in every released config (`learn_source: False`).
- With `use_ema: True`, `model_ema.*`: LitEma's shadow of every trainable parameter, stored as a buffer whose name is
  the parameter name with the dots removed (`encoder.conv_in.weight` -> `model_ema.encoderconv_inweight`), plus
  `model_ema.decay` / `model_ema.num_updates`. The released models are evaluated with these EMA weights.

Mapping: the official names are `MergeVQModel`'s checkpoint names (`checkpoint_parameter_name`: its modules are
renamed for what they are, e.g. the official `encoder.attn` ViT stack is `encoder.transformer`), except the encoder's
output projection, a 1x1 `Conv2d` `encoder.conv_out` [bits, dim, 1, 1] in the official code (run on a fake
sqrt(K) x sqrt(K) grid) and a `Linear` `encoder.proj_out` [bits, dim] here. The decoder's upsamplers need no channel permutation: both codes use
DCR depth-to-space (docs/design.md §1.6; `nn.PixelShuffle`, CRD, would need one).

Source recovery: official checkpoints carry no trained source-recovery weights, so converted models are built with
`use_source_recovery=False` (a randomly initialised predictor would silently produce wrong source maps). Train one
afterwards by loading the folder with `use_source_recovery=True`.
"""

import argparse
import logging
import pickle
from pathlib import Path

import torch
import yaml

from ..configuration_mergevq import MergeVQConfig
from ..hub import tokenizer_model_card
from ..modeling_mergevq import MergeVQModel, checkpoint_parameter_name

logger = logging.getLogger(__name__)

VARIANTS = ("G", "G+R", "R")
EMA_PREFIX = "model_ema."
# Training-only parts of the LightningModule (see the module docstring). Leftover `model_ema.*` shadows are
# ignorable too: each one shadows a raw parameter of the same checkpoint, which is checked under its own name.
IGNORED_PREFIXES = ("loss.", "dist_model.", "quantize.", EMA_PREFIX)
_MAX_LISTED = 20


def official_name(name: str) -> str:
    """Our parameter name -> the official one: our checkpoint name, but for the encoder's output projection."""
    if name.startswith("encoder.proj_out."):
        return "encoder.conv_out." + name[len("encoder.proj_out.") :]
    return checkpoint_parameter_name(name)


def official_config(variant: str, num_tokens: int | None = None) -> MergeVQConfig:
    """The `MergeVQConfig` of a released variant (`"G"`, `"G+R"` or `"R"`, all d64), without source recovery."""
    if variant not in VARIANTS:
        raise ValueError(f"unknown official variant {variant!r}; expected one of {VARIANTS}")
    overrides = {} if num_tokens is None else {"num_tokens": num_tokens}
    return MergeVQConfig.from_preset(variant, use_source_recovery=False, **overrides)


def config_from_official_yaml(path, num_tokens: int | None = None) -> MergeVQConfig:
    """
    Build the `MergeVQConfig` of an official training or evaluation YAML (`configs/gpu_s1/...`), e.g. the d32 and
    d96 sizes that have no preset. `num_tokens` defaults to L - `merge_num` of the YAML. The training-only K
    distribution (`cand_distribution`) is not carried over.

    Head counts are not stored in the weights, so prefer the *training* YAML of a checkpoint: the released R
    evaluation YAMLs omit `head_dim` and so describe an 8-head encoder, while R was trained with 12 heads.
    """
    document = yaml.safe_load(Path(path).read_text())
    model = (document or {}).get("model") or {}
    target = str(model.get("class_path") or model.get("target") or "")
    args = model.get("init_args") or model.get("params") or {}
    # Both Lightning classes build MergeVQEncoder/MergeVQDecoder when k2lconfig is set (Open-MAGVIT2 layers otherwise).
    if not target.endswith(("lfqgan_rep.MergeVQModel", "lfqgan.VQModel")) or not {"ddconfig", "k2lconfig"} <= set(args):
        raise ValueError(
            f"{path} is not an official MergeVQ tokenizer config (lfqgan_rep.MergeVQModel or lfqgan.VQModel with a "
            f"k2lconfig), got {target!r}"
        )
    dd, loss = args["ddconfig"], (args.get("lossconfig") or {}).get("params") or {}
    k2l = args["k2lconfig"] or {}
    if k2l.get("learn_source") or k2l.get("cnn_decoder"):
        raise ValueError("learn_source (the official source-recovery stub) and cnn_decoder cannot be converted")
    if dd.get("num_rep_blocks", 0) or isinstance(dd["num_res_blocks"], list):
        raise ValueError("num_rep_blocks > 0 and per-level num_res_blocks lists have no MergeVQModel equivalent")

    multipliers = list(dd["ch_mult"])
    decoder_width = dd["ch"] * multipliers[-1]
    isotropic = dd.get("isotropic") or False
    # `isotropic: 768` sets the ViT width; `isotropic: True` keeps the CNN width (official MergeVQEncoder).
    width = int(isotropic) if isotropic and int(isotropic) > 1 else decoder_width
    grid = dd["resolution"] // 2 ** (len(multipliers) - 1)

    def heads(dim):  # official: num_heads, or max(dim // head_dim, num_heads) when head_dim is set
        num_heads = dd.get("num_heads", 8)
        return num_heads if dd.get("head_dim") is None else max(dim // dd["head_dim"], num_heads)

    if num_tokens is None:
        if dd.get("merge_num") is None:
            raise ValueError(f"{path} sets no merge_num; pass num_tokens")
        num_tokens = grid**2 - dd["merge_num"]
    dist_head = dd.get("dist_head")
    bits = dd.get("z_channels", 18)
    return MergeVQConfig(
        image_size=dd["resolution"], num_channels=dd.get("in_channels", 3),
        stem_type="patchify" if isotropic else "cnn", patch_size=2 ** (len(multipliers) - 1),
        base_channels=dd["ch"], channel_multipliers=multipliers, num_res_blocks=dd["num_res_blocks"],
        norm_num_groups=32, hidden_size=width, num_hidden_layers=dd.get("num_att_blocks", 12),
        num_attention_heads=heads(width), decoder_num_hidden_layers=dd.get("num_att_blocks", 12),
        decoder_num_attention_heads=heads(decoder_width), decoder_extra_res_blocks=dd.get("num_res_extra", 1),
        num_tokens=num_tokens, codebook_bits=bits, factorized_bits=[6, bits - 6] if bits > 6 else None,
        alignment_head="none" if not dist_head else ("mlp3" if dist_head == "layer3" else "mlp2ln"),
        alignment_dim=dd.get("num_classes") or width,
        alignment_loss_weight=loss.get("cls_loss_weight", 1.0), entropy_loss_weight=loss.get("codebook_weight", 0.1),
        commitment_loss_weight=loss.get("commit_weight", 0.25),
        sample_entropy_weight=args.get("sample_minimization_weight", 1.0),
        batch_entropy_weight=args.get("batch_maximization_weight", 1.0),
        use_source_recovery=False,
    )


def _layout(config: MergeVQConfig) -> dict[str, tuple[str, torch.Size]]:
    """Official tensor name -> (our parameter name, official shape), read off a meta-device model."""
    _check_config(config)
    with torch.device("meta"):
        model = MergeVQModel(config)
    layout = {}
    for name, tensor in model.state_dict().items():
        shape = tensor.shape
        if name == "encoder.proj_out.weight":
            shape = torch.Size([*shape, 1, 1])  # a 1x1 conv officially
        layout[official_name(name)] = (name, shape)
    return layout


def official_state_dict_shapes(config: MergeVQConfig) -> dict[str, torch.Size]:
    """Names and shapes of the tokenizer tensors an official checkpoint holds for `config`."""
    return {name: shape for name, (_, shape) in _layout(config).items()}


def load_official_checkpoint(path) -> dict[str, torch.Tensor]:
    """State dict of an official Lightning `.ckpt` (read `weights_only`), a state-dict `.pt` or `.safetensors`."""
    path = Path(path)
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(path)
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        raise ValueError(
            f"{path} holds objects that torch.load(weights_only=True) refuses to unpickle ({error}). Only tensors and "
            "plain containers are read, by design: extract the state dict in an environment you trust "
            "(torch.save(ckpt['state_dict'], ...)) or export it to .safetensors, then convert that file."
        ) from error
    state_dict = checkpoint.get("state_dict", checkpoint) if isinstance(checkpoint, dict) else None
    if not isinstance(state_dict, dict) or not all(isinstance(v, torch.Tensor) for v in state_dict.values()):
        raise ValueError(f"{path} is neither a Lightning checkpoint with a 'state_dict' nor a state dict of tensors")
    return state_dict


def _listing(names) -> str:
    names = sorted(names)
    shown = ", ".join(names[:_MAX_LISTED])
    return shown + (f", ... ({len(names) - _MAX_LISTED} more)" if len(names) > _MAX_LISTED else "")


def convert_state_dict(official: dict, config: MergeVQConfig, use_ema: bool = True) -> tuple[dict, bool]:
    """
    Map an official state dict onto `MergeVQModel(config)`'s parameter names. Returns `(state_dict, used_ema)`:
    the EMA weights are taken when `use_ema` and the checkpoint has them, else the raw weights.

    Raises ValueError listing every missing tensor, every tensor with no place in the model (training-only parts
    excepted, see `IGNORED_PREFIXES`) and every shape mismatch.
    """
    expected = _layout(config)
    ema = {name[len(EMA_PREFIX) :]: tensor for name, tensor in official.items() if name.startswith(EMA_PREFIX)}
    used_ema = use_ema and any(name.replace(".", "") in ema for name in expected)
    if use_ema and not used_ema:
        logger.warning("the checkpoint has no EMA weights (model_ema.*); converting the raw weights")

    converted, missing, mismatched = {}, [], []
    for name, (our_name, shape) in expected.items():
        source_name = EMA_PREFIX + name.replace(".", "") if used_ema else name
        tensor = ema.get(name.replace(".", "")) if used_ema else official.get(name)
        if tensor is None:
            missing.append(source_name)
        elif tensor.shape != shape:
            mismatched.append(f"{source_name}: checkpoint {tuple(tensor.shape)}, model {tuple(shape)}")
        else:
            converted[our_name] = tensor.reshape(tensor.shape[:2]) if name == "encoder.conv_out.weight" else tensor
    unexpected = [name for name in official if name not in expected and not name.startswith(IGNORED_PREFIXES)]

    problems = []
    if missing:
        problems.append(f"missing from the checkpoint: {_listing(missing)}")
    if unexpected:
        problems.append(f"in the checkpoint but not in MergeVQModel: {_listing(unexpected)}")
    if mismatched:
        problems.append(f"shape mismatches: {_listing(mismatched)}")
    if problems:
        raise ValueError(
            "the checkpoint does not match this MergeVQConfig (wrong variant or config?):\n  " + "\n  ".join(problems)
        )
    return converted, used_ema


def _check_config(config: MergeVQConfig) -> None:
    if config.use_source_recovery:
        raise ValueError(
            "official checkpoints have no source-recovery weights: build the config with use_source_recovery=False"
        )


def convert_official_checkpoint(
    path,
    variant: str | None = None,
    output_dir=None,
    use_ema: bool = True,
    num_tokens: int | None = None,
    config: MergeVQConfig | None = None,
) -> MergeVQModel:
    """
    Read an official MergeVQ checkpoint and return the `MergeVQModel` holding its weights (EMA weights when present
    and `use_ema`); with `output_dir`, also save it there (`save_pretrained` + a model card).

    Args:
        path: official Lightning `.ckpt`, a bare state dict (`.pt`) or a `.safetensors` state dict.
        variant: `"G"`, `"G+R"` or `"R"` (the released d64 configs); or pass `config` instead, e.g. from
            `config_from_official_yaml` for the d32 / d96 sizes.
        num_tokens: with `variant`, the model's default K (`config.num_tokens`); `encode` accepts any K later.
    """
    if (variant is None) == (config is None):
        raise ValueError("pass exactly one of variant ('G', 'G+R', 'R') and config")
    if config is not None and num_tokens is not None:
        raise ValueError("num_tokens goes with variant; with config, set config.num_tokens")
    config = config if config is not None else official_config(variant, num_tokens)

    state_dict, used_ema = convert_state_dict(load_official_checkpoint(path), config, use_ema)
    model = MergeVQModel(config)
    model.load_state_dict(state_dict, strict=True)
    model.eval()
    weights = "EMA" if used_ema else "raw (non-EMA)"
    logger.info("converted %d tensors (%s weights) from %s", len(state_dict), weights, path)
    if output_dir is not None:
        model.save_pretrained(output_dir)
        source = f"converted from the official MergeVQ checkpoint `{Path(path).name}` ({weights} weights)"
        tokenizer_model_card(model, source=source).save(Path(output_dir) / "README.md")
    return model


def main(argv=None) -> int:
    """`python -m mergevq_hf.convert CHECKPOINT OUTPUT_DIR (--variant V | --official-config YAML) [...]`."""
    parser = argparse.ArgumentParser(
        prog="python -m mergevq_hf.convert",
        description="Convert an official MergeVQ (ApexGen-X/MergeVQ) tokenizer checkpoint to a MergeVQModel folder.",
    )
    parser.add_argument("checkpoint", help="official Lightning .ckpt, state-dict .pt or .safetensors")
    parser.add_argument("output_dir", help="folder to write (config.json, model.safetensors, README.md)")
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--variant", choices=VARIANTS, help="a released d64 variant")
    source.add_argument("--official-config", metavar="YAML", help="the official training/eval YAML of the checkpoint")
    parser.add_argument("--num-tokens", type=int, default=None, help="default K kept after merging")
    parser.add_argument("--no-ema", action="store_true", help="convert the raw weights even if EMA weights exist")
    args = parser.parse_args(argv)

    logging.basicConfig(level=logging.INFO, format="%(message)s")
    config = config_from_official_yaml(args.official_config, args.num_tokens) if args.official_config else None
    convert_official_checkpoint(
        args.checkpoint, variant=args.variant, output_dir=args.output_dir, use_ema=not args.no_ema,
        num_tokens=None if config is not None else args.num_tokens, config=config,
    )
    print(f"saved MergeVQModel to {args.output_dir}")
    return 0
