"""Training recipes of the reproduction table and of the generator ablations: ``python -m reproduction train NAME...``.

Reproduction models (:mod:`reproduction.score` compares them) get the budget and recipe of their bundled counterpart
(``scripts/train_bundled_tokenizer.sh`` and ``scripts/train_bundled_mergear.sh``): tokenizers 1,200 steps x 32 images,
lr 4e-4, GAN from step 400; the raster AR 1,200 steps x 64 images, lr 1e-3, on the bundled tokenizer. They go to
``outputs/reproduction/NAME``, or ``NAME-seedN`` for a seed other than 0.

Source recoveries (``recovery-*``) are rebuilt with token positions on the bundled tokenizer's frozen codes of the
generators' 30,000 images; ``benchmarks/bench_randar.py recon`` and ``generation`` score them. Decoder fine-tunes
(``decoder-*``) start from the recovery folder of the same seed and train its decoder alone, on the recovery's predicted
maps or, as the control, on the true maps.

Generator ablations change one thing at a time in the bundled MergeAR's recipe, over ``--steps`` (default 1,200)
with a checkpoint every quarter; they go to ``outputs/ablation/NAME-stepsS-seedN``.

Each run calls the training module's ``main(argv)`` in this process, one model after the other; ``--resume`` passes
``--resume_from_checkpoint last`` so that an interrupted list continues where it stopped.
"""

from __future__ import annotations

import importlib
import json
import shlex
import sys
from dataclasses import dataclass
from pathlib import Path

BUNDLED_TOKENIZER = "src/mergevq_hf/pretrained/mergevq-fashion-mnist-tiny/vq_model"
TOKENIZER_TRAINER = "mergevq_hf.training.train_tokenizer"
GRID_VQ_TRAINER = "reproduction.grid_vq"
MERGEAR_TRAINER = "mergevq_hf.training.train_mergear"
RECOVERY_TRAINER = "mergevq_hf.training.train_source_recovery"
DEFAULT_ABLATION_STEPS = 1200

# The bundled MergeAR's size; the ablations and the raster AR change other fields on top of it.
MERGEAR_SIZE = {"hidden_size": 128, "num_hidden_layers": 4, "num_attention_heads": 4, "intermediate_size": 352, "num_factorized_layers": 1}
# The bundled tokenizer's budget, shared by every tokenizer of the table.
TOKENIZER_BUDGET = (
    "--dataset", "fashion_mnist", "--max_steps", "1200", "--per_device_train_batch_size", "32", "--learning_rate", "4e-4",
    "--discriminator_start", "400", "--logging_steps", "50", "--save_steps", "200", "--save_total_limit", "2",
)
# The bundled MergeAR's data: 30,000 training images tokenised at K = 9, 16, 25 with probabilities 0.2, 0.6, 0.2.
GENERATOR_DATA = (
    "--dataset", "fashion_mnist", "--max_train_samples", "30000", "--num_tokens_candidates", "9", "16", "25",
    "--num_tokens_probs", "0.2", "0.6", "0.2",
)
GENERATOR_BUDGET = GENERATOR_DATA + (
    "--max_steps", "1200", "--per_device_train_batch_size", "64", "--learning_rate", "1e-3", "--logging_steps", "50",
    "--save_steps", "250", "--save_total_limit", "2",
)
# Source recoveries are trained on the bundled tokenizer's frozen codes of the generators' images; steps come with each.
RECOVERY_BUDGET = GENERATOR_DATA + (
    "--per_device_train_batch_size", "128", "--logging_steps", "50", "--save_steps", "300",
    "--save_total_limit", "2", "--eval_samples", "0",
)

# Decoder fine-tunes on predicted maps: the generators' images, the tokenizer's batch, a tenth of its GAN recipe's
# learning rate from a trained decoder, a fresh discriminator on from the first step.
DECODER_BUDGET = (
    "--dataset", "fashion_mnist", "--max_train_samples", "30000", "--max_steps", "1200", "--per_device_train_batch_size", "32",
    "--learning_rate", "1e-4", "--discriminator_start", "0", "--logging_steps", "50", "--save_steps", "300",
    "--save_total_limit", "2", "--eval_samples", "0",
)


