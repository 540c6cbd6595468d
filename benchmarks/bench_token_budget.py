#!/usr/bin/env python
"""The token budget on the bundled model: quality, distinct codes, K/V entries and speed, with and without it.

For guidance 1 and 2, three ways to sample the bundled MergeAR (factorised 4+6-bit head, K = 16 merge instruction,
L = 64 decode steps, temperature 1, no top-k / top-p): the exact joint distribution, per sub-token (the default when
sampling), and per sub-token with ``token_budget=True`` (a row holding K distinct codes may only repeat one of them).
Each row: FD-LeNet and class accuracy (LeNet trained on Fashion-MNIST) of N samples (same seeds in every row, one
generator per image) against N test images, the mean number of distinct codes per image, the mean K/V entries a
sequence holds at the end (``MergeARCache``), and decode tokens/s over speed batches in which the rows take turns.

A second part times ``generate`` (per sub-token, guidance 2, batch 50) with its GC pause and with the pause switched
off, in CPU seconds, the two taking turns, on this process's unfrozen heap: at this small size a decode step is
mostly Python overhead, which is where cyclic collections show.

Usage: python benchmarks/bench_token_budget.py [--num-samples 500 --speed-batches 4 --gc-repeats 6 --parts quality gc]
"""

import argparse
import contextlib
import gc
import os
import platform
import statistics
import time

import torch

from mergevq_hf import MergeARForCausalLM, MergeVQModel, modeling_mergear
from mergevq_hf.bundled import bundled_model_path
from mergevq_hf.evaluation import dataset_to_tensors, evaluate_generation
from mergevq_hf.evaluation.sampling import batch_generator
from mergevq_hf.generation_mergear import distinct_counts
from mergevq_hf.training import load_fashion_mnist

SETUPS = {  # row name -> generate options
    "exact joint": {"sampling": "joint"},
    "per sub-token": {"sampling": "sub_token"},
    "per sub-token + token budget": {"sampling": "sub_token", "token_budget": True},
}


