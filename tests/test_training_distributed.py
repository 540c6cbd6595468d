"""Multi-process training on CPU (DDP over gloo): ``torchrun`` for the tokenizer, ``accelerate launch`` for MergeAR.

Each launcher starts two fresh Python processes, which makes these the slowest training tests (about half a minute
each on two cores); they live in their own file so that a quick run can leave them out
(``pytest --ignore tests/test_training_distributed.py``). Each compares the 2-process run with a 1-process run of
the same global batch (same data order, same K per step).

For the tokenizer, the terms that see how the batch is split between processes are switched off (the discriminator's
BatchNorm, LeCAM's batch-mean anchors), so two processes compute the same update as one, up to the order of float
sums: the first steps must match closely. LFQ's batch entropy is all-reduced over the processes, so its logged value
must match too; its weight is 0 all the same, because its sharp gradient (temperature 0.01) turns the rounding
differences of the sums into visible differences by step 3. Later steps drift apart (an LFQ code whose latent sits
near zero flips on a rounding difference, and rounding depends on the CPU's vector instructions), so neither the
final models nor how much 12 steps taught them are compared: measured over ATEN_CPU_CAPABILITY=default/avx2/avx512,
the final L1 ranges from 0.45 to 0.63 for a start of 0.60. That training learns is checked on the full recipe in
test_training.py.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys

import pytest
import torch

from mergevq_hf import MergeARForCausalLM, MergeVQModel
from mergevq_hf.training import train_mergear, train_tokenizer

pytestmark = pytest.mark.skipif(
    not (torch.distributed.is_available() and torch.distributed.is_gloo_available()), reason="needs torch.distributed with gloo"
)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _with(argv: list[str], **values) -> list[str]:
    argv = list(argv)
    for key, value in values.items():
        argv[argv.index(f"--{key}") + 1] = str(value)
    return argv


def _launch(cmd: list[str]) -> None:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]


# No term that depends on how the batch is split between processes.
SPLIT_INVARIANT = ("--discriminator_norm", "group", "--lecam_weight", "0", "--config_overrides", '{"batch_entropy_weight": 0}')


@pytest.fixture(scope="module")
def single_process_tokenizer(tmp_path_factory, tokenizer_argv, train_logs):
    out = tmp_path_factory.mktemp("tokenizer_1proc")
    trainer = train_tokenizer.main(tokenizer_argv(out, 12, *SPLIT_INVARIANT))  # batch 8
    return out, train_logs(trainer.state.log_history)


@pytest.mark.numerics
def test_torchrun_two_processes_match_one_process(single_process_tokenizer, tmp_path, tokenizer_argv, train_logs):
    single_dir, single_logs = single_process_tokenizer
    argv = _with(tokenizer_argv(tmp_path, 12, *SPLIT_INVARIANT), per_device_train_batch_size=4)  # 2 x 4 = the single run's 8
    _launch([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
             "-m", "mergevq_hf.training.train_tokenizer", *argv])

    assert {p.name for p in (tmp_path / "checkpoint-10").glob("rng_state_*.pth")} == {"rng_state_0.pth", "rng_state_1.pth"}
    MergeVQModel.from_pretrained(tmp_path)
    state = json.loads((tmp_path / "trainer_state.json").read_text())
    logs = train_logs(state["log_history"])
    assert sorted(logs) == list(range(1, 13))
    assert [logs[s]["num_tokens"] for s in logs] == [single_logs[s]["num_tokens"] for s in logs]  # same K per step
    for step in (1, 2, 3):  # the same updates: gradients are averaged over processes, the discriminator's too
        for key in ("loss", "grad_norm", "reconstruction_loss", "batch_entropy", "discriminator_loss", "generator_adversarial_loss"):
            assert logs[step][key] == pytest.approx(single_logs[step][key], rel=2e-3), (step, key)
    ddp, single = (json.loads((d / "eval_results.json").read_text()) for d in (tmp_path, single_dir))
    assert all(0 < run[key] < 2 for run in (ddp, single) for key in ("raw_l1", "ema_l1"))  # finite, on [-1, 1] images


@pytest.mark.slow
def test_accelerate_launch_two_processes_match_one_process(single_process_tokenizer, tmp_path, repo_root, mergear_argv, train_logs):
    tokenizer_dir = single_process_tokenizer[0]
    cache = tmp_path / "tokens"
    single = train_mergear.main(mergear_argv(tokenizer_dir, tmp_path / "single", cache, 12))  # batch 16
    argv = _with(mergear_argv(tokenizer_dir, tmp_path / "ddp", cache, 12), per_device_train_batch_size=8)
    _launch([sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(repo_root / "examples" / "accelerate_configs" / "cpu_2proc.yaml"),
             "--main_process_port", str(_free_port()), "-m", "mergevq_hf.training.train_mergear", *argv])

    assert (tmp_path / "ddp" / "checkpoint-12" / "rng_state_1.pth").is_file()
    MergeARForCausalLM.from_pretrained(tmp_path / "ddp")
    ddp_logs = train_logs(json.loads((tmp_path / "ddp" / "trainer_state.json").read_text())["log_history"])
    single_logs = train_logs(single.state.log_history)
    for step in (1, 12):
        assert ddp_logs[step]["loss"] == pytest.approx(single_logs[step]["loss"], rel=0.02)
    ddp_eval, single_eval = (json.loads((tmp_path / run / "eval_results.json").read_text())["eval_loss"] for run in ("ddp", "single"))
    assert ddp_eval == pytest.approx(single_eval, rel=0.02)
