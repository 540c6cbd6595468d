"""Random-order generation (MergeRandAR) vs raster MergeAR, and the cost of predicted source maps.

Three parts, each printing a markdown table (benchmarks/RESULTS.md, "Random-order generation", holds the figures):

* ``speed``: decoding steps per image (K for MergeRandAR, L for MergeAR) and images/s, same backbone sizes, random
  weights, batched CFG, on this machine's CPU (or ``--device``). MergeAR runs ``generate`` with its
  repeat-evicting ``MergeARCache``; MergeRandAR runs its own loop with a ``DynamicCache`` (one forward of the pair
  ``[y_n, P(p_{n+1})]`` per step). The two alternate per repeat, so machine load hits both alike.
* ``recon --tokenizer DIR``: Fashion-MNIST test images encoded to K tokens and decoded through the true source
  map vs the source map that the learned source recovery predicts from the K codes alone (what random-order
  generation has to use). PSNR, FD on the Fashion-MNIST LeNet (rFID-style), and how many positions get their
  true parent. Paper, ImageNet G+R: rFID 1.48 (true) -> 1.71 (predicted). ``--soft-maps`` and ``--ensemble-with DIR``
  add two ways of using the recovery at inference: decoding each position's expected code instead of its most likely
  parent's, and averaging two recoveries (e.g. two training seeds).
* ``generation --tokenizer DIR [--mergear DIR...] [--randar DIR...]``: FD and class accuracy (LeNet) of class-conditional
  samples of both generators on the same tokenizer, against Fashion-MNIST test images (``--reference heldout``:
  training images no generator saw, for choosing settings; ``--reference heldout test``: both, from the same samples);
  one folder per training seed, scored with the same sample seeds, then the mean and (lowest-highest) over seeds.
  The real side is the whole reference set (10,000 images) unless ``--reference-images N`` asks for a fixed subset.
  ``--through-recovery`` adds MergeAR's samples decoded through the recovery's map of their merged tokens: what the
  decoding path alone costs, on MergeAR's content (it also prints how many distinct codes MergeAR made per image).
  ``--randar-num-tokens K...`` asks random order for other K than MergeAR: an ungated MergeAR asked for K makes more
  distinct codes than K, so equal K is not an equal token count. ``--randar-sampling sub_token joint`` scores random
  order drawing per sub-token (the default, as MergeAR draws) and from the exact joint.

Python's GC is frozen after the imports, for every part (the libraries' objects would otherwise be rescanned during
the decoding loops).

Usage:
    python benchmarks/bench_randar.py speed [--threads N]
    python benchmarks/bench_randar.py recon --tokenizer src/mergevq_hf/pretrained/mergevq-fashion-mnist-tiny/vq_model
    python benchmarks/bench_randar.py generation --tokenizer T --mergear M0 M1 --randar R0 R1 [--num-samples 2000]
"""

import argparse
import gc
import platform
import time
from collections import defaultdict

import torch

from mergevq_hf import MergeARConfig, MergeARForCausalLM, MergeRandARConfig, MergeRandARForCausalLM, MergeVQModel
from mergevq_hf.cache_mergear import first_occurrence
from mergevq_hf.source_recovery import SourceRecovery

SPEED_CASES = [(16, 144, 1), (16, 144, 16), (32, 256, 1), (32, 256, 16)]  # (grid side, K, batch)


