#!/usr/bin/env bash
# Models of the reproduction table (benchmarks/reproduce_paper.py). Tokenizers are trained with the bundled tokenizer's
# budget and recipe (scripts/train_bundled_tokenizer.sh: 1,200 steps x 32 images, lr 4e-4, GAN from step 400, seed 0).
# Resumable: rerun with RESUME=1. Outputs go to outputs/reproduction/NAME; SEED=N (default 0) trains another seed
# into outputs/reproduction/NAME-seedN.
#
#   scripts/train_reproduction.sh NAME...
#     mergevq-kN   MergeVQ trained at a fixed K=N (N=64=L: merging off), e.g. mergevq-k9 mergevq-k36 mergevq-k64
#     grid-vq-S    diffusers VQModel with an SxS token grid (S=4: 16 tokens, S=8: 64 tokens)
#     raster-ar    the bundled MergeAR's recipe and budget (scripts/train_bundled_mergear.sh) on the bundled
#                  tokenizer, with repeat_window = L = 64: no repeated token is ever hidden, i.e. plain raster AR
set -euo pipefail
cd "$(dirname "$0")/.."
export OMP_NUM_THREADS=1 HF_HUB_OFFLINE=1
budget=(--dataset fashion_mnist --max_steps 1200 --per_device_train_batch_size 32 --learning_rate 4e-4
        --discriminator_start 400 --logging_steps 50 --save_steps 200 --save_total_limit 2 --seed ${SEED:-0} --use_cpu
        --disable_tqdm true ${RESUME:+--resume_from_checkpoint last})
for name in "$@"; do
  out="outputs/reproduction/$name${SEED:+-seed$SEED}"
  case "$name" in
    mergevq-k*)
      k=${name#mergevq-k}
      .venv/bin/python examples/train_tokenizer.py --output_dir "$out" --preset tiny \
        --config_overrides "{\"num_tokens\": $k, \"num_tokens_candidates\": [$k], \"num_tokens_probs\": [1.0]}" "${budget[@]}" ;;
    grid-vq-*)
      .venv/bin/python benchmarks/train_grid_vq.py --output_dir "$out" --grid_size "${name#grid-vq-}" "${budget[@]}" ;;
    raster-ar)
      .venv/bin/python examples/train_mergear.py --tokenizer src/mergevq_hf/pretrained/mergevq-fashion-mnist-tiny/vq_model \
        --output_dir "$out" --preset tiny \
        --config_overrides '{"hidden_size": 128, "num_hidden_layers": 4, "num_attention_heads": 4, "intermediate_size": 352, "num_factorized_layers": 1, "repeat_window": 64}' \
        --dataset fashion_mnist --max_train_samples 30000 --num_tokens_candidates 9 16 25 --num_tokens_probs 0.2 0.6 0.2 \
        --max_steps 1200 --per_device_train_batch_size 64 --learning_rate 1e-3 --logging_steps 50 --save_steps 250 \
        --save_total_limit 2 --seed ${SEED:-0} --use_cpu --disable_tqdm true ${RESUME:+--resume_from_checkpoint last} ;;
    *) echo "unknown model $name (expected mergevq-kN, grid-vq-S or raster-ar)" >&2; exit 2 ;;
  esac
done
