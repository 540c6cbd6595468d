"""Encoder throughput with token merging (K = L/4) vs without (K = L), same random weights, CPU.

Usage: python benchmarks/bench_tokenizer.py [--presets G+R G] [--batch-size 8] [--repeats 3]
Prints a markdown table; the figures in benchmarks/RESULTS.md come from this script.
"""

import argparse
import platform
import time

import torch

from mergevq_hf import MergeVQConfig, MergeVQModel


def images_per_second(model, pixels, num_tokens, repeats):
    with torch.inference_mode():
        model.encode(pixels, num_tokens=num_tokens)  # warm-up
        best = float("inf")
        for _ in range(repeats):
            start = time.perf_counter()
            model.encode(pixels, num_tokens=num_tokens)
            best = min(best, time.perf_counter() - start)
    return pixels.shape[0] / best


def transformer_share(model, pixels):
    """Fraction of no-merge encode time spent after the CNN stem (the part merging can shrink)."""
    with torch.inference_mode():
        start = time.perf_counter()
        model.encoder.stem(pixels)
        stem = time.perf_counter() - start
        start = time.perf_counter()
        model.encode(pixels, num_tokens=model.config.num_patches)
        total = time.perf_counter() - start
    return 1 - stem / total


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
    print("| preset | L | K | merged img/s | unmerged img/s | speed-up | transformer share of unmerged time |")
    print("|---|---|---|---|---|---|---|")
    for preset in args.presets:
        config = MergeVQConfig.from_preset(preset, use_source_recovery=False, alignment_head="none")
        model = MergeVQModel(config).eval()
        pixels = torch.rand(args.batch_size, 3, config.image_size, config.image_size) * 2 - 1
        num_patches = config.num_patches
        merged = images_per_second(model, pixels, num_patches // 4, args.repeats)
        unmerged = images_per_second(model, pixels, num_patches, args.repeats)
        share = transformer_share(model, pixels)
        print(f"| {preset} | {num_patches} | {num_patches // 4} | {merged:.2f} | {unmerged:.2f} | "
              f"{merged / unmerged:.2f}x | {share:.0%} |")


if __name__ == "__main__":
    main()
