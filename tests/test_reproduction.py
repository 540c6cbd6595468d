"""The reproduction harness (reproduction/): the entry point and its recipes, the grid-VQ baseline adapter and its
training entry, FLOP counting, the results writer."""

import importlib
import json
import shlex

import pytest
import torch
from diffusers import VQModel

from mergevq_hf import MergeVQConfig, MergeVQModel
from mergevq_hf.evaluation import format_seed_spread
from mergevq_hf.configuration_randar import MergeRandARConfig
from mergevq_hf.training import FASHION_MNIST_HELDOUT_ROWS, load_fashion_mnist
from mergevq_hf.training.train_source_recovery import build_recovery
from mergevq_hf.training.trainer_mergear import mergear_config_for_tokenizer
from reproduction import train
from reproduction.__main__ import main as reproduction_main
from reproduction.grid_vq import GridVQTokenizer, build_vq_model, main as train_grid_vq
from reproduction.score import MARKERS, encoder_mflops, reconstruction_parameters, write_section


@pytest.fixture(scope="module")
def grid_vq():
    torch.manual_seed(0)
    return GridVQTokenizer(build_vq_model(4)).eval()


def test_grid_vq_codes_round_trip_through_the_forward(grid_vq):
    images = torch.rand(3, 3, 32, 32) * 2 - 1
    out = grid_vq(images)
    encoded = grid_vq.encode(images)
    assert encoded.indices.shape == (3, 16) and encoded.indices.max() < 2**10
    assert torch.equal(encoded.indices, out.indices)
    assert torch.equal(encoded.source_map[0], torch.arange(16))
    # decoding the codes alone gives the forward's reconstruction, and its loss is L1 + commitment
    torch.testing.assert_close(grid_vq.decode(encoded.indices), out.reconstruction, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out.loss, (out.reconstruction - images).abs().mean() + out.commitment_loss)
    assert grid_vq.get_image_features(images).pooler_output.shape == (3, 8)


def test_grid_vq_rejects_a_token_count_it_cannot_give(grid_vq):
    with pytest.raises(ValueError, match="always gives 16 tokens"):
        grid_vq.encode(torch.zeros(1, 3, 32, 32), num_tokens=9)
    with pytest.raises(ValueError, match=r"indices must be \[B, 16\]"):
        grid_vq.decode(torch.zeros(1, 64, dtype=torch.long))
    with pytest.raises(ValueError, match="grid_size must be one of"):
        build_vq_model(2)


def test_grid_vq_trains_with_the_mergevq_trainer_and_exports_a_diffusers_folder(tmp_path):
    out = tmp_path / "grid"
    train_grid_vq([
        "--output_dir", str(out), "--grid_size", "8", "--dataset", "procedural:64", "--max_steps", "2",
        "--per_device_train_batch_size", "4", "--perceptual_loss", "none", "--discriminator_start", "1",
        "--save_steps", "2", "--use_cpu", "--report_to", "none", "--disable_tqdm", "true",
    ])
    loaded = GridVQTokenizer(VQModel.from_pretrained(out)).eval()
    assert loaded.config.num_tokens == 64
    assert (out / "checkpoint-2" / "ema.safetensors").is_file()
    images = torch.rand(2, 3, 32, 32) * 2 - 1
    assert loaded.decode(loaded.encode(images).indices).shape == (2, 3, 32, 32)


def test_grid_vq_refuses_a_decoder_only_fine_tune(tmp_path):
    with pytest.raises(ValueError, match="GridVQTokenizer has no .decoder module"):
        train_grid_vq(["--output_dir", str(tmp_path / "grid"), "--dataset", "procedural:8", "--max_steps", "1",
                       "--perceptual_loss", "none", "--use_cpu", "--report_to", "none", "--trainable", "decoder"])


def test_merging_lowers_encoder_flops_and_recon_parameters_skip_the_alignment_head():
    torch.manual_seed(0)
    model = MergeVQModel(MergeVQConfig.from_preset("tiny")).eval()
    flops = [encoder_mflops(model, k) for k in (64, 16, 4)]
    assert flops[0] > flops[1] > flops[2] > 0
    total = sum(p.numel() for p in model.parameters())
    aux = sum(p.numel() for p in model.encoder.alignment_head.parameters()) + sum(p.numel() for p in model.source_recovery.parameters())
    assert reconstruction_parameters(model) == total - aux


