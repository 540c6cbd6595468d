"""Multi-process training on CPU (DDP over gloo): ``torchrun`` for the tokenizer, ``accelerate launch`` for MergeAR.

Each launcher starts two fresh Python processes, which makes these the slowest training tests (about half a minute
each on two cores); they live in their own file so that a quick run can leave them out
(``pytest --ignore tests/test_training_distributed.py``). Each compares the 2-process run with a 1-process run of
the same global batch (same data order, same K per step).

For the tokenizer, the terms that see the whole batch are switched off (LFQ's batch entropy, the discriminator's
BatchNorm, LeCAM's batch-mean anchors), so two processes compute the same update as one, up to the order of float
sums: the first steps must match closely. Later steps drift apart (an LFQ code whose latent sits near zero flips on
a rounding difference), so the final models are compared by quality only.
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

from test_training import ROOT, _script, mergear_argv, tokenizer_argv, train_logs

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
def single_process_tokenizer(tmp_path_factory):
    out = tmp_path_factory.mktemp("tokenizer_1proc")
    trainer = _script("train_tokenizer").main(tokenizer_argv(out, 12, *SPLIT_INVARIANT))  # batch 8
    return out, train_logs(trainer.state.log_history)


def test_torchrun_two_processes_match_one_process(single_process_tokenizer, tmp_path):
    single_dir, single_logs = single_process_tokenizer
    argv = _with(tokenizer_argv(tmp_path, 12, *SPLIT_INVARIANT), per_device_train_batch_size=4)  # 2 x 4 = the single run's 8
    _launch([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
             str(ROOT / "examples" / "train_tokenizer.py"), *argv])

    assert {p.name for p in (tmp_path / "checkpoint-10").glob("rng_state_*.pth")} == {"rng_state_0.pth", "rng_state_1.pth"}
    MergeVQModel.from_pretrained(tmp_path)
    state = json.loads((tmp_path / "trainer_state.json").read_text())
    logs = train_logs(state["log_history"])
    assert sorted(logs) == list(range(1, 13))
    assert [logs[s]["num_tokens"] for s in logs] == [single_logs[s]["num_tokens"] for s in logs]  # same K per step
    for step in (1, 2, 3):  # the same updates: gradients are averaged over processes, the discriminator's too
        for key in ("loss", "grad_norm", "reconstruction_loss", "discriminator_loss", "generator_adversarial_loss"):
            assert logs[step][key] == pytest.approx(single_logs[step][key], rel=2e-3), (step, key)
    ddp, single = (json.loads((d / "eval_results.json").read_text()) for d in (tmp_path, single_dir))
    start = logs[1]["reconstruction_loss"]
    assert ddp["raw_l1"] < start - 0.05 and single["raw_l1"] < start - 0.05  # both learned
    assert ddp["raw_l1"] == pytest.approx(single["raw_l1"], abs=0.08)


def test_accelerate_launch_two_processes_match_one_process(single_process_tokenizer, tmp_path):
    tokenizer_dir = single_process_tokenizer[0]
    cache = tmp_path / "tokens"
    single = _script("train_mergear").main(mergear_argv(tokenizer_dir, tmp_path / "single", cache, 12))  # batch 16
    argv = _with(mergear_argv(tokenizer_dir, tmp_path / "ddp", cache, 12), per_device_train_batch_size=8)
    _launch([sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(ROOT / "examples" / "accelerate_configs" / "cpu_2proc.yaml"),
             "--main_process_port", str(_free_port()), str(ROOT / "examples" / "train_mergear.py"), *argv])

    assert (tmp_path / "ddp" / "checkpoint-12" / "rng_state_1.pth").is_file()
    MergeARForCausalLM.from_pretrained(tmp_path / "ddp")
    ddp_logs = train_logs(json.loads((tmp_path / "ddp" / "trainer_state.json").read_text())["log_history"])
    single_logs = train_logs(single.state.log_history)
    for step in (1, 12):
        assert ddp_logs[step]["loss"] == pytest.approx(single_logs[step]["loss"], rel=0.02)
    ddp_eval, single_eval = (json.loads((tmp_path / run / "eval_results.json").read_text())["eval_loss"] for run in ("ddp", "single"))
    assert ddp_eval == pytest.approx(single_eval, rel=0.02)
