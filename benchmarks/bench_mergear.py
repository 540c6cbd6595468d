"""MergeAR decode: repeat-evicting MergeARCache vs the full DynamicCache, same random weights, CPU.

Each row gets a synthetic source map with exactly K groups (K random seed positions on the token grid, every
position joins its nearest seed, as the tokenizer's merged regions do) and K distinct random codes, so the raster
sequence repeats codes like a real MergeVQ token grid. That sequence is teacher-forced one token per step through
the backbone with each cache (prefill of the 2 prompt tokens excluded from the timing). A third column runs
MergeARCache(compress=False): the same storage without eviction, which separates the effect of eviction from
that of preallocated storage. The caches run in lockstep (see `decode`), so machine load affects them alike.

Usage: python benchmarks/bench_mergear.py [--hidden-size 256 --layers 4 --heads 4 --threads N]
Prints markdown tables; benchmarks/RESULTS_mergear.md holds the figures and the machine they ran on.
"""

import argparse
import os
import platform
import time

import torch
from transformers import DynamicCache

from mergevq_hf.cache_mergear import MergeARCache
from mergevq_hf.configuration_mergear import MergeARConfig
from mergevq_hf.modeling_mergear import MergeARForCausalLM

CASES = [(16, 144, 1), (16, 144, 32), (32, 256, 1), (32, 256, 32)]  # (grid side, K, batch)


def synthetic_tokens(grid: int, num_groups: int, batch: int, codebook_size: int) -> torch.Tensor:
    """``[batch, grid**2]`` raster codes with exactly ``num_groups`` nearest-seed regions per row."""
    cells = torch.stack(torch.meshgrid(torch.arange(grid), torch.arange(grid), indexing="ij"), -1).flatten(0, 1)
    rows = []
    for _ in range(batch):
        seeds = cells[torch.randperm(grid * grid)[:num_groups]].float()
        group = torch.cdist(cells.float(), seeds).argmin(1)  # every seed is its own nearest: K non-empty groups
        codes = torch.randperm(codebook_size)[:num_groups]
        rows.append(codes[group])
    return torch.stack(rows)


def kv_bytes(cache) -> int:
    if isinstance(cache, MergeARCache):
        return cache.stored_bytes()
    return sum(layer.keys.nbytes + layer.values.nbytes for layer in cache.layers if layer.is_initialized)


def decode(model, prompt, tokens, caches):
    """Teacher-force ``tokens[:, :-1]`` one per step through every cache in lockstep.

    The caches take turns at every step (in rotating order), so load from other processes on a shared machine
    hits all of them alike. Returns ``{name: (tokens/s, peak KV bytes)}``.
    """
    names = list(caches)
    elapsed = dict.fromkeys(names, 0.0)
    with torch.inference_mode():
        for cache in caches.values():
            model.model(prompt, cache=cache)
        peak = {name: kv_bytes(cache) for name, cache in caches.items()}
        steps = tokens.shape[1] - 1
        for step in range(steps):
            for name in names[step % len(names) :] + names[: step % len(names)]:
                start = time.perf_counter()
                model.model(tokens[:, step : step + 1], cache=caches[name])
                elapsed[name] += time.perf_counter() - start
                peak[name] = max(peak[name], kv_bytes(caches[name]))
    return {name: (steps * tokens.shape[0] / elapsed[name], peak[name]) for name in names}


def step_split(model, prompt, tokens, steps=8):
    """Mean seconds of a mid-sequence backbone step (MergeARCache) and of the exact-joint head on its output.

    The two alternate, so machine load hits both alike. The head computes ``log p(lo) + log p(hi | lo)`` for
    every code, i.e. it runs its small transformer for all ``2**low_bits`` low values of every row.
    """
    cache, middle = MergeARCache(model.config), tokens.shape[1] // 2
    backbone = head = 0.0
    with torch.inference_mode():
        model.model(torch.cat([prompt, tokens[:, :middle]], dim=1), cache=cache)
        for step in range(middle, middle + steps):
            start = time.perf_counter()
            hidden = model.model(tokens[:, step : step + 1], cache=cache).last_hidden_state
            backbone += time.perf_counter() - start
            start = time.perf_counter()
            model.logits(hidden)
            head += time.perf_counter() - start
    return backbone / steps, head / steps


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--hidden-size", type=int, default=256)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    cpu = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")), "")
    print(
        f"torch {torch.__version__}, {args.threads} thread(s), nproc {os.cpu_count()}, "
        f"{cpu or platform.processor()}; model d={args.hidden_size}, {args.layers} layers, {args.heads} heads, "
        "2^18 codes (6+12 factorised head), W=1, float32\n"
    )
    print("| L | K | batch | cache | decode tok/s | peak KV MiB | KV vs full | tok/s vs full |")
    print("|---|---|---|---|---|---|---|---|")
    step_seconds = {}
    for grid, num_tokens, batch in CASES:
        config = MergeARConfig.from_preset(
            "L",
            grid_size=grid,
            num_tokens=num_tokens,
            hidden_size=args.hidden_size,
            num_hidden_layers=args.layers,
            num_attention_heads=args.heads,
            intermediate_size=args.hidden_size * 11 // 4,
        )
        model = MergeARForCausalLM(config).eval()
        tokens = synthetic_tokens(grid, num_tokens, batch, config.codebook_size)
        prompt = model.build_prompt(torch.randint(0, config.num_classes, (batch,)), num_tokens)
        caches = {
            "DynamicCache (full)": DynamicCache(),
            "MergeARCache(compress=False)": MergeARCache(config, compress=False),
            "MergeARCache": MergeARCache(config),
        }
        results = decode(model, prompt, tokens, caches)
        full_speed, full_bytes = results["DynamicCache (full)"]
        for name, (speed, peak) in results.items():
            print(
                f"| {grid * grid} | {num_tokens} | {batch} | {name} | {speed:.0f} | {peak / 2**20:.1f} | "
                f"{peak / full_bytes:.2f}x | {speed / full_speed:.2f}x |",
                flush=True,
            )
        step_seconds[(grid * grid, batch)] = step_split(model, prompt, tokens)
    print("\nOne full decode step at mid-sequence: backbone (MergeARCache) vs the exact-joint output head:\n")
    print("| L | batch | backbone ms/step | joint head ms/step | head share of a full step |")
    print("|---|---|---|---|---|")
    for (length, batch), (backbone, head) in step_seconds.items():
        print(
            f"| {length} | {batch} | {backbone * 1e3:.1f} | {head * 1e3:.1f} | {head / (head + backbone):.0%} |",
            flush=True,
        )


if __name__ == "__main__":
    main()