def test_write_section_replaces_only_its_own_marked_block(tmp_path):
    begin, end = (marker.format(part="tokenizers") for marker in MARKERS)
    results = tmp_path / "RESULTS.md"
    results.write_text("# Results\n\nkept text\n")
    write_section(results, "tokenizers", "first table")
    write_section(results, "generation", "generation table")
    text = results.read_text()
    assert text.startswith("# Results\n\nkept text\n") and f"{begin}\nfirst table\n{end}" in text
    results.write_text(text + "\nnotes after\n")
    write_section(results, "tokenizers", "second table")
    text = results.read_text()
    assert "first table" not in text and f"{begin}\nsecond table\n{end}" in text and "generation table" in text
    assert text.count(begin) == 1 and "kept text" in text and text.endswith("notes after\n")


# ---- the entry point and its recipes ------------------------------------------------------------------------------

BUNDLED_TOKENIZER = "src/mergevq_hf/pretrained/mergevq-fashion-mnist-tiny/vq_model"
MERGEAR_SIZE = '"hidden_size": 128, "num_hidden_layers": 4, "num_attention_heads": 4, "intermediate_size": 352, "num_factorized_layers": 1'


def test_recipes_give_the_arguments_of_the_former_shell_scripts():
    # Written out from scripts/train_reproduction.sh (SEED=1 RESUME=1 ... mergevq-k16; raster-ar) and
    # scripts/train_generator_ablation.sh (STEPS=400 ... randar-ls0), which these recipes replace.
    job = train.training_job("mergevq-k16", seed=1, resume=True)
    assert job.trainer == "mergevq_hf.training.train_tokenizer"
    assert job.arguments == [
        "--output_dir", "outputs/reproduction/mergevq-k16-seed1", "--preset", "tiny",
        "--config_overrides", '{"num_tokens": 16, "num_tokens_candidates": [16], "num_tokens_probs": [1.0]}',
        "--dataset", "fashion_mnist", "--max_steps", "1200", "--per_device_train_batch_size", "32", "--learning_rate", "4e-4",
        "--discriminator_start", "400", "--logging_steps", "50", "--save_steps", "200", "--save_total_limit", "2",
        "--seed", "1", "--use_cpu", "--disable_tqdm", "true", "--resume_from_checkpoint", "last",
    ]
    job = train.training_job("raster-ar")
    assert job.trainer == "mergevq_hf.training.train_mergear"
    assert job.arguments == [
        "--output_dir", "outputs/reproduction/raster-ar", "--tokenizer", BUNDLED_TOKENIZER, "--preset", "tiny",
        "--config_overrides", "{" + MERGEAR_SIZE + ', "repeat_window": 64}',
        "--dataset", "fashion_mnist", "--max_train_samples", "30000", "--num_tokens_candidates", "9", "16", "25",
        "--num_tokens_probs", "0.2", "0.6", "0.2", "--max_steps", "1200", "--per_device_train_batch_size", "64",
        "--learning_rate", "1e-3", "--logging_steps", "50", "--save_steps", "250", "--save_total_limit", "2",
        "--seed", "0", "--use_cpu", "--disable_tqdm", "true",
    ]
    job = train.training_job("randar-ls0", steps=400)
    assert job.trainer == "mergevq_hf.training.train_mergear"
    assert job.arguments == [
        "--output_dir", "outputs/ablation/randar-ls0-steps400-seed0", "--tokenizer", BUNDLED_TOKENIZER,
        "--generation_mode", "random", "--preset", "tiny", "--config_overrides", "{" + MERGEAR_SIZE + ', "label_smoothing": 0.0}',
        "--dataset", "fashion_mnist", "--max_train_samples", "30000", "--num_tokens_candidates", "9", "16", "25",
        "--num_tokens_probs", "0.2", "0.6", "0.2", "--max_steps", "400", "--per_device_train_batch_size", "64",
        "--learning_rate", "1e-3", "--logging_steps", "50", "--save_steps", "100", "--save_total_limit", "4",
        "--seed", "0", "--use_cpu", "--disable_tqdm", "true",
    ]
    job = train.training_job("mergear-w8-continued", seed=1, steps=2000)  # continues the same seed's run, at its own lr
    assert job.arguments[:6] == [
        "--output_dir", "outputs/ablation/mergear-w8-continued-steps2000-seed1", "--tokenizer", BUNDLED_TOKENIZER,
        "--init_from", "outputs/ablation/mergear-w8-steps3600-seed1",
    ]
    assert job.arguments[job.arguments.index("--learning_rate") + 1] == "5e-4"
    job = train.training_job("randar-continued", seed=1, steps=3600)  # random order continues as random order
    assert job.arguments[:8] == [
        "--output_dir", "outputs/ablation/randar-continued-steps3600-seed1", "--tokenizer", BUNDLED_TOKENIZER,
        "--init_from", "outputs/ablation/randar-steps3600-seed1", "--generation_mode", "random",
    ]
    for seed, suffix in ((0, ""), (1, "-seed1")):  # a recovery's fine-tune starts from the same seed's recovery
        assert train.training_job("recovery-h192-l3-enc2-ft", seed=seed).arguments[:4] == [
            "--output_dir", f"outputs/reproduction/recovery-h192-l3-enc2-ft{suffix}", "--tokenizer", f"outputs/reproduction/recovery-h192-l3-enc2{suffix}",
        ]
    assert train.training_job("grid-vq-8", seed=2).arguments[:4] == ["--output_dir", "outputs/reproduction/grid-vq-8-seed2", "--grid_size", "8"]
    assert train.training_job("grid-vq-8").trainer == "reproduction.grid_vq"
    for recipe in train.RECIPES.values():  # every override is a JSON object the trainers accept
        if "--config_overrides" in recipe.arguments:
            assert isinstance(json.loads(recipe.arguments[recipe.arguments.index("--config_overrides") + 1]), dict)


