#!/usr/bin/env bash
# Bundled model, stage 2 (resumable: rerun with RESUME=1), in two runs: `python -m reproduction train mergear-w8
# --steps 3600` (repeat window W = 8, one grid row), then `mergear-w8-continued --steps 3600`: 3,600 more steps from
# its weights at lr 5e-4 with a fresh optimiser (benchmarks/RESULTS.md, issue 13).
set -e
cd "$(dirname "$0")/.."
export OMP_NUM_THREADS=1 HF_HUB_OFFLINE=1
.venv/bin/python examples/train_mergear.py --tokenizer outputs/bundle/tokenizer --output_dir outputs/bundle/mergear-steps3600 \
  --preset tiny --config_overrides '{"hidden_size": 128, "num_hidden_layers": 4, "num_attention_heads": 4, "intermediate_size": 352, "num_factorized_layers": 1, "repeat_window": 8}' \
  --dataset fashion_mnist --max_train_samples 30000 --num_tokens_candidates 9 16 25 --num_tokens_probs 0.2 0.6 0.2 \
  --max_steps 3600 --per_device_train_batch_size 64 --learning_rate 1e-3 --logging_steps 50 --save_steps 900 \
  --save_total_limit 4 --seed 0 --use_cpu --disable_tqdm true ${RESUME:+--resume_from_checkpoint last}
exec .venv/bin/python examples/train_mergear.py --tokenizer outputs/bundle/tokenizer --output_dir outputs/bundle/mergear \
  --init_from outputs/bundle/mergear-steps3600 \
  --dataset fashion_mnist --max_train_samples 30000 --num_tokens_candidates 9 16 25 --num_tokens_probs 0.2 0.6 0.2 \
  --max_steps 3600 --per_device_train_batch_size 64 --learning_rate 5e-4 --logging_steps 50 --save_steps 900 \
  --save_total_limit 4 --seed 0 --use_cpu --disable_tqdm true ${RESUME:+--resume_from_checkpoint last}