@dataclass(frozen=True)
class Recipe:
    summary: str
    trainer: str  # module whose main(argv) trains the model
    arguments: tuple[str, ...]  # what defines the model ("{seed}" becomes the run's seed, "{seed_suffix}" its folder suffix); the budget, output folder, seed and resume are added per run
    ablation: bool = False  # an ablation: outputs/ablation, --steps applies; otherwise a model of the reproduction table
    learning_rate: str = "1e-3"  # an ablation's peak learning rate
    budget: tuple[str, ...] | None = None  # steps, batch and data when not its trainer's default budget


def _tokenizer_at(k: int) -> Recipe:
    overrides = json.dumps({"num_tokens": k, "num_tokens_candidates": [k], "num_tokens_probs": [1.0]})
    merging = "merging off, K = L" if k == 64 else f"K = {k} of L = 64"
    return Recipe(f"MergeVQ tiny trained at one fixed K ({merging})", TOKENIZER_TRAINER, ("--preset", "tiny", "--config_overrides", overrides))


def _ablation(summary: str, mode: str = "raster", **fields) -> Recipe:
    arguments = ("--tokenizer", BUNDLED_TOKENIZER, "--generation_mode", mode, "--preset", "tiny", "--config_overrides", json.dumps({**MERGEAR_SIZE, **fields}))
    return Recipe(summary, MERGEAR_TRAINER, arguments, ablation=True)


def _recovery(summary: str, steps: int, size: tuple[int, int, int] | None = None, fine_tune_of: str | None = None,
              learning_rate: float = 1e-3, token_layers: int = 0) -> Recipe:
    """A new module of ``size`` (width, blocks, heads) and ``token_layers`` on the bundled tokenizer, or, with
    ``fine_tune_of``, that recovery recipe's output of the same seed, its module fine-tuned."""
    tokenizer = BUNDLED_TOKENIZER if fine_tune_of is None else f"outputs/reproduction/{fine_tune_of}{{seed_suffix}}"
    arguments = ("--tokenizer", tokenizer, "--with_positions", "true", "--max_steps", str(steps), "--learning_rate", str(learning_rate))
    if size is not None:
        arguments += ("--hidden_size", str(size[0]), "--num_layers", str(size[1]), "--num_heads", str(size[2]),
                      "--num_token_layers", str(token_layers))
    return Recipe(f"source recovery with positions, {summary}", RECOVERY_TRAINER, arguments)


def _decoder_on(recovery: str, source_map: str = "predicted") -> Recipe:
    """The tokenizer of ``recovery`` (same seed, trained first) with its decoder fine-tuned on that recovery's
    predicted maps (the decoder random-order generation decodes through) or, as the control, on the true maps;
    everything else frozen."""
    arguments = ("--init_from", f"outputs/reproduction/{recovery}{{seed_suffix}}", "--teacher", "none",
                 "--trainable", "decoder", "--decode_source_map", source_map)
    maps = "the recovery's predicted maps" if source_map == "predicted" else "the true maps (the control)"
    return Recipe(f"{recovery}'s tokenizer, its decoder fine-tuned 1,200 steps on {maps}", TOKENIZER_TRAINER, arguments,
                  budget=DECODER_BUDGET)


def _continued(base: str, what: str, mode: str = "raster") -> Recipe:
    """``base --steps 3600`` (trained first, same seed) continued ``--steps`` more from its weights, with a fresh
    optimiser and schedule at half the peak learning rate; ``{seed}`` becomes the job's seed."""
    arguments = ("--tokenizer", BUNDLED_TOKENIZER, "--init_from", f"outputs/ablation/{base}-steps3600-seed{{seed}}", "--generation_mode", mode)
    return Recipe(f"{base} --steps 3600 ({what}) continued --steps more at lr 5e-4", MERGEAR_TRAINER, arguments,
                  ablation=True, learning_rate="5e-4")