def _flags(arguments: list[str]) -> dict[str, list[str]]:
    flags, name = {}, None
    for argument in arguments:
        if argument.startswith("--"):
            name = argument
            flags[name] = []
        else:
            flags[name].append(argument)
    return flags


def test_bundled_mergear_script_runs_the_recipes_it_names(repo_root):
    """scripts/train_bundled_mergear.sh trains the bundled MergeAR as `mergear-w8 --steps 3600` then
    `mergear-w8-continued --steps 3600`, into its own folders: RESULTS.md's rows for those recipes describe it."""
    script = (repo_root / "scripts" / "train_bundled_mergear.sh").read_text().replace("\\\n", " ")
    commands = [line.replace("${RESUME:+--resume_from_checkpoint last}", "").split("examples/train_mergear.py", 1)[1]
                for line in script.splitlines() if "examples/train_mergear.py" in line]
    assert len(commands) == 2
    first, then = (_flags(shlex.split(command)) for command in commands)
    assert then["--init_from"] == first["--output_dir"]
    for flags, job in zip((first, then), (train.training_job("mergear-w8", steps=3600), train.training_job("mergear-w8-continued", steps=3600))):
        expected = _flags(job.arguments)
        for where in ("--output_dir", "--tokenizer", "--init_from"):  # the script's own folders
            flags.pop(where, None), expected.pop(where, None)
        if "--config_overrides" in expected:
            assert json.loads(flags.pop("--config_overrides")[0]) == json.loads(expected.pop("--config_overrides")[0])
        assert expected.pop("--generation_mode", ["raster"]) == ["raster"]
        assert flags == expected


def test_every_recipe_parses_with_its_trainer_and_builds_a_valid_config(repo_root):
    """A flag or config field renamed in a trainer fails here, not an hour into `make reproduce`."""
    tokenizer_config = MergeVQConfig.from_pretrained(repo_root / BUNDLED_TOKENIZER)
    for name in train.RECIPES:
        job = train.training_job(name)
        parsed = importlib.import_module(job.trainer).parse_args(job.arguments)
        model_args, training_args = parsed[0], parsed[-1]
        assert training_args.output_dir == job.arguments[1] and training_args.use_cpu, name
        if job.trainer == "reproduction.grid_vq":
            build_vq_model(model_args.grid_size)
            continue
        if job.trainer == "mergevq_hf.training.train_source_recovery" and model_args.hidden_size is None:
            # a fine-tune continues another recovery recipe's output, which must exist as a recipe
            assert model_args.with_positions and model_args.tokenizer.startswith("outputs/reproduction/"), name
            assert model_args.tokenizer.removeprefix("outputs/reproduction/") in train.RECIPES, name
            continue
        if job.trainer == "mergevq_hf.training.train_source_recovery":  # the module it builds on the bundled tokenizer
            tokenizer = MergeVQModel.from_pretrained(repo_root / BUNDLED_TOKENIZER)
            recovery = build_recovery(tokenizer, model_args)
            assert model_args.with_positions and recovery.token_position_embed is not None, name
            assert recovery.code_embed.out_features == model_args.hidden_size == tokenizer.config.source_recovery_hidden_size, name
            continue
        if job.trainer == "mergevq_hf.training.train_mergear" and model_args.init_from:
            # a continuation starts from another generator recipe's output, which must exist as a recipe
            assert model_args.config_overrides is None, name
            assert model_args.init_from.removeprefix("outputs/ablation/").rsplit("-steps", 1)[0] in train.RECIPES, name
            continue
        if job.trainer == "mergevq_hf.training.train_tokenizer" and model_args.init_from:
            # a decoder fine-tune starts from a recovery recipe's output, which must exist as a recipe
            assert training_args.trainable == "decoder" and model_args.teacher == "none", name
            assert training_args.decode_source_map == ("true" if name.endswith("-true-maps") else "predicted"), name
            assert model_args.init_from.removeprefix("outputs/reproduction/") in train.RECIPES, name
            continue
        overrides = json.loads(model_args.config_overrides or "{}")
        if name.startswith("tokenizer-"):  # the bundled tokenizer's recipe, one alignment recipe or the other
            assert not overrides and training_args.alignment == name.removeprefix("tokenizer-"), name
        elif job.trainer == "mergevq_hf.training.train_tokenizer":
            assert MergeVQConfig.from_preset(model_args.preset, **overrides).num_tokens == int(name.removeprefix("mergevq-k"))
        else:
            config_class = MergeRandARConfig if model_args.generation_mode == "random" else None
            config = mergear_config_for_tokenizer(model_args.preset, tokenizer_config, 10, config_class=config_class, **overrides)
            assert all(getattr(config, field) == value for field, value in overrides.items()), name


