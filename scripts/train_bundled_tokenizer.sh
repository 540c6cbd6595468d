#!/usr/bin/env bash
# Bundled model, stage 1 (resumable: rerun with RESUME=1). Extra arguments are appended and win, e.g. the paper's
# alignment recipe into its own folder: scripts/train_bundled_tokenizer.sh --alignment paper --output_dir outputs/bundle/tokenizer-paper
cd "$(dirname "$0")/.."
export OMP_NUM_THREADS=1 HF_HUB_OFFLINE=1
exec .venv/bin/python examples/train_tokenizer.py --output_dir outputs/bundle/tokenizer --preset tiny \
  --dataset fashion_mnist --max_steps 1200 --per_device_train_batch_size 32 --learning_rate 4e-4 \
  --discriminator_start 400 --logging_steps 50 --save_steps 200 --save_total_limit 2 --seed 0 --use_cpu \
  --disable_tqdm true ${RESUME:+--resume_from_checkpoint last} "$@"