def speed(args):
    sizes = dict(
        hidden_size=args.hidden_size, num_hidden_layers=args.layers, num_attention_heads=args.heads,
        intermediate_size=int(args.hidden_size * 2.75), num_factorized_layers=1, num_classes=10,
        codebook_bits=args.codebook_bits,
        factorized_bits=[args.codebook_bits // 2, args.codebook_bits - args.codebook_bits // 2],
    )
    print(f"CPU: {platform.processor() or platform.machine()}, torch threads {torch.get_num_threads()}, "
          f"hidden {args.hidden_size}, {args.layers} layers, {args.codebook_bits}-bit codes, "
          f"guidance scale {args.guidance_scale}\n")
    print("| grid (L) | K | batch | MergeAR steps | MergeRandAR steps | MergeAR img/s | MergeRandAR img/s | speed-up |")
    print("|---|---|---|---|---|---|---|---|")
    for grid, num_tokens, batch in SPEED_CASES:
        torch.manual_seed(0)
        common = dict(sizes, grid_size=grid, num_tokens=num_tokens)
        raster = MergeARForCausalLM(MergeARConfig(**common)).eval().to(args.device)
        random_order = MergeRandARForCausalLM(MergeRandARConfig(**common)).eval().to(args.device)
        labels = torch.arange(batch) % 10

        def run_raster():
            raster.generate(
                class_labels=labels, num_tokens=num_tokens, guidance_scale=args.guidance_scale, do_sample=True, top_k=0
            )

        def run_random():
            generator = torch.Generator(args.device)
            random_order.generate(
                labels, num_tokens=num_tokens, guidance_scale=args.guidance_scale, generator=generator
            )

        elapsed = {"raster": 0.0, "random": 0.0}
        with torch.inference_mode():
            run_raster(), run_random()  # warm-up
            for repeat in range(args.repeats):
                for name, run in sorted({"raster": run_raster, "random": run_random}.items(), reverse=repeat % 2 == 1):
                    start = time.perf_counter()
                    run()
                    if args.device != "cpu":
                        torch.cuda.synchronize()
                    elapsed[name] += time.perf_counter() - start
        rate = {name: batch * args.repeats / seconds for name, seconds in elapsed.items()}
        print(f"| {grid}x{grid} ({grid * grid}) | {num_tokens} | {batch} | {grid * grid} | {num_tokens} | "
              f"{rate['raster']:.2f} | {rate['random']:.2f} | {rate['random'] / rate['raster']:.2f}x |")


def fashion_test_images(image_size: int, num_samples: int | None = None):
    from mergevq_hf.evaluation import dataset_to_tensors
    from mergevq_hf.training import load_image_dataset

    return dataset_to_tensors(load_image_dataset("fashion_mnist", "test"), image_size, num_samples=num_samples)


def fashion_heldout_images(image_size: int, num_samples: int | None = None):
    """Training images that no generator saw, for choosing settings."""
    from mergevq_hf.evaluation import dataset_to_tensors
    from mergevq_hf.training import FASHION_MNIST_HELDOUT_ROWS, load_image_dataset

    heldout = load_image_dataset("fashion_mnist", "train").select(FASHION_MNIST_HELDOUT_ROWS)
    return dataset_to_tensors(heldout, image_size, num_samples=num_samples, seed=0)


@torch.no_grad()
def recon(args):
    from mergevq_hf.evaluation import extract_features, frechet_distance, load_feature_extractor, psnr

    vq_model = MergeVQModel.from_pretrained(args.tokenizer).eval().to(args.device)
    other = None
    if args.ensemble_with:
        other = MergeVQModel.from_pretrained(args.ensemble_with).eval().to(args.device)
        mine, theirs = vq_model.state_dict(), other.state_dict()
        if mine.keys() != theirs.keys() or any(
            not name.startswith("source_recovery.") and not torch.equal(mine[name], theirs[name]) for name in mine
        ):
            raise ValueError(f"--ensemble-with {args.ensemble_with} must be {args.tokenizer} with another source recovery "
                             "(same encoder, quantiser and decoder)")
    images, _ = fashion_test_images(vq_model.config.image_size, args.num_samples)
    lenet = load_feature_extractor("lenet-fashion", args.device)
    real = extract_features(lenet, images)[0]
    print(f"{len(images)} Fashion-MNIST test images, tokenizer {args.tokenizer}\n")
    # The decoder sees each position's parent's code, so a wrong parent holding the same code costs nothing: the
    # last column counts positions whose code is right.
    print("| K | source map | PSNR (dB) | FD-LeNet | positions with their true parent | positions with their true code |")
    print("|---|---|---|---|---|---|")
    # "predicted from codes + positions": what random-order generation has, each token's grid position as well
    with_positions = vq_model.config.source_recovery_with_positions
    for num_tokens in args.num_tokens or [vq_model.config.num_tokens]:
        rows, agreement, code_agreement = (defaultdict(list) for _ in range(3))  # per kind of map, in table order
        for batch in images.split(args.batch_size):
            batch = batch.to(args.device)
            encoded = vq_model.encode(batch, num_tokens=num_tokens)
            positions = SourceRecovery.token_positions(encoded.source_map, num_tokens)
            maps = {"true": encoded.source_map, "predicted from codes + positions": vq_model.predict_source_map(encoded.indices, positions)}
            if not with_positions:
                maps["predicted from codes"] = vq_model.predict_source_map(encoded.indices)
            mixtures = {}
            if args.soft_maps or other is not None:
                codes = vq_model.quantize.indices_to_codes(encoded.indices, dtype=vq_model.dtype)
                log_probabilities = vq_model.source_recovery(codes, positions).log_softmax(-1)
                if args.soft_maps:
                    mixtures["soft: each position the expected code under the predicted map"] = log_probabilities.exp()
                if other is not None:
                    averaged = (log_probabilities + other.source_recovery(codes, positions).log_softmax(-1)).div(2).softmax(-1)
                    maps["two recoveries, log-probabilities averaged"] = averaged.argmax(-1)
                    if args.soft_maps:
                        mixtures["soft, two recoveries averaged"] = averaged
            true_codes = encoded.indices.gather(1, encoded.source_map)
            for kind, source_map in maps.items():
                agreement[kind].append((source_map == encoded.source_map).float().mean(1).cpu())
                code_agreement[kind].append((encoded.indices.gather(1, source_map) == true_codes).float().mean(1).cpu())
                rows[kind].append(vq_model.decode(encoded.indices, source_map).float().cpu())
            for kind, weights in mixtures.items():  # the agreement columns: the same map's most likely parents
                agreement[kind].append((weights.argmax(-1) == encoded.source_map).float().mean(1).cpu())
                code_agreement[kind].append((encoded.indices.gather(1, weights.argmax(-1)) == true_codes).float().mean(1).cpu())
                rows[kind].append(decode_mixture(vq_model, codes, weights).float().cpu())
        for kind, decoded in rows.items():
            decoded = torch.cat(decoded)
            fd = frechet_distance(real, extract_features(lenet, decoded)[0])
            score = float(psnr(decoded, images.float()))
            print(f"| {num_tokens} | {kind} | {score:.2f} | {fd:.2f} | {float(torch.cat(agreement[kind]).mean()):.3f} | "
                  f"{float(torch.cat(code_agreement[kind]).mean()):.3f} |")


def decode_mixture(vq_model, codes: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """Pixels from every position's expected code under a soft source map `weights` [B, L, K] (codes [B, K, bits])."""
    side = vq_model.config.grid_size
    mixed = weights.to(codes.dtype) @ codes  # [B, L, bits]
    return vq_model.decoder(mixed.transpose(1, 2).reshape(len(codes), -1, side, side)).clamp(-1, 1)


def merged_tokens(raster_codes: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Each row of ``[N, L]`` raster codes as merged tokens: its distinct codes at the grid positions where each first
    appears (a repeated code rejoins its group in MergeAR's reading), in grid order."""
    return [(row[first], first.nonzero()[:, 0]) for row, first in zip(raster_codes, first_occurrence(raster_codes))]


def raster_through_recovery_sample_fn(pipe, **call_kwargs):
    """MergeAR's samples decoded through the source map the recovery predicts from their merged tokens, instead of
    through their own raster codes: the decoding path of random order applied to MergeAR's content. The sampler's
    ``distinct_codes`` collects each image's token count."""
    pipe.set_progress_bar_config(disable=True)

    def sample(class_labels, generator):
        steps = []

        def keep(pipeline, step, timestep, tensors):
            steps.append(tensors["next_tokens"].clone())
            return tensors

        pipe(class_labels=class_labels, generator=generator, output_type="pt", callback_on_step_end=keep, **call_kwargs)
        vq_model, images = pipe.vq_model, []
        for codes, positions in merged_tokens(torch.stack(steps, 1)):
            sample.distinct_codes.append(len(codes))
            codes, positions = codes[None].to(vq_model.device), positions[None].to(vq_model.device)
            images.append(vq_model.decode(codes, vq_model.predict_source_map(codes, positions)).clamp(-1, 1).float().cpu())
        return torch.cat(images)

    sample.distinct_codes = []
    return sample


def recording(sample_fn):
    """``sample_fn`` that keeps what it draws and its time spent drawing (``.seconds``); ``.replay()`` gives a sampler
    that hands the same images back in the same order, so one set of samples is scored against several reference sets."""
    drawn = []

    def sample(class_labels, generator):
        start = time.perf_counter()
        images = sample_fn(class_labels, generator)
        sample.seconds += time.perf_counter() - start
        drawn.append((class_labels.clone(), images))
        return images

    def replay():
        batches = iter(drawn)

        def sample_again(class_labels, generator):
            labels, images = next(batches)
            if not torch.equal(labels, class_labels):
                raise RuntimeError("replayed samples were asked for other labels than they were drawn for")
            return images

        return sample_again

    sample.seconds = 0.0
    sample.replay = replay
    return sample


@torch.no_grad()
def generation(args):
    from mergevq_hf import MergeVQPipeline
    from mergevq_hf.evaluation import evaluate_generation, format_seed_spread, pipeline_sample_fn

    vq_model = MergeVQModel.from_pretrained(args.tokenizer).eval().to(args.device)
    load_images = {"heldout": fashion_heldout_images, "test": fashion_test_images}
    references = {name: load_images[name](vq_model.config.image_size, args.reference_images)[0]
                  for name in args.reference}
    labels = torch.arange(args.num_samples) % 10
    against = " and ".join(f"{len(images)} {name}" for name, images in references.items())
    print(f"{args.num_samples} samples per model (labels cycling over the 10 classes) vs {against} images, "
          f"K = {args.num_tokens or 'default'}, guidance scale {args.guidance_scale}; several folders: one per training "
          "seed, mean (lowest-highest)\n")
    fd_columns = " | ".join(f"FD-LeNet ({name})" if len(references) > 1 else "FD-LeNet" for name in references)
    print(f"| generator | seeds | steps / image | {fd_columns} | class accuracy (LeNet) | images/s (sampling) |")
    print("|---|---|---|" + "---|" * len(references) + "---|---|")
    # (name, folders, class, K asked for, extra pipeline arguments or "recovery")
    rows = [("MergeAR (raster)", args.mergear, MergeARForCausalLM, args.num_tokens, {})] if args.mergear else []
    if args.mergear and args.linear_schedule:
        rows.append(("MergeAR (raster), linear CFG", args.mergear, MergeARForCausalLM, args.num_tokens,
                     {"guidance_schedule": "linear"}))
    for k in (args.randar_num_tokens or [args.num_tokens]) if args.randar else []:
        for sampling in args.randar_sampling:
            at_k = ("" if k == args.num_tokens else f", K = {k}") + ("" if sampling == "sub_token" else ", exact joint")
            rows.append((f"MergeRandAR (random order){at_k}", args.randar, MergeRandARForCausalLM, k,
                         {"sampling": sampling}))
            if args.linear_schedule:
                rows.append((f"MergeRandAR, linear CFG{at_k}", args.randar, MergeRandARForCausalLM, k,
                             {"sampling": sampling, "guidance_schedule": "linear"}))
    if args.through_recovery:
        rows.append(("MergeAR (raster), decoded through the source recovery", args.mergear, MergeARForCausalLM, args.num_tokens, "recovery"))
    for name, paths, model_class, num_tokens, extra in rows:
        scores = {"accuracy": [], "rate": [], **{f"fd/{reference}": [] for reference in references}}
        for path in paths:
            transformer = model_class.from_pretrained(path).eval().to(args.device)
            pipe = MergeVQPipeline(vq_model=vq_model, transformer=transformer)
            if extra == "recovery":
                sample_fn = raster_through_recovery_sample_fn(pipe, num_tokens=num_tokens, guidance_scale=args.guidance_scale)
            else:
                sample_fn = pipeline_sample_fn(pipe, num_tokens=num_tokens, guidance_scale=args.guidance_scale, **extra)
            recorded = recording(sample_fn)
            for i, (reference, images) in enumerate(references.items()):
                result = evaluate_generation(recorded if i == 0 else recorded.replay(), labels, images,
                                             feature_networks=("lenet-fashion",), batch_size=args.batch_size,
                                             device=args.device)
                scores[f"fd/{reference}"].append(result["fd/lenet-fashion"])
            scores["rate"].append(args.num_samples / recorded.seconds)
            scores["accuracy"].append(result["class_accuracy/lenet-fashion"])
            if extra == "recovery":
                counts = torch.tensor(sample_fn.distinct_codes, dtype=torch.float)
                print(f"  {path}: {counts.mean():.1f} distinct codes per image (the recovery's K)", flush=True)
        k = num_tokens or transformer.config.num_tokens
        steps = k if pipe.generation_mode == "random" else transformer.config.num_patches
        fds = " | ".join(format_seed_spread(scores[f"fd/{reference}"], 2) for reference in references)
        print(f"| {name} | {len(paths)} | {steps} | {fds} | {format_seed_spread(scores['accuracy'], 3)} | "
              f"{sum(scores['rate']) / len(paths):.1f} |")


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=None)
    parts = parser.add_subparsers(dest="part", required=True)
    part = parts.add_parser("speed")
    part.add_argument("--hidden-size", type=int, default=256)
    part.add_argument("--layers", type=int, default=4)
    part.add_argument("--heads", type=int, default=4)
    part.add_argument("--codebook-bits", type=int, default=18)
    part.add_argument("--guidance-scale", "--cfg", type=float, default=2.0)
    part.add_argument("--repeats", type=int, default=2)
    part = parts.add_parser("recon")
    part.add_argument("--tokenizer", required=True)
    part.add_argument("--num-tokens", type=int, nargs="*")
    part.add_argument("--num-samples", type=int, default=2000)
    part.add_argument("--batch-size", type=int, default=250)
    part.add_argument("--soft-maps", action="store_true",
                      help="also decode every position from the expected code under the predicted map, not its most "
                           "likely parent's")
    part.add_argument("--ensemble-with", metavar="DIR",
                      help="the same tokenizer with another source recovery (e.g. another training seed): also the "
                           "map of the two recoveries' averaged log-probabilities")
    part = parts.add_parser("generation")
    part.add_argument("--tokenizer", required=True)
    part.add_argument("--mergear", nargs="*", default=[],
                      help="MergeAR folders, one per training seed (none: random order only)")
    part.add_argument("--randar", nargs="*", default=[],
                      help="MergeRandAR folders, one per training seed (none: MergeAR only)")
    part.add_argument("--linear-schedule", action="store_true", help="also both generators with a linear guidance schedule")
    part.add_argument("--randar-sampling", nargs="+", choices=("sub_token", "joint"), default=["sub_token"],
                      help="how MergeRandAR draws a code (one row each): per sub-token (its default, as MergeAR's) or "
                           "from the exact joint")
    part.add_argument("--through-recovery", action="store_true",
                      help="also MergeAR's samples decoded through the recovery's map of their merged tokens")
    part.add_argument("--num-tokens", type=int, default=None)
    part.add_argument("--randar-num-tokens", type=int, nargs="+", default=None,
                      help="MergeRandAR at these K instead (one row each): an ungated MergeAR makes more distinct codes "
                           "than --num-tokens asks for, so equal K is not an equal token count")
    part.add_argument("--num-samples", type=int, default=2000)
    part.add_argument("--batch-size", type=int, default=100)
    part.add_argument("--guidance-scale", "--cfg", type=float, default=2.0)
    part.add_argument("--reference", nargs="+", choices=("heldout", "test"), default=["test"],
                      help="compare samples with held-out training images (for choosing) or test images (for "
                           "reporting); both: one FD column each, from the same samples")
    part.add_argument("--reference-images", type=int, default=None,
                      help="real images per reference set, a fixed subset (default: the whole set, 10,000 images; "
                           "1000 real images add several FD points of sampling noise of their own)")
    args = parser.parse_args()
    if args.part == "generation" and not (args.mergear or args.randar):
        parser.error("generation needs --mergear or --randar folders (or both)")
    if args.part == "generation" and args.through_recovery and not args.mergear:
        parser.error("--through-recovery decodes MergeAR's samples: it needs --mergear")
    gc.collect()
    gc.freeze()  # the imported libraries' objects: no collection in the decoding loops scans them again
    if args.threads:
        torch.set_num_threads(args.threads)
    {"speed": speed, "recon": recon, "generation": generation}[args.part](args)


if __name__ == "__main__":
    main()