def test_generators_and_recoveries_never_train_on_the_heldout_rows():
    """Settings are chosen on FASHION_MNIST_HELDOUT_ROWS: every generator, recovery and random-order decoder recipe
    must train on rows before them."""
    assert FASHION_MNIST_HELDOUT_ROWS.stop <= len(load_fashion_mnist("train"))
    trained = 0
    for name in train.RECIPES:
        job = train.training_job(name)
        if job.trainer not in (train.MERGEAR_TRAINER, train.RECOVERY_TRAINER) and not name.startswith("decoder-"):
            continue
        data_args = importlib.import_module(job.trainer).parse_args(job.arguments)[1]
        assert (data_args.dataset, data_args.split) == ("fashion_mnist", "train"), name
        assert data_args.max_train_samples is not None and data_args.max_train_samples <= FASHION_MNIST_HELDOUT_ROWS.start, name
        trained += 1
    assert trained >= 10  # the generator ablations and the recoveries were all looked at


def test_help_lists_the_subcommands_and_every_recipe(capsys):
    with pytest.raises(SystemExit) as exit_info:
        reproduction_main(["--help"])
    assert exit_info.value.code == 0 and "train" in capsys.readouterr().out
    with pytest.raises(SystemExit) as exit_info:
        reproduction_main(["train", "--help"])
    out = capsys.readouterr().out
    assert exit_info.value.code == 0 and "--resume" in out and all(name in out for name in train.RECIPES)
    with pytest.raises(SystemExit) as exit_info:
        reproduction_main(["score", "--help"])
    assert exit_info.value.code == 0 and "--write" in capsys.readouterr().out


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["raster-ar", "mergevq-k5"], "unknown model 'mergevq-k5'; the known ones are:"),
        (["raster-ar", "--steps", "400"], "--steps applies to the generator ablations only: raster-ar"),
        (["raster", "--steps", "2"], "--steps must be at least 4"),
        (["raster", "--seed", "-1"], "--seed must be non-negative"),
    ],
)
def test_train_refuses_bad_input_before_training_anything(monkeypatch, capsys, argv, message):
    started = []
    monkeypatch.setattr(train, "run", started.append)
    with pytest.raises(SystemExit) as exit_info:
        reproduction_main(["train", *argv])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and message in err and not started
    if "unknown model" in message:
        assert all(name in err for name in train.RECIPES)


def test_train_calls_each_training_module_in_order(monkeypatch, repo_root):
    monkeypatch.chdir(repo_root)  # the recipes name the bundled tokenizer relative to the repository root
    calls = []
    monkeypatch.setattr("mergevq_hf.training.train_mergear.main", lambda argv: calls.append(("mergear", argv)))
    monkeypatch.setattr("reproduction.grid_vq.main", lambda argv: calls.append(("grid", argv)))
    reproduction_main(["train", "raster", "mergear-ls0", "--steps", "8", "--seed", "2", "--resume"])
    reproduction_main(["train", "grid-vq-4"])
    assert [trainer for trainer, _ in calls] == ["mergear", "mergear", "grid"]
    assert calls[1][1] == train.training_job("mergear-ls0", seed=2, steps=8, resume=True).arguments
    assert calls[2][1] == train.training_job("grid-vq-4").arguments
    raster_args = calls[0][1]
    assert raster_args[raster_args.index("--output_dir") + 1] == "outputs/ablation/raster-steps8-seed2"
    assert raster_args[raster_args.index("--save_steps") + 1] == "2" and raster_args[-2:] == ["--resume_from_checkpoint", "last"]


