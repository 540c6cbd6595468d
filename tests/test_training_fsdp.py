"""Sharded training (FSDP2, ``fully_shard``) of both stages on two CPU processes (gloo), against one process.

The 2-process runs use the Trainer's own FSDP switches (``--fsdp --fsdp_config``) under ``torchrun`` for the
tokenizer and an accelerate FSDP config under ``accelerate launch`` for MergeAR. As in the DDP tests, the tokenizer
runs without the terms that see how the batch is split (LFQ's batch entropy, BatchNorm, LeCAM), so one process
with batch 8 and two with batch 4 each make the same updates up to the order of float sums.

``test_fsdp2_tokenizer_matches_one_process`` runs by default (about a minute on two busy cores); the others start
more processes and are marked ``slow``.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from mergevq_hf import MergeARForCausalLM, MergeVQModel
from mergevq_hf.bundled import bundled_model_path
from mergevq_hf.training import train_mergear, train_tokenizer
from mergevq_hf.training.trainer_tokenizer import DISCRIMINATOR_NAME, DISCRIMINATOR_OPTIMIZER_NAME, EMA_NAME

pytestmark = pytest.mark.skipif(
    not (torch.distributed.is_available() and torch.distributed.is_gloo_available()), reason="needs torch.distributed with gloo"
)

FSDP2 = ("--fsdp", "--fsdp_config", json.dumps({"version": 2, "state_dict_type": "SHARDED_STATE_DICT"}))
SPLIT_INVARIANT = ("--discriminator_norm", "group", "--lecam_weight", "0", "--config_overrides", '{"batch_entropy_weight": 0}')
TOKENIZER_STEPS = 3
# Dropout draws from each process's own generator, so one process and two would drop different rows.
NO_DROPOUT = ("--config_overrides", json.dumps({name: 0 for name in ("class_dropout_prob", "token_dropout", "resid_dropout", "ffn_dropout")}))
LOGGED = ("loss", "grad_norm", "reconstruction_loss", "commitment_loss", "discriminator_loss", "generator_adversarial_loss")


def _with(argv: list[str], **values) -> list[str]:
    argv = list(argv)
    for key, value in values.items():
        argv[argv.index(f"--{key}") + 1] = str(value)
    return argv


def _env() -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}


def _torchrun(module: str, argv: list[str]) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m", module, *argv]


def _launch(cmd: list[str]) -> None:
    proc = subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]


def _logs(output_dir, train_logs) -> dict[int, dict]:
    return train_logs(json.loads((output_dir / "trainer_state.json").read_text())["log_history"])


def _assert_sharded_checkpoint(checkpoint) -> None:
    """A distributed checkpoint: one model shard and one optimizer shard per process, plus DCP's metadata."""
    for folder in ("pytorch_model_fsdp_0", "optimizer_0"):
        assert sorted(p.name for p in (checkpoint / folder).glob("*.distcp")) == ["__0_0.distcp", "__1_0.distcp"], folder
        assert (checkpoint / folder / ".metadata").is_file()
    assert {p.name for p in checkpoint.glob("rng_state_*.pth")} == {"rng_state_0.pth", "rng_state_1.pth"}
    assert not (checkpoint / "model.safetensors").exists()  # no process held the full weights


def _assert_plain_export(output_dir) -> None:
    """A save_pretrained folder of the model's own class, not of the FSDP wrapper class."""
    auto_map = json.loads((output_dir / "config.json").read_text()).get("auto_map", {})
    assert auto_map and not any("fsdp" in target.lower() for target in auto_map.values()), auto_map
    assert not list(output_dir.glob("_fsdp*.py"))