RECIPES: dict[str, Recipe] = {
    **{f"mergevq-k{k}": _tokenizer_at(k) for k in (64, 36, 16, 9)},
    **{
        f"grid-vq-{side}": Recipe(f"diffusers VQModel, {side}x{side} token grid ({side * side} tokens)", GRID_VQ_TRAINER, ("--grid_size", str(side)))
        for side in (4, 8)
    },
    # Issue 17: the bundled tokenizer's recipe with each global-alignment recipe (seed 0 of "cached" is the bundled one).
    "tokenizer-cached": Recipe("the bundled tokenizer's recipe (alignment to cached teacher features)", TOKENIZER_TRAINER, ("--preset", "tiny", "--alignment", "cached")),
    "tokenizer-paper": Recipe("the bundled tokenizer's recipe with the paper's two-pass alignment", TOKENIZER_TRAINER, ("--preset", "tiny", "--alignment", "paper")),
    "raster-ar": Recipe(
        "the bundled MergeAR's recipe with repeat_window = L = 64: no repeated token is hidden, a plain raster AR",
        MERGEAR_TRAINER,
        ("--tokenizer", BUNDLED_TOKENIZER, "--preset", "tiny", "--config_overrides", json.dumps({**MERGEAR_SIZE, "repeat_window": 64})),
    ),
    "mergear": _ablation("the bundled recipe: repeat window W = 1, label smoothing 0.1, token dropout 0.1"),
    "raster": _ablation("W = L = 64: no repeat is hidden, a plain raster AR", repeat_window=64),
    "mergear-ls0": _ablation("label smoothing 0", label_smoothing=0.0),
    "raster-ls0": _ablation("W = L, label smoothing 0", repeat_window=64, label_smoothing=0.0),
    "mergear-w8": _ablation("W = 8: a repeat stays visible for one grid row", repeat_window=8),
    "mergear-w8-ls0": _ablation("W = 8 (one grid row), label smoothing 0", repeat_window=8, label_smoothing=0.0),
    "mergear-td0-ls0": _ablation("token dropout 0, label smoothing 0", token_dropout=0.0, label_smoothing=0.0),
    # K presented at every image token (how many new codes it still allows), besides the instruction token.
    "mergear-left": _ablation("tokens-left embedding (K minus the distinct codes so far, at every image token)", tokens_left_embedding=True),
    "raster-left": _ablation("W = L with the tokens-left embedding: the raster AR given the same presentation of K", repeat_window=64, tokens_left_embedding=True),
    "mergear-left-ls0": _ablation("tokens-left embedding, label smoothing 0", tokens_left_embedding=True, label_smoothing=0.0),
    # An explicit repeat-or-new choice at every step (docs/design.md §3.3), alone and with the tokens-left embedding.
    "mergear-gate": _ablation("repeat gate: a binary head chooses between repeating a held code and a new one", repeat_gate=True),
    "mergear-gate-left": _ablation("repeat gate and tokens-left embedding", repeat_gate=True, tokens_left_embedding=True),
    "mergear-gate-left-w8": _ablation("repeat gate and tokens-left embedding with W = 8 (one grid row)", repeat_gate=True,
                                      tokens_left_embedding=True, repeat_window=8),
    # Position-aware source recoveries for random order (docs/design.md §1.5), rebuilt on the bundled tokenizer.
    "recovery-h96-l2": _recovery("width 96, 2 blocks (0.33M parameters), 900 steps", 900, (96, 2, 4)),
    "recovery-h96-l2-enc2": _recovery("recovery-h96-l2 with 2 self-attention blocks over the tokens first (0.55M)", 900, (96, 2, 4), token_layers=2),
    "recovery-h192-l3": _recovery("width 192, 3 blocks (1.9M: the paper's 7M scaled by L = 64 / 256), 2,400 steps", 2400, (192, 3, 6)),
    "recovery-h192-l3-enc2": _recovery("recovery-h192-l3 with 2 self-attention blocks over the tokens first (2.8M)", 2400, (192, 3, 6), token_layers=2),
    # The paper's optional fine-tune, continued: needs the recovery of the same seed trained first.
    "recovery-h192-l3-ft": _recovery("recovery-h192-l3 fine-tuned 1,200 more steps at lr 5e-4", 1200,
                                     fine_tune_of="recovery-h192-l3", learning_rate=5e-4),
    "recovery-h192-l3-enc2-ft": _recovery("recovery-h192-l3-enc2 (the recovery random order decodes through) fine-tuned "
                                          "1,200 more steps at lr 5e-4", 1200, fine_tune_of="recovery-h192-l3-enc2", learning_rate=5e-4),
    # The decoder random order decodes through, taught the recovery's errors (docs/design.md §1.5).
    "decoder-h96-l2-enc2": _decoder_on("recovery-h96-l2-enc2"),
    "decoder-h96-l2-enc2-true-maps": _decoder_on("recovery-h96-l2-enc2", "true"),
    "decoder-h192-l3-enc2": _decoder_on("recovery-h192-l3-enc2"),
    "decoder-h192-l3-enc2-true-maps": _decoder_on("recovery-h192-l3-enc2", "true"),
    # Are the bundled MergeAR and the gate only short of steps? Their 3,600-step runs trained further.
    "mergear-w8-continued": _continued("mergear-w8", "the bundled MergeAR's run; seed 0 is the bundled MergeAR"),
    "mergear-gate-left-w8-continued": _continued("mergear-gate-left-w8", "the gate with one grid row"),
    "randar": _ablation("random order (MergeRandAR) with the bundled recipe", mode="random"),
    "randar-ls0": _ablation("random order (MergeRandAR), label smoothing 0", mode="random", label_smoothing=0.0),
    # Random order at the bundled MergeAR's budget (3,600 + 3,600 steps), to compare with it.
    "randar-continued": _continued("randar", "random order", mode="random"),
}


