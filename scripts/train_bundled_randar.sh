#!/usr/bin/env bash
# Random-order model on the bundled tokenizer (issue 8 comparison) (resumable: rerun with RESUME=1).
cd "$(dirname "$0")/.."
export OMP_NUM_THREADS=1 HF_HUB_OFFLINE=1
exec .venv/bin/python examples/train_mergear.py --tokenizer outputs/bundle/tokenizer --output_dir outputs/bundle/randar --generation_mode random \
  --preset tiny --config_overrides '{"hidden_size": 128, "num_hidden_layers": 4, "num_attention_heads": 4, "intermediate_size": 352, "num_factorized_layers": 1}' \
  --dataset fashion_mnist --max_train_samples 30000 --num_tokens_candidates 9 16 25 --num_tokens_probs 0.2 0.6 0.2 \
  --max_steps 1200 --per_device_train_batch_size 64 --learning_rate 1e-3 --logging_steps 50 --save_steps 250 \
  --save_total_limit 2 --seed 0 --use_cpu --disable_tqdm true ${RESUME:+--resume_from_checkpoint last}