def _mean_abs_difference(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    floats = [name for name, tensor in a.items() if tensor.is_floating_point()]
    return float(torch.cat([(a[name] - b[name]).abs().flatten() for name in floats]).mean())


def _dead(pid: int) -> bool:
    """The process has exited (a zombie or already reaped)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z"
    except FileNotFoundError:
        return True


@pytest.fixture(scope="module")
def tokenizer_runs(tmp_path_factory, tokenizer_argv, train_logs):
    """The same 3 steps in one process (batch 8) and in two FSDP2 processes (batch 4 each); a checkpoint at step 2."""
    root = tmp_path_factory.mktemp("fsdp_tokenizer")
    argv = lambda out: _with(tokenizer_argv(out, TOKENIZER_STEPS, *SPLIT_INVARIANT), save_steps=2, eval_samples=4)  # noqa: E731
    single = train_tokenizer.main(argv(root / "single"))
    _launch(_torchrun("mergevq_hf.training.train_tokenizer", [*_with(argv(root / "fsdp"), per_device_train_batch_size=4), *FSDP2]))
    return root, train_logs(single.state.log_history), _logs(root / "fsdp", train_logs)


@pytest.mark.numerics
def test_fsdp2_tokenizer_matches_one_process(tokenizer_runs):
    root, single, sharded = tokenizer_runs
    assert sorted(sharded) == list(range(1, TOKENIZER_STEPS + 1))
    for step in sharded:  # the same updates: FSDP2 averages the generator's gradients, the replicated D's too
        assert sharded[step]["num_tokens"] == single[step]["num_tokens"]
        for key in LOGGED:
            assert sharded[step][key] == pytest.approx(single[step][key], rel=1e-3, abs=1e-4), (step, key)

    checkpoint = root / "fsdp" / "checkpoint-2"
    _assert_sharded_checkpoint(checkpoint)
    for name in (DISCRIMINATOR_NAME, DISCRIMINATOR_OPTIMIZER_NAME, EMA_NAME):  # replicated D; the EMA gathered
        assert (checkpoint / name).is_file(), name

    # The consolidated exports (EMA and raw) load in this one process and hold the single run's weights.
    lr = 1e-3
    weights = {}
    for run in ("fsdp", "single"):
        for sub in ("", "raw"):
            weights[run, sub or "ema"] = MergeVQModel.from_pretrained(root / run / sub).state_dict()
    for kind in ("ema", "raw"):
        _assert_plain_export(root / "fsdp" / ("" if kind == "ema" else kind))
        for name, x in weights["fsdp", kind].items():
            # Adam moves a weight by up to lr per step whatever its gradient's size, so a gradient that differs in
            # its last bits can move a near-zero-gradient weight differently: compare to a few steps' worth of lr.
            torch.testing.assert_close(x, weights["single", kind][name], rtol=0, atol=TOKENIZER_STEPS * lr, msg=f"{kind} {name}")
        # ... and much closer to the same kind of weights than the EMA and raw weights are to each other.
        ema_vs_raw = _mean_abs_difference(weights["single", "ema"], weights["single", "raw"])
        assert _mean_abs_difference(weights["fsdp", kind], weights["single", kind]) < 0.25 * ema_vs_raw, kind

    fsdp_metrics, single_metrics = (json.loads((root / run / "train_results.json").read_text()) for run in ("fsdp", "single"))
    # Each process holds about half of the parameters and half of Adam's two moments.
    for key in ("process_parameter_bytes", "process_optimizer_state_bytes"):
        assert fsdp_metrics[key] < 0.6 * single_metrics[key], key
    assert single_metrics["process_optimizer_state_bytes"] > 2 * single_metrics["process_parameter_bytes"] * 0.99


@pytest.mark.slow
def test_fsdp2_tokenizer_resume_after_sigkill(tokenizer_runs, tokenizer_argv, train_logs, tmp_path):
    reference = tokenizer_runs[2]
    out = tmp_path / "killed"
    argv = [*_with(tokenizer_argv(out, TOKENIZER_STEPS, *SPLIT_INVARIANT), save_steps=2, eval_samples=4, per_device_train_batch_size=4), *FSDP2]
    proc = subprocess.Popen(_torchrun("mergevq_hf.training.train_tokenizer", argv), env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 300
        while not (out / "checkpoint-2").is_dir():  # appears complete, in one rename, once both shards are written
            assert proc.poll() is None, proc.stderr.read().decode()[-3000:]
            assert time.monotonic() < deadline, "no checkpoint-2 after 300 s"
            time.sleep(0.02)
        # torchrun starts each worker in a session of its own: kill the launcher and its workers one by one.
        workers = [int(pid) for pid in Path(f"/proc/{proc.pid}/task/{proc.pid}/children").read_text().split()]
        for pid in (proc.pid, *workers):
            os.kill(pid, signal.SIGKILL)
        while not all(map(_dead, workers)):
            time.sleep(0.02)
    finally:
        proc.kill()
        proc.wait()
        proc.stderr.close()
    assert not (out / "model.safetensors").exists()  # killed before the end

    _launch(_torchrun("mergevq_hf.training.train_tokenizer", [*argv, "--resume_from_checkpoint", "last"]))
    logs = _logs(out, train_logs)
    assert sorted(logs) == list(range(1, TOKENIZER_STEPS + 1))
    for step in logs:  # before the kill (restored from the checkpoint) and after the resume
        for key in LOGGED:
            assert logs[step][key] == pytest.approx(reference[step][key], rel=1e-4, abs=1e-6), (step, key)
    resumed, uninterrupted = (MergeVQModel.from_pretrained(d) for d in (out, tokenizer_runs[0] / "fsdp"))
    for (name, x), y in zip(resumed.state_dict().items(), uninterrupted.state_dict().values()):
        torch.testing.assert_close(x, y, rtol=1e-4, atol=1e-5, msg=name)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
@pytest.mark.numerics
@pytest.mark.skipif(bundled_model_path() is None, reason="needs the bundled tokenizer")
def test_fsdp2_mergear_accelerate_launch_matches_one_process_and_resumes(repo_root, mergear_argv, train_logs, tmp_path):
    tokenizer_dir, cache = bundled_model_path() / "vq_model", tmp_path / "tokens"
    argv = lambda out, *extra: _with(mergear_argv(tokenizer_dir, out, cache, 4, *NO_DROPOUT, *extra), save_steps=2, eval_samples=16)  # noqa: E731
    single = train_logs(train_mergear.main(argv(tmp_path / "single")).state.log_history)  # batch 16 (fills the cache)

    def accelerate_launch(out, *extra):
        config = repo_root / "examples" / "accelerate_configs" / "fsdp2_cpu_2proc.yaml"
        _launch([sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(config), "--main_process_port", str(_free_port()),
                 "-m", "mergevq_hf.training.train_mergear", *_with(argv(out, *extra), per_device_train_batch_size=8)])

    accelerate_launch(tmp_path / "fsdp")
    sharded = _logs(tmp_path / "fsdp", train_logs)
    assert sorted(sharded) == [1, 2, 3, 4]
    for step in sharded:
        for key in ("loss", "grad_norm"):
            assert sharded[step][key] == pytest.approx(single[step][key], rel=1e-3, abs=1e-4), (step, key)
    _assert_sharded_checkpoint(tmp_path / "fsdp" / "checkpoint-2")
    _assert_plain_export(tmp_path / "fsdp")
    exported, reference = (MergeARForCausalLM.from_pretrained(tmp_path / run) for run in ("fsdp", "single"))
    for (name, x), y in zip(exported.state_dict().items(), reference.state_dict().values()):
        torch.testing.assert_close(x, y, rtol=0, atol=4 * 3e-3, msg=name)  # up to lr per Adam step, see the tokenizer test

    # Resume from the sharded checkpoint at step 2 (in a fresh folder): steps 3 and 4 come out as before.
    shutil.copytree(tmp_path / "fsdp" / "checkpoint-2", tmp_path / "resumed" / "checkpoint-2")
    accelerate_launch(tmp_path / "resumed", "--resume_from_checkpoint", "last")
    resumed = _logs(tmp_path / "resumed", train_logs)
    for step in (3, 4):
        for key in ("loss", "grad_norm"):
            assert resumed[step][key] == pytest.approx(sharded[step][key], rel=1e-4, abs=1e-6), (step, key)
