"""Small-scale reproduction of the paper's claims on Fashion-MNIST 32x32, at equal training budgets.

Scores trained models and prints three markdown tables; ``--write FILE`` replaces each part's marked block in FILE
(``<!-- reproduction:tokenizers:begin -->`` ... ``end -->``, likewise ``generation``), or appends it:

1. **Merged vs grid tokens**: MergeVQ at K=16 merged tokens vs a plain grid VQ with the same token count (diffusers
   ``VQModel``, 4x4 grid) vs MergeVQ with merging off (K=L=64), and the 8x8 grid VQ as the K=L peer.
   rFID proxy = Frechet distance of LeNet (Fashion-MNIST classifier) and MobileNetV2 (ImageNet) features, PSNR, SSIM.
2. **K ablation** (paper Table 4): MergeVQ trained at K = 64, 36, 16, 9 (K/L = the paper's 256, 144, 64, 36 of
   L = 256): rFID proxy, PSNR, linear probe and k-NN on ``get_image_features``, encoder FLOPs; beside them the
   bundled tokenizer (trained with a K mixture) evaluated at the same K, and the paper's G+R numbers.
3. **MergeAR vs raster AR**: the bundled MergeAR with its repeat-evicting ``MergeARCache`` vs the same weights with a
   full ``DynamicCache`` (compression off), and vs a raster AR trained at the same budget without the sparsity mask:
   FD and class accuracy of samples (same seeds), decode tokens/s (the rows take turns per batch, so machine load
   hits them alike) and K/V entries per sequence.

Every model is trained by ``python -m reproduction train`` (:mod:`reproduction.train`) with the budget and recipe of
its bundled counterpart (tokenizers: 1,200 steps x 32 images; raster AR: 1,200 steps x 64; seed 0):

    python -m reproduction train mergevq-k64 mergevq-k36 mergevq-k16 mergevq-k9 grid-vq-4 grid-vq-8 raster-ar
    python -m reproduction train mergevq-k64 mergevq-k36 mergevq-k16 mergevq-k9 --seed 1   # optional: seed spread
    python -m reproduction score --write benchmarks/RESULTS.md
"""

from __future__ import annotations

import argparse
import functools
import math
import os
import platform
import re
import time
from pathlib import Path

import torch
from diffusers import VQModel
from torch.utils.flop_counter import FlopCounterMode
from transformers import DynamicCache

from mergevq_hf import MergeARForCausalLM, MergeVQModel
from mergevq_hf.bundled import bundled_model_path
from mergevq_hf.cache_mergear import MergeARCache
from mergevq_hf.evaluation import dataset_to_tensors, evaluate_generation, evaluate_reconstruction, evaluate_representation
from mergevq_hf.evaluation.sampling import batch_generator
from mergevq_hf.training import FASHION_MNIST_HELDOUT_ROWS, load_fashion_mnist

from .alignment import alignment_table
from .generators import ablation_table, curve_table, generate_codes, samples_table
from .grid_vq import GridVQTokenizer

FEATURES = ("lenet-fashion", "mobilenet_v2")
ABLATION_K = (64, 36, 16, 9)
# Paper Table 4, G+R (L = 256), at the same K/L as our K over L = 64: (paper K, rFID, linear probe top-1 % on ImageNet).
PAPER_TABLE4 = {64: (256, 2.15, 48.6), 36: (144, 3.07, 51.0), 16: (64, 6.51, 51.8), 9: (36, 8.94, 52.1)}
MARKERS = "<!-- reproduction:{part}:begin -->", "<!-- reproduction:{part}:end -->"


def load_tokenizer(models: Path, name: str):
    path = models / name
    if not (path / "config.json").is_file():
        raise SystemExit(f"{path} holds no trained model: run `python -m reproduction train {name}` first")
    if name.startswith("grid-vq-"):
        return GridVQTokenizer(VQModel.from_pretrained(path)).eval()
    return MergeVQModel.from_pretrained(path).eval()


