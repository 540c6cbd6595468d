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
    fn()  # warm-up
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


def main_stats(model, pixels, num_tokens, repeats):
    """(encode seconds, seconds after the CNN stem) for one batch, best of `repeats`."""
    with torch.inference_mode():
        stem = best_time(lambda: model.encoder.stem(pixels), repeats)
        total = best_time(lambda: model.encode(pixels, num_tokens=num_tokens), repeats)
    return total, total - stem


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--presets", nargs="+", default=["G+R", "G"])
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
        merged, merged_rest = main_stats(model, pixels, num_patches // 4, args.repeats)
        unmerged, unmerged_rest = main_stats(model, pixels, num_patches, args.repeats)
        batch = args.batch_size
        print(f"| {preset} | {num_patches} | {num_patches // 4} | {batch / merged:.2f} | {batch / unmerged:.2f} | "
              f"{unmerged / merged:.2f}x | {unmerged_rest / merged_rest:.2f}x | {1 - unmerged_rest / unmerged:.0%} |")

if __name__ == "__main__":
    main()
