#!/usr/bin/env python
"""Per-process memory of tokenizer training in one process, with DDP and with FSDP2 (2 CPU processes, gloo).

Each run is a few steps of ``python -m mergevq_hf.training.train_tokenizer`` (under ``torchrun`` for 2 processes)
at the same global batch; the trainer writes the largest per-process footprint to ``train_results.json``:
``process_parameter_bytes`` and ``process_optimizer_state_bytes`` (what this process holds of the tokenizer's
weights and AdamW state: all of it, or its shard under FSDP2) and ``process_peak_rss_mb`` (``ru_maxrss``, which also
counts torch itself, the data and the activations). The discriminator is replicated and not counted.

    python benchmarks/bench_fsdp_memory.py                  # tiny and reduced G+R, prints a Markdown table
    python benchmarks/bench_fsdp_memory.py --presets tiny   # one preset
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

# (preset, --config_overrides): G+R's widths with fewer blocks and 64x64 images, so a few steps fit on a CPU.
PRESETS = {
    "tiny": ("tiny", {}),
    "G+R reduced": (
        "G+R",
        {"image_size": 64, "num_res_blocks": 1, "num_hidden_layers": 2, "decoder_num_hidden_layers": 2, "num_tokens": 9,
         "num_tokens_candidates": [9, 16], "num_tokens_probs": [0.5, 0.5]},
    ),
}
FSDP2 = ["--fsdp", "--fsdp_config", json.dumps({"version": 2, "state_dict_type": "SHARDED_STATE_DICT"})]


def run(mode: str, preset: str, overrides: dict, output_dir: Path, global_batch: int, steps: int) -> dict:
    processes = 1 if mode == "single" else 2
    argv = [
        "--output_dir", str(output_dir), "--preset", preset, "--config_overrides", json.dumps(overrides), "--dataset", f"procedural:{4 * global_batch}",
        "--teacher", "none", "--perceptual_loss", "none", "--max_steps", str(steps), "--per_device_train_batch_size", str(global_batch // processes),
        "--save_steps", "100000", "--logging_steps", "1", "--eval_samples", "0", "--seed", "0", "--use_cpu", "--disable_tqdm", "true",
    ]
    module = ["-m", "mergevq_hf.training.train_tokenizer"]
    if processes == 1:
        cmd = [sys.executable, *module, *argv]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", *module, *argv]
    if mode == "fsdp2":
        cmd += FSDP2
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"{mode} {preset} failed:\n{proc.stderr[-3000:]}")
    return json.loads((output_dir / "train_results.json").read_text())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--presets", nargs="+", default=list(PRESETS), choices=list(PRESETS))
    parser.add_argument("--global_batch", type=int, default=4)
    parser.add_argument("--steps", type=int, default=2)
    args = parser.parse_args()

    rows = ["| Preset | Run | Processes | Parameters / process (MiB) | AdamW state / process (MiB) | Peak RSS / process (MiB) |", "|---|---|---|---|---|---|"]
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.presets:
            preset, overrides = PRESETS[name]
            for mode in ("single", "ddp", "fsdp2"):
                m = run(mode, preset, overrides, Path(tmp) / f"{name}-{mode}".replace(" ", "_").replace("+", ""), args.global_batch, args.steps)
                rows.append(
                    f"| {name} | {mode} | {1 if mode == 'single' else 2} | {m['process_parameter_bytes'] / 2**20:.2f} | "
                    f"{m['process_optimizer_state_bytes'] / 2**20:.2f} | {m['process_peak_rss_mb']:.0f} |"
                )
                print(rows[-1], flush=True)
    print("\n".join(rows))


if __name__ == "__main__":
    main()
