#!/usr/bin/env python
"""MergeAR ``generate`` vs LlamaGen's own sampling loop at equal backbone size: random weights, CPU, one thread.

LlamaGen is not part of this repository. Pass a checkout of https://github.com/FoundationVision/LlamaGen with
``--llamagen PATH``: its ``autoregressive/models/gpt.py`` (which imports ``utils/drop_path.py`` from the same checkout)
and ``autoregressive/models/generate.py`` are imported from there at run time; they need only torch.

Both generators get seeded random weights of the same backbone (Llama-style, SwiGLU width as LlamaGen computes it)
and sample class-conditionally with guidance 2 (``[cond; uncond]`` rows in one batch), temperature 1, no top-k or
top-p. Rows:

* LlamaGen: ``generate.py``'s loop with its static KV cache and its dense ``2**14`` head.
* MergeAR, paper head (``2**18`` codes, 6+12-bit factorised head), per-sub-token sampling, ``MergeARCache``.
* the same with the exact joint (the head's second slot runs for all 64 low values of every row).
* the same per sub-token with a full ``DynamicCache`` (no eviction).
* MergeAR with a dense ``2**14`` head (LlamaGen's vocabulary) and ``MergeARCache``.

The MergeAR rows run with ``token_budget=True``: random weights have no notion of the merge instruction, and the
budget makes a row produce ``K`` distinct codes and then repeat them, as a trained MergeAR is asked to, so the cache
evicts what it would evict in use. The calls alternate in one process (the rows take turns in a rotating order per
repeat) and are timed in CPU seconds of the process (one thread), which other jobs on a shared machine hardly move
(wall seconds are printed too). Python's GC is frozen after the imports (``gc.freeze()``) for all rows. A last table times MergeAR's per-sub-token row with and without its GC pause, with the heap unfrozen.

Usage: python benchmarks/bench_vs_llamagen.py --llamagen /path/to/LlamaGen [--sizes 256 1024] [--repeats 2]
       [--rows llamagen sub_token joint dynamic dense] [--skip-joint]   (the exact joint is by far the slowest row)
"""

import argparse
import contextlib
import gc
import statistics
import sys
import time
from pathlib import Path

import torch
from transformers import DynamicCache

from mergevq_hf import modeling_mergear
from mergevq_hf.cache_mergear import MergeARCache
from mergevq_hf.configuration_mergear import MergeARConfig
from mergevq_hf.generation_mergear import distinct_counts
from mergevq_hf.modeling_mergear import MergeARForCausalLM

GUIDANCE_SCALE = 2.0
ROWS = {  # --rows key -> row name
    "llamagen": "LlamaGen generate.py (static cache, dense 2^14 head)",
    "sub_token": "MergeAR paper head 2^18, per sub-token, MergeARCache",
    "joint": "MergeAR paper head 2^18, exact joint, MergeARCache",
    "dynamic": "MergeAR paper head 2^18, per sub-token, full DynamicCache",
    "dense": "MergeAR dense 2^14 head, MergeARCache",
}
NUM_CLASSES = 1000
# L -> backbone (LlamaGen GPT-B is d768 x 12 layers), merge instruction K and batch.
CASES = {
    256: {"dim": 768, "layers": 12, "heads": 12, "num_tokens": 144, "batch": 8},
    1024: {"dim": 512, "layers": 12, "heads": 8, "num_tokens": 256, "batch": 4},
}


def cpu_name() -> str:
    """The ``model name`` that ``lscpu`` prints (from /proc/cpuinfo)."""
    try:
        with open("/proc/cpuinfo") as info:
            return next(line.split(":", 1)[1].strip() for line in info if line.startswith("model name"))
    except (OSError, StopIteration):
        return "unknown CPU"