def cpu_name() -> str:
    """The ``model name`` that ``lscpu`` prints (from /proc/cpuinfo), else what platform knows."""
    try:
        with open("/proc/cpuinfo") as info:
            return next(line.split(":", 1)[1].strip() for line in info if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor() or platform.machine()


def row_generators(generator: torch.Generator, rows: int) -> list[torch.Generator]:
    seeds = torch.randint(0, 2**62, (rows,), generator=generator)
    return [torch.Generator().manual_seed(int(seed)) for seed in seeds]


def generate(model, labels, guidance_scale, options, generator):
    out = model.generate(class_labels=labels, guidance_scale=guidance_scale, do_sample=True, top_k=0,
                         generators=row_generators(generator, len(labels)), return_dict_in_generate=True, **options)
    return model.image_tokens_from_sequences(out.sequences), out.cache


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--num-samples", type=int, default=500, help="generated and test images per row (default 500)")
    parser.add_argument("--speed-batches", type=int, default=4, help="timed batches of 50 per row (default 4)")
    parser.add_argument("--gc-repeats", type=int, default=6, help="timed calls per GC variant (default 6)")
    parser.add_argument("--parts", nargs="+", default=["quality", "gc"], choices=["quality", "gc"])
    args = parser.parse_args()
    torch.set_num_threads(1)
    path = bundled_model_path()
    vq_model = MergeVQModel.from_pretrained(os.path.join(path, "vq_model")).eval()
    model = MergeARForCausalLM.from_pretrained(os.path.join(path, "transformer")).eval()
    config = model.config
    if "gc" in args.parts:
        gc_table(model, args.gc_repeats)
    if "quality" not in args.parts:
        return
    reference, _ = dataset_to_tensors(load_fashion_mnist("test"), 32, num_samples=args.num_samples, seed=0)
    labels = torch.arange(args.num_samples) % config.num_classes
    print(f"Bundled MergeAR, K = {config.num_tokens}, L = {config.num_patches}; {args.num_samples} samples "
          f"per row vs {len(reference)} test images; {args.speed_batches} speed batches of 50; "
          f"{cpu_name()}, 1 torch thread, torch {torch.__version__}.\n")
    print("| CFG | sampling | FD-LeNet ↓ | class accuracy ↑ | distinct codes per image | K/V entries per sequence | "
          "decode tokens/s |")
    print("|---|---|---|---|---|---|---|")
    names = list(SETUPS)
    for cfg in (1.0, 2.0):
        quality = {}
        for name, options in SETUPS.items():
            def sample(batch_labels, generator, options=options):
                return vq_model.decode(generate(model, batch_labels, cfg, options, generator)[0])

            quality[name] = evaluate_generation(sample, labels, reference, feature_networks=("lenet-fashion",))
        elapsed, entries, distinct = (dict.fromkeys(names, 0.0) for _ in range(3))
        with torch.inference_mode():
            for b in range(args.speed_batches):
                batch_labels = torch.arange(50) % config.num_classes
                for name in names[b % len(names):] + names[: b % len(names)]:
                    start = time.perf_counter()
                    codes, cache = generate(model, batch_labels, cfg, SETUPS[name], batch_generator(0, b))
                    elapsed[name] += time.perf_counter() - start
                    entries[name] += (cache.ring + cache.lengths.float().mean().item()) / args.speed_batches
                    distinct[name] += distinct_counts(codes).float().mean().item() / args.speed_batches
        tokens = args.speed_batches * 50 * config.num_patches
        for name in names:
            row = quality[name]
            print(f"| {cfg:g} | {name} | {row['fd/lenet-fashion']:.1f} | {row['class_accuracy/lenet-fashion']:.3f} | "
                  f"{distinct[name]:.1f} | {entries[name]:.1f} | {tokens / elapsed[name]:.0f} |", flush=True)


def gc_table(model, repeats: int) -> None:
    """``generate`` with its GC pause vs with the pause switched off, in CPU seconds, the variants taking turns.

    Both decoding loops: MergeAR's own (per sub-token, one generator per image) and transformers' ``_sample``
    (exact joint). A ``gc.callbacks`` hook counts the cyclic collections that run during the calls.
    """
    labels = torch.arange(50) % model.config.num_classes

    def own_loop(repeat):
        generate(model, labels, 2.0, {"sampling": "sub_token"}, torch.Generator().manual_seed(repeat))

    def transformers_loop(repeat):
        torch.manual_seed(repeat)
        model.generate(class_labels=labels, guidance_scale=2.0, do_sample=True, top_k=0, sampling="joint")

    paused = modeling_mergear.paused_gc
    variants = {"paused (default)": paused, "running": contextlib.nullcontext}
    collections, current = {}, None  # variant -> phases ("start", "stop") of the collections during its calls

    def on_gc(phase, info):
        if current is not None:
            collections[current].append(phase)

    print(f"GC pause, bundled MergeAR, batch 50, guidance 2, median of {repeats} calls:\n")
    print("| decoding loop | GC during generate | CPU s per call | speed vs GC running | collections per call |")
    print("|---|---|---|---|---|")
    gc.callbacks.append(on_gc)
    try:
        with torch.inference_mode():
            for loop_name, loop in (("MergeAR's own (per sub-token)", own_loop), ("transformers' (joint)", transformers_loop)):
                seconds = {name: [] for name in variants}
                collections = {name: [] for name in variants}
                for repeat in range(repeats):
                    for current in list(variants)[repeat % 2 :] + list(variants)[: repeat % 2]:
                        modeling_mergear.paused_gc = variants[current]
                        start = time.process_time()
                        loop(repeat)
                        seconds[current].append(time.process_time() - start)
                        current = None
                running = statistics.median(seconds["running"])
                for name, values in seconds.items():
                    print(f"| {loop_name} | {name} | {statistics.median(values):.2f} | "
                          f"{running / statistics.median(values):.3f}x | {collections[name].count('stop') / repeats:.1f} |")
    finally:
        modeling_mergear.paused_gc = paused
        gc.callbacks.remove(on_gc)
    print(flush=True)


if __name__ == "__main__":
    main()