def describe_recipes() -> str:
    """The known names and what each trains, for ``--help`` and error messages."""
    lines = ["models of the reproduction table and source recoveries (outputs/reproduction/NAME[-seedN]):"]
    lines += [f"  {name:16} {recipe.summary}" for name, recipe in RECIPES.items() if not recipe.ablation]
    lines.append("generator ablations (outputs/ablation/NAME-stepsS-seedN):")
    lines += [f"  {name:16} {recipe.summary}" for name, recipe in RECIPES.items() if recipe.ablation]
    return "\n".join(lines)


@dataclass(frozen=True)
class TrainingJob:
    name: str
    trainer: str
    arguments: list[str]


def training_job(name: str, seed: int = 0, steps: int | None = None, resume: bool = False) -> TrainingJob:
    """The trainer and full argument list that train ``name``; ValueError for an unknown name or a bad option."""
    if name not in RECIPES:
        raise ValueError(f"unknown model {name!r}; the known ones are:\n{describe_recipes()}")
    if seed < 0:
        raise ValueError(f"--seed must be non-negative, got {seed}")
    recipe = RECIPES[name]
    seed_suffix = f"-seed{seed}" if seed else ""  # a reproduction model's folder: NAME for seed 0, NAME-seedN otherwise
    if recipe.ablation:
        steps = DEFAULT_ABLATION_STEPS if steps is None else steps
        if steps < 4:
            raise ValueError(f"--steps must be at least 4 (a checkpoint is saved every steps / 4), got {steps}")
        output_dir = f"outputs/ablation/{name}-steps{steps}-seed{seed}"
        budget = GENERATOR_DATA + (
            "--max_steps", str(steps), "--per_device_train_batch_size", "64", "--learning_rate", recipe.learning_rate,
            "--logging_steps", "50", "--save_steps", str(steps // 4), "--save_total_limit", "4",
        )
    else:
        if steps is not None:
            raise ValueError(f"--steps applies to the generator ablations only: {name} is trained at the table's fixed budget")
        output_dir = f"outputs/reproduction/{name}{seed_suffix}"
        budget = recipe.budget or {MERGEAR_TRAINER: GENERATOR_BUDGET, RECOVERY_TRAINER: RECOVERY_BUDGET}.get(recipe.trainer, TOKENIZER_BUDGET)
    defining = (a.replace("{seed}", str(seed)).replace("{seed_suffix}", seed_suffix) for a in recipe.arguments)
    arguments = ["--output_dir", output_dir, *defining, *budget, "--seed", str(seed), "--use_cpu", "--disable_tqdm", "true"]
    if resume:
        arguments += ["--resume_from_checkpoint", "last"]
    return TrainingJob(name, recipe.trainer, arguments)


def run(jobs: list[TrainingJob]) -> None:
    """Train the jobs one after the other, each through its training module's ``main(argv)``."""
    if any(BUNDLED_TOKENIZER in job.arguments for job in jobs) and not Path(BUNDLED_TOKENIZER).is_dir():
        raise SystemExit(f"{BUNDLED_TOKENIZER} not found: run `python -m reproduction train` from the repository root")
    for job in jobs:
        print(f"training {job.name}: python -m {job.trainer} {shlex.join(job.arguments)}", file=sys.stderr, flush=True)
        importlib.import_module(job.trainer).main(job.arguments)