def import_llamagen(path: Path):
    if not (path / "autoregressive" / "models" / "gpt.py").is_file():
        raise SystemExit(f"--llamagen {path}: no autoregressive/models/gpt.py there (a LlamaGen checkout is needed)")
    sys.path.insert(0, str(path))
    from autoregressive.models.generate import generate
    from autoregressive.models.gpt import ModelArgs, Transformer

    return ModelArgs, Transformer, generate


def swiglu_width(dim: int) -> int:
    # LlamaGen's FeedForward: 2/3 of 4 * dim, rounded up to a multiple of 256.
    hidden = int(2 * 4 * dim / 3)
    return -(-hidden // 256) * 256


def build_rows(llamagen, grid: int, case: dict):
    """Row name -> (callable(labels) returning (codes [B, L], K/V entries per sequence))."""
    ModelArgs, Transformer, llamagen_generate = llamagen
    length, dim = grid * grid, case["dim"]
    torch.manual_seed(0)
    gpt = Transformer(ModelArgs(dim=dim, n_layer=case["layers"], n_head=case["heads"], vocab_size=2**14,
                                block_size=length, num_classes=NUM_CLASSES, cls_token_num=1)).eval()
    backbone = {"hidden_size": dim, "num_hidden_layers": case["layers"], "num_attention_heads": case["heads"],
                "intermediate_size": swiglu_width(dim), "grid_size": grid, "num_classes": NUM_CLASSES,
                "num_tokens": case["num_tokens"]}
    torch.manual_seed(0)
    paper = MergeARForCausalLM(MergeARConfig(**backbone)).eval()  # 2**18 codes, 6+12-bit head
    torch.manual_seed(0)
    dense = MergeARForCausalLM(MergeARConfig(**backbone, codebook_bits=14, factorized_bits=None)).eval()

    def llamagen_row(labels):
        codes = llamagen_generate(gpt, labels, length, cfg_scale=GUIDANCE_SCALE, temperature=1.0, top_k=0, top_p=1.0,
                                  sample_logits=True)
        return codes, float(gpt.max_seq_length)  # its static cache holds every position

    def mergear_row(model, sampling, new_cache):
        def run(labels):
            cache = new_cache(model.config)
            sequences = model.generate(class_labels=labels, guidance_scale=GUIDANCE_SCALE, do_sample=True,
                                       temperature=1.0, top_k=0, sampling=sampling, token_budget=True, cache=cache)
            if isinstance(cache, MergeARCache):
                entries = cache.ring + cache.lengths.float().mean().item()
            else:
                entries = float(cache.get_seq_length())
            return model.image_tokens_from_sequences(sequences), entries

        return run

    return {
        ROWS["llamagen"]: llamagen_row,
        ROWS["sub_token"]: mergear_row(paper, "sub_token", MergeARCache),
        ROWS["joint"]: mergear_row(paper, "joint", MergeARCache),
        ROWS["dynamic"]: mergear_row(paper, "sub_token", lambda config: DynamicCache()),
        ROWS["dense"]: mergear_row(dense, "joint", MergeARCache),
    }


def alternate(rows: dict, labels: torch.Tensor, repeats: int) -> dict:
    """Time every row ``repeats`` times, the rows taking turns in a rotating order.

    Returns ``{name: (median CPU seconds, median wall seconds, distinct codes, K/V entries)}``. CPU time of this
    single-threaded process is the figure compared: on a shared machine, wall time mostly measures the other jobs.
    """
    names = list(rows)
    seconds, wall = {name: [] for name in names}, {name: [] for name in names}
    distinct, entries = {}, {}
    with torch.inference_mode():
        for repeat in range(repeats):
            for name in names[repeat % len(names):] + names[: repeat % len(names)]:
                torch.manual_seed(repeat)
                start, start_wall = time.process_time(), time.perf_counter()
                codes, held = rows[name](labels)
                seconds[name].append(time.process_time() - start)
                wall[name].append(time.perf_counter() - start_wall)
                print(f"  {name}: {seconds[name][-1]:.1f} CPU s, {wall[name][-1]:.1f} s", file=sys.stderr, flush=True)
                distinct[name], entries[name] = distinct_counts(codes.long()).float().mean().item(), held
    return {
        name: (statistics.median(seconds[name]), statistics.median(wall[name]), distinct[name], entries[name])
        for name in names
    }


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--llamagen", type=Path, required=True, help="path of a LlamaGen checkout")
    parser.add_argument("--sizes", type=int, nargs="+", default=[256, 1024], choices=sorted(CASES), help="values of L")
    parser.add_argument("--repeats", type=int, default=2, help="timed calls per row (median reported; default 2)")
    parser.add_argument("--rows", nargs="+", default=list(ROWS), choices=list(ROWS), help="rows to time (default: all)")
    parser.add_argument("--skip-joint", action="store_true", help="leave out the slow exact-joint row")
    parser.add_argument("--gc-repeats", type=int, default=2, help="calls per variant in the GC table (0 = skip)")
    args = parser.parse_args()
    torch.set_num_threads(1)
    llamagen = import_llamagen(args.llamagen)
    gc.collect()
    gc.freeze()  # everything imported so far: no collection scans it again, for any row
    print(f"{cpu_name()}, 1 torch thread, torch {torch.__version__}, Python {sys.version.split()[0]}; guidance "
          f"{GUIDANCE_SCALE}, temperature 1, no top-k/top-p; median of {args.repeats} calls per row.\n")
    for length in args.sizes:
        case, grid = CASES[length], int(length**0.5)
        selected = [ROWS[key] for key in args.rows if not (args.skip_joint and key == "joint")]
        rows = {name: row for name, row in build_rows(llamagen, grid, case).items() if name in selected}
        labels = torch.arange(case["batch"]) * 7 % NUM_CLASSES
        stats = alternate(rows, labels, args.repeats)
        base_name = next(iter(stats))  # LlamaGen unless --rows leaves it out
        base = stats[base_name][0]
        print(f"### L = {length} (grid {grid}x{grid}), K = {case['num_tokens']}, batch {case['batch']}, backbone "
              f"d{case['dim']} x {case['layers']} layers, {case['heads']} heads\n")
        reference = "LlamaGen" if base_name == ROWS["llamagen"] else "first row"
        print(f"| generator | CPU s per call | image tokens per CPU s | speed vs {reference} | wall s per call | "
              "distinct codes per image | K/V entries per sequence |")
        print("|---|---|---|---|---|---|---|")
        for name, (seconds, wall, distinct, entries) in stats.items():
            print(f"| {name} | {seconds:.1f} | {case['batch'] * length / seconds:.1f} | {base / seconds:.2f}x | "
                  f"{wall:.1f} | {distinct:.1f} | {entries:.1f} |", flush=True)
        print()
        if args.gc_repeats and length == args.sizes[0] and ROWS["sub_token"] in rows:
            gc_table(rows, labels, args.gc_repeats)


def gc_table(rows: dict, labels: torch.Tensor, repeats: int) -> None:
    """MergeAR's per-sub-token row with its GC pause vs with the pause switched off, on an unfrozen heap."""
    paused = rows[ROWS["sub_token"]]

    def unpaused(labels):
        original, modeling_mergear.paused_gc = modeling_mergear.paused_gc, contextlib.nullcontext
        try:
            return paused(labels)
        finally:
            modeling_mergear.paused_gc = original

    gc.unfreeze()
    stats = alternate({"GC paused during generate (default)": paused, "GC running": unpaused}, labels, repeats)
    gc.freeze()
    print("GC pause, MergeAR paper head per sub-token, heap not frozen (as in a user's process):\n")
    print("| variant | CPU s per call | speed vs GC running | wall s per call |")
    print("|---|---|---|---|")
    running = stats["GC running"][0]
    for name, (seconds, wall, _, _) in stats.items():
        print(f"| {name} | {seconds:.1f} | {running / seconds:.3f}x | {wall:.1f} |", flush=True)
    print()


if __name__ == "__main__":
    main()