def reconstruction_parameters(model) -> int:
    """Parameters on the image -> codes -> image path (MergeVQ's alignment head and source recovery excluded)."""
    skip = ("encoder.alignment_head.", "source_recovery.")
    return sum(p.numel() for name, p in model.named_parameters() if not name.startswith(skip))


def encoder_mflops(model, num_tokens: int | None) -> float:
    """FLOPs of encoding one image to K codes (matmuls, convolutions, attention), counted by torch."""
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        model.encode(torch.zeros(1, 3, 32, 32), num_tokens=num_tokens)
    return counter.get_total_flops() / 1e6


def score_tokenizer(model, num_tokens, images, probe_data) -> dict:
    row = evaluate_reconstruction(model, images, num_tokens=[num_tokens], feature_networks=FEATURES)[0]
    pooling = "mean" if isinstance(model, GridVQTokenizer) else "cls"
    row.update(evaluate_representation(model, *probe_data, pooling=pooling))
    row["encoder_mflops"] = encoder_mflops(model, num_tokens)
    row["params"] = reconstruction_parameters(model)
    return row


def tokenizer_tables(models: Path, test_images, probe_data) -> str:
    bundled = MergeVQModel.from_pretrained(os.path.join(bundled_model_path(), "vq_model")).eval()
    trained = {k: score_tokenizer(load_tokenizer(models, f"mergevq-k{k}"), k, test_images, probe_data) for k in ABLATION_K}
    grid = {s: score_tokenizer(load_tokenizer(models, f"grid-vq-{s}"), None, test_images, probe_data) for s in (4, 8)}
    # One pass for all K: the test images' own features are extracted once.
    at_k = dict(zip(ABLATION_K, evaluate_reconstruction(bundled, test_images, num_tokens=ABLATION_K, feature_networks=FEATURES)))
    for row in at_k.values():
        row["params"] = reconstruction_parameters(bundled)
    # A second training seed where one was trained (`python -m reproduction train ... --seed 1`): run-to-run spread.
    seed1 = {k: score_tokenizer(load_tokenizer(models, f"mergevq-k{k}-seed1"), k, test_images, probe_data)
             for k in ABLATION_K if (models / f"mergevq-k{k}-seed1" / "config.json").is_file()}
    for k, row in at_k.items():
        print(f"bundled @K={k}: {row}", flush=True)

    def cells(row):
        return (f"{row['fd/lenet-fashion']:.1f} | {row['fd/mobilenet_v2']:.2f} | {row['psnr']:.2f} | {row['ssim']:.3f} | "
                f"{row['codebook_usage']:.2f} | {row['params'] / 1e3:.0f}k")

    lines = [
        "### 1. Merged tokens vs a grid VQ with the same token count\n",
        "| tokenizer | tokens | FD-LeNet ↓ | FD-MobileNetV2 ↓ | PSNR ↑ | SSIM ↑ | codebook usage | params (recon path) |",
        "|---|---|---|---|---|---|---|---|",
        f"| MergeVQ, trained and scored at K=16 | 16 merged | {cells(trained[16])} |",
        f"| MergeVQ bundled (K mixture, 71% K=16), at K=16 | 16 merged | {cells(at_k[16])} |",
        f"| diffusers VQModel, 4x4 grid | 16 grid | {cells(grid[4])} |",
        f"| MergeVQ, merging off (K=L) | 64 | {cells(trained[64])} |",
        f"| diffusers VQModel, 8x8 grid | 64 grid | {cells(grid[8])} |",
        "",
        "### 2. K ablation (paper Table 4)\n",
        "| K (K/L) | FD-LeNet ↓ | FD-MobileNetV2 ↓ | PSNR ↑ | linear probe ↑ | k-NN ↑ | encoder MFLOPs | seed 1: FD-LeNet / PSNR / lin. | bundled @K: FD-LeNet / PSNR | paper G+R: K, rFID, lin. % |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for k in ABLATION_K:
        row, test_time, paper = trained[k], at_k[k], PAPER_TABLE4[k]
        other = seed1.get(k)
        other = f"{other['fd/lenet-fashion']:.1f} / {other['psnr']:.2f} / {other['linear_probe']:.3f}" if other else "–"
        lines.append(
            f"| {k} ({k / 64:.2f}) | {row['fd/lenet-fashion']:.1f} | {row['fd/mobilenet_v2']:.2f} | {row['psnr']:.2f} | "
            f"{row['linear_probe']:.3f} | {row['knn20']:.3f} | {row['encoder_mflops']:.2f} | {other} | "
            f"{test_time['fd/lenet-fashion']:.1f} / {test_time['psnr']:.2f} | {paper[0]}, {paper[1]}, {paper[2]} |"
        )
    for s in (4, 8):
        row = grid[s]
        lines.append(
            f"| grid VQ {s}x{s} ({s * s} tokens) | {row['fd/lenet-fashion']:.1f} | {row['fd/mobilenet_v2']:.2f} | {row['psnr']:.2f} | "
            f"{row['linear_probe']:.3f} | {row['knn20']:.3f} | {row['encoder_mflops']:.2f} | – | – | – |"
        )
    return "\n".join(lines)


def kv_entries(cache) -> float:
    """Mean K/V entries (tokens) a row of the cache holds; a full cache holds every token of the sequence."""
    if isinstance(cache, MergeARCache):
        return cache.ring + float(cache.lengths.float().mean())
    return float(cache.get_seq_length())


def generation_table(models: Path, reference_images, num_samples: int, speed_batches: int, batch_size: int = 50) -> str:
    path = bundled_model_path()
    vq_model = MergeVQModel.from_pretrained(os.path.join(path, "vq_model")).eval()
    mergear = MergeARForCausalLM.from_pretrained(os.path.join(path, "transformer")).eval()
    if not (models / "raster-ar" / "config.json").is_file():
        raise SystemExit(f"{models / 'raster-ar'} holds no trained model: run `python -m reproduction train raster-ar` first")
    raster = MergeARForCausalLM.from_pretrained(models / "raster-ar").eval()
    config = mergear.config
    # (name, model, cache factory): the bundled MergeAR with and without eviction, and a raster AR trained densely.
    setups = [
        ("MergeAR (W=1), MergeARCache", mergear, lambda: MergeARCache(config)),
        ("same weights, full DynamicCache", mergear, DynamicCache),
        ("raster AR trained with W=L, full DynamicCache", raster, DynamicCache),
    ]
    entry_bytes = 2 * config.num_hidden_layers * config.hidden_size * 4  # K and V of every layer, float32
    labels = torch.arange(num_samples) % config.num_classes
    with torch.no_grad():  # what the merge instruction asks for: the test images' own codes at K
        real_codes = vq_model.encode(reference_images, num_tokens=config.num_tokens).indices
    real_distinct = sum(len(row.unique()) for row in real_codes) / len(real_codes)
    lines = [
        "### 3. MergeAR vs raster AR\n",
        f"Bundled tokenizer and MergeAR (K = {config.num_tokens} merge instruction, L = {config.num_patches} "
        f"decode steps, temperature 1, no top-k); the raster AR has the same size, recipe and budget (1,200 steps x 64) "
        f"but repeat_window = L, so training hides nothing. {num_samples} samples per row (same seeds in every row) vs "
        f"{len(reference_images)} test images. Speed: {speed_batches} batches of {batch_size}, the three rows taking turns. "
        "K/V: mean entries a sequence holds at the end (with CFG each image has two sequences); "
        "distinct codes: mean number of different codes among an image's L generated tokens "
        f"(a K-token image has at most K; the test images tokenised at K = {config.num_tokens} have {real_distinct:.1f}).\n",
        "| CFG | generator, cache | FD-LeNet ↓ | class accuracy ↑ | FD-MobileNetV2 ↓ | distinct codes per image | decode tokens/s | K/V entries per sequence | K/V KiB per image |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for cfg in (1.0, 2.0):
        quality = {}
        for name, model, new_cache in setups:
            def sample(batch_labels, generator, model=model, new_cache=new_cache):
                return vq_model.decode(generate_codes(model, batch_labels, cfg, new_cache(), generator))

            quality[name] = evaluate_generation(sample, labels, reference_images, feature_networks=FEATURES, batch_size=batch_size)
            print(f"CFG {cfg} {name}: {quality[name]}", flush=True)
        elapsed, entries, distinct = dict.fromkeys(quality, 0.0), dict.fromkeys(quality, 0.0), dict.fromkeys(quality, 0.0)
        with torch.inference_mode():
            for b in range(speed_batches):
                batch_labels = torch.arange(batch_size) % config.num_classes
                for name, model, new_cache in setups[b % 3 :] + setups[: b % 3]:
                    cache = new_cache()
                    start = time.perf_counter()
                    codes = generate_codes(model, batch_labels, cfg, cache, batch_generator(0, b))
                    elapsed[name] += time.perf_counter() - start
                    entries[name] += kv_entries(cache) / speed_batches
                    distinct[name] += sum(len(row.unique()) for row in codes) / len(codes) / speed_batches
        tokens = speed_batches * batch_size * config.num_patches
        rows_per_image = 2 if cfg != 1.0 else 1
        for name in quality:
            row = quality[name]
            lines.append(
                f"| {cfg:g} | {name} | {row['fd/lenet-fashion']:.1f} | {row['class_accuracy/lenet-fashion']:.3f} | "
                f"{row['fd/mobilenet_v2']:.2f} | {distinct[name]:.1f} | {tokens / elapsed[name]:.0f} | {entries[name]:.1f} | "
                f"{entries[name] * rows_per_image * entry_bytes / 1024:.1f} |"
            )
    return "\n".join(lines)


def write_section(results_file: Path, part: str, body: str) -> None:
    """Replace the text between ``part``'s markers in ``results_file`` (or append a marked block), atomically."""
    begin, end = (marker.format(part=part) for marker in MARKERS)
    text = results_file.read_text()
    block = f"{begin}\n{body}\n{end}"
    if begin in text and end in text:
        text = re.sub(re.escape(begin) + ".*?" + re.escape(end), lambda _: block, text, flags=re.S)
    else:
        text = text.rstrip("\n") + "\n\n" + block + "\n"
    tmp = results_file.with_name(results_file.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, results_file)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--models", type=Path, default=Path("outputs/reproduction"), help="folder of `python -m reproduction train` outputs")
    parser.add_argument("--parts", default="tokenizers,generation", help="comma-separated: tokenizers, generation, alignment, ablations, curves, guidance, k25")
    parser.add_argument("--ablations", type=Path, default=Path("outputs/ablation"), help="folder of the generator ablations (parts ablations, curves, guidance, k25)")
    parser.add_argument("--curves", default="mergear-steps1200,raster-steps1200", help="curves: comma-separated ablation rows whose checkpoints are scored")
    parser.add_argument("--sample-rows", default="bundled MergeAR", help="guidance, k25: comma-separated ablation rows scored at --guidance-scales (K = 16), or at K = 25")
    parser.add_argument("--guidance-scales", default="3,4", help="guidance: comma-separated guidance scales (K = 16)")
    parser.add_argument("--reference", choices=("heldout", "test"), default="test",
                        help="ablations, curves, guidance, k25: compare samples with held-out training images (for choosing) or test images (for reporting)")
    parser.add_argument("--num-test", type=int, default=2000, help="Fashion-MNIST test images scored (fixed subset)")
    parser.add_argument("--num-probe-train", type=int, default=10000, help="train images for the linear probe and k-NN")
    parser.add_argument("--num-generated", type=int, default=1000, help="samples per generation row")
    parser.add_argument("--speed-batches", type=int, default=4)
    parser.add_argument("--write", type=Path, help="markdown file whose marked reproduction blocks are replaced")


def run(args: argparse.Namespace) -> None:
    """Score the trained models and print (and with ``--write``, write) each part's tables."""
    torch.set_num_threads(1)
    parts = set(args.parts.split(","))
    if not parts <= {"tokenizers", "generation", "alignment", "ablations", "curves", "guidance", "k25"}:
        raise SystemExit(f"--parts takes tokenizers, generation, alignment, ablations, curves, guidance and/or k25, got {args.parts!r}")
    try:
        guidance_scales = tuple(float(scale) for scale in args.guidance_scales.split(","))
    except ValueError:
        raise SystemExit(f"--guidance-scales takes comma-separated numbers, e.g. 2.5,3, got {args.guidance_scales!r}") from None
    if any(not math.isfinite(scale) or scale < 1 for scale in guidance_scales):
        raise SystemExit(f"--guidance-scales must be finite and at least 1 (1: no guidance), got {args.guidance_scales!r}")
    if args.num_generated > args.num_test:
        raise SystemExit(f"--num-generated ({args.num_generated}) cannot exceed --num-test ({args.num_test}): the reference set is that many test images")

    test_images, test_labels = dataset_to_tensors(load_fashion_mnist("test"), 32, num_samples=args.num_test, seed=0)
    cpu = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")), platform.machine())
    header = (
        f"Produced by `python -m reproduction score --parts {{part}}` on {cpu} (1 torch thread), torch "
        f"{torch.__version__}. FD values are on classifier features, not Inception: compare rows, not ImageNet FIDs.\n\n"
    )
    if parts & {"tokenizers", "alignment"}:
        train_images, train_labels = dataset_to_tensors(load_fashion_mnist("train"), 32, num_samples=args.num_probe_train, seed=0)
    if "tokenizers" in parts:
        body = header.format(part="tokenizers") + (
            f"Reconstruction on {args.num_test} Fashion-MNIST test images (fixed subset, seed 0); linear probe and 20-NN "
            f"fitted on {args.num_probe_train} train images (MergeVQ: the global token; grid VQ: mean latent).\n\n"
        ) + tokenizer_tables(args.models, test_images, (train_images, train_labels, test_images, test_labels))
        print(body, flush=True)
        if args.write:
            write_section(args.write, "tokenizers", body)
    if "generation" in parts:
        body = header.format(part="generation") + generation_table(args.models, test_images[: args.num_generated], args.num_generated, args.speed_batches)
        print(body, flush=True)
        if args.write:
            write_section(args.write, "generation", body)
    if "alignment" in parts:
        body = header.format(part="alignment") + alignment_table(args.models, test_images, (train_images, train_labels, test_images, test_labels))
        print(body, flush=True)
        if args.write:
            write_section(args.write, "alignment", body)
    if parts & {"ablations", "curves", "guidance", "k25"}:
        if args.reference == "heldout":
            reference = dataset_to_tensors(load_fashion_mnist("train").select(FASHION_MNIST_HELDOUT_ROWS), 32, num_samples=args.num_generated, seed=0)
        else:
            reference = test_images[: args.num_generated], test_labels[: args.num_generated]
        tables = {
            "ablations": ablation_table,
            "curves": functools.partial(curve_table, names=args.curves.split(",")),
            # Other guidance scales at K = 16, and K = 25 (what an unconstrained generator's ~30 codes are closer to).
            "guidance": functools.partial(samples_table, names=args.sample_rows.split(","), scales=guidance_scales, num_tokens=16),
            "k25": functools.partial(samples_table, names=args.sample_rows.split(","), scales=(1.0, 2.0), num_tokens=25),
        }
        for part, table in tables.items():
            if part in parts:
                command = f"{part} --reference {args.reference} --num-generated {args.num_generated} --num-test {args.num_test}"
                body = header.format(part=command) + table(args.ablations, reference, args.reference, args.num_generated)
                print(body, flush=True)
                if args.write:
                    write_section(args.write, f"{part}-{args.reference}", body)
