"""Encoder throughput with token merging (K = L/4) vs without (K = L), same random weights, CPU.

The CNN stem runs before any merging, so the script also reports the speed-up of the part after the stem.

Usage: python benchmarks/bench_tokenizer.py [--presets G+R G] [--batch-size 8] [--repeats 3]
Prints a markdown table; the figures in benchmarks/RESULTS.md come from this script.
"""

import argparse
import platform
import time

import torch

from mergevq_hf import MergeVQConfig, MergeVQModel


def best_time(fn, repeats):
    """Seconds of one call of `fn` (after `repeats` extra calls, the best)."""
    best = float("inf")
    for _ in range(repeats + 1):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


def encode_times(model, pixels, num_tokens_list, repeats):
    """Best seconds per batch for each K, (whole encode, encode after a precomputed stem).

    Merged and unmerged runs alternate, so load from other processes hits them alike. The "after the stem" time
    replays the stem's output, so it is exactly the part that merging can change (blocks, merging, head, LFQ).
    """
    whole = {k: float("inf") for k in num_tokens_list}
    after_stem = dict(whole)
    with torch.inference_mode():
        features = model.encoder.stem(pixels)
        for _ in range(repeats + 1):  # the first round is a warm-up
            for k in num_tokens_list:
                whole[k] = min(whole[k], best_time(lambda: model.encode(pixels, num_tokens=k), 0))
                model.encoder.stem = lambda _pixels: features  # instance attribute: replay the stem output
                after_stem[k] = min(after_stem[k], best_time(lambda: model.encode(pixels, num_tokens=k), 0))
                del model.encoder.stem
    return whole, after_stem


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--presets", nargs="+", default=["G+R", "G", "R"])
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    print(f"torch {torch.__version__}, {args.threads} threads, {platform.processor() or platform.machine()}, batch {args.batch_size}\n")
    print("| preset | L | K | merged img/s | unmerged img/s | speed-up (whole encoder) | speed-up (after the stem) | stem share of unmerged time |")
    print("|---|---|---|---|---|---|---|---|")
    for preset in args.presets:
        config = MergeVQConfig.from_preset(preset, use_source_recovery=False, alignment_head="none")
        model = MergeVQModel(config).eval()
        pixels = torch.rand(args.batch_size, 3, config.image_size, config.image_size) * 2 - 1
        num_patches = config.num_patches
        merged_k = num_patches // 4
        whole, after_stem = encode_times(model, pixels, [merged_k, num_patches], args.repeats)
        batch = args.batch_size
        merged, unmerged = whole[merged_k], whole[num_patches]
        print(f"| {preset} | {num_patches} | {merged_k} | {batch / merged:.2f} | {batch / unmerged:.2f} | "
              f"{unmerged / merged:.2f}x | {after_stem[num_patches] / after_stem[merged_k]:.2f}x | "
              f"{1 - after_stem[num_patches] / unmerged:.0%} |")

if __name__ == "__main__":
    main()