def test_score_checks_its_options_before_loading_data():
    with pytest.raises(SystemExit, match="--parts takes tokenizers, generation, alignment, ablations, curves, guidance and/or k25"):
        reproduction_main(["score", "--parts", "tokenizers,images"])
    with pytest.raises(SystemExit, match="--guidance-scales takes comma-separated numbers"):
        reproduction_main(["score", "--parts", "guidance", "--guidance-scales", "2.5;3"])
    with pytest.raises(SystemExit, match="finite and at least 1"):
        reproduction_main(["score", "--parts", "guidance", "--guidance-scales", "0.5,nan"])


def test_alignment_part_finds_every_trained_seed_and_needs_the_paper_recipe(tmp_path):
    from reproduction.alignment import trained_models

    with pytest.raises(SystemExit, match="tokenizer-paper"):
        trained_models(tmp_path)
    for name in ("tokenizer-paper", "tokenizer-paper-seed1", "tokenizer-cached-seed1", "tokenizer-paper-seed2-unfinished"):
        (tmp_path / name).mkdir()
    for name in ("tokenizer-paper", "tokenizer-paper-seed1", "tokenizer-cached-seed1"):
        (tmp_path / name / "config.json").write_text("{}")
    found = trained_models(tmp_path)
    assert set(found) == {("tokenizer-paper", 0), ("tokenizer-paper", 1), ("tokenizer-cached", 0), ("tokenizer-cached", 1)}
    assert found["tokenizer-cached", 0].name == "vq_model"  # the bundled tokenizer stands in for cached seed 0


def test_ablation_rows_group_seeds_and_find_checkpoints(tmp_path):
    from mergevq_hf import MergeARConfig, MergeARForCausalLM
    from reproduction.generators import BUNDLED, ablation_runs, checkpoints

    model = MergeARForCausalLM(MergeARConfig.from_preset("tiny"))
    for run in ("mergear-steps8-seed0", "mergear-steps8-seed1", "raster-steps8-seed0", "mergear-steps8-seed2/checkpoint-2"):
        model.save_pretrained(tmp_path / run)
    (tmp_path / "mergear-steps8-seed0" / "trainer_state.json").write_text(json.dumps({"global_step": 8}))
    for step in (2, 4):
        model.save_pretrained(tmp_path / "mergear-steps8-seed0" / f"checkpoint-{step}")
    rows = ablation_runs(tmp_path)
    assert list(rows) == [BUNDLED, "mergear-steps8", "raster-steps8"]
    assert [run.name for run in rows["mergear-steps8"]] == ["mergear-steps8-seed0", "mergear-steps8-seed1"]
    kept = checkpoints(tmp_path / "mergear-steps8-seed0")
    assert list(kept) == [2, 4, 8] and kept[8] == tmp_path / "mergear-steps8-seed0"
    assert format_seed_spread([2.0], 1) == "2.0" and format_seed_spread([1.0, 4.0, 2.5], 1) == "2.5 (1.0–4.0)"
    with pytest.raises(ValueError, match="no scores"):
        format_seed_spread([], 1)


def test_ablation_scores_are_remembered_until_the_weights_change(tmp_path, monkeypatch):
    from mergevq_hf import MergeARConfig, MergeARForCausalLM
    from reproduction import generators

    run = tmp_path / "mergear-steps8-seed0"
    MergeARForCausalLM(MergeARConfig.from_preset("tiny")).save_pretrained(run)
    calls = []
    monkeypatch.setattr(generators, "distinct_codes", lambda model, k, n: calls.append(k) or float(k))
    scorer = generators.AblationScorer((torch.zeros(4, 3, 32, 32), torch.zeros(4, dtype=torch.long)), "test", 4, tmp_path / "scores.json")
    assert scorer.instruction(run) == {"distinct_k9": 9.0, "distinct_k16": 16.0, "distinct_k25": 25.0}
    again = generators.AblationScorer((torch.zeros(4, 3, 32, 32), torch.zeros(4, dtype=torch.long)), "test", 4, tmp_path / "scores.json")
    assert again.instruction(run)["distinct_k16"] == 16.0 and calls == [9, 16, 25]  # read back from scores.json
    MergeARForCausalLM(MergeARConfig.from_preset("tiny")).save_pretrained(run)  # retrained: new weights
    again.instruction(run)
    assert calls == [9, 16, 25] * 2
