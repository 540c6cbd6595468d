"""The README's main job: generate every class, reconstruct test images at several K, and draw merge maps.

    python examples/demo.py --output-dir outputs/demo [--model FOLDER_OR_HUB_ID]

With no --model it uses the model bundled with the package (Fashion-MNIST 32x32), or says clearly that it fell back
to a tiny random model. Runs offline on a CPU in well under a minute.
"""

import argparse
import json
import time
from pathlib import Path

import torch

from mergevq_hf.defaults import load_default_pipeline
from mergevq_hf.visualization import draw_merge_map, enlarge, make_grid


def test_images(count: int, image_size: int):
    """Fashion-MNIST test images when the Debian data is installed, procedural ones otherwise."""
    try:
        from mergevq_hf.training.data import load_fashion_mnist

        dataset, source = load_fashion_mnist("test"), "Fashion-MNIST test split"
    except OSError:
        from mergevq_hf.training.data import procedural_images

        dataset, source = procedural_images(count, size=image_size), "procedural images (Fashion-MNIST not installed)"
    # One image per class, then the next ones: a varied set.
    labels = dataset["label"]
    picked, seen = [], set()
    for index, label in enumerate(labels):
        if label not in seen:
            seen.add(label)
            picked.append(index)
        if len(picked) == count:
            break
    return [dataset[i]["image"].convert("RGB") for i in picked], source


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output-dir", type=Path, default=Path("outputs/demo"))
    parser.add_argument("--model", default=None, help="pipeline folder or Hub id (default: the bundled model)")
    parser.add_argument("--images-per-class", type=int, default=4)
    parser.add_argument("--guidance-scale", type=float, default=2.0)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    start = time.perf_counter()
    loaded = load_default_pipeline(args.model)
    if loaded.notice:
        print(f"NOTE: {loaded.notice}")
    pipe = loaded.pipeline
    pipe.set_progress_bar_config(desc="generating")
    args.output_dir.mkdir(parents=True, exist_ok=True)
    vq_config, ar_config = pipe.vq_model.config, pipe.transformer.config
    num_classes = ar_config.num_classes
    print(f"model: {loaded.source} | image {vq_config.image_size}px, L = {vq_config.num_patches} tokens, "
          f"{num_classes} classes")

    # 1. A grid of every class: one row per class.
    generated = pipe(
        class_labels=list(range(num_classes)), num_images_per_class=args.images_per_class,
        guidance_scale=args.guidance_scale, generator=torch.Generator().manual_seed(args.seed),
    ).images
    make_grid([enlarge(im, 64) for im in generated], nrow=args.images_per_class).save(args.output_dir / "generated.png")

    # 2. Reconstructions at several K: first row the originals, then one row per K.
    originals, source = test_images(8, vq_config.image_size)
    budgets = sorted({k for k in (4, 9, 16, 36, vq_config.num_patches) if k <= vq_config.num_patches})
    rows, summary = [originals], {}
    for num_tokens in budgets:
        out = pipe.reconstruct(originals, num_tokens=num_tokens)
        rows.append(out.images)
        summary[num_tokens] = out
    make_grid([enlarge(im, 64) for row in rows for im in row], nrow=len(originals)).save(
        args.output_dir / "reconstructions.png"
    )

    # 3. Merge maps at the model's default K: which grid positions share one token.
    default_k = vq_config.num_tokens
    maps = summary.get(default_k) or pipe.reconstruct(originals, num_tokens=default_k)
    pictures = [
        draw_merge_map(image, source_map, vq_config.grid_size, display_size=128)
        for image, source_map in zip(originals, maps.source_map)
    ]
    make_grid(pictures, nrow=4).save(args.output_dir / "merge_maps.png")

    report = {
        "model": loaded.source,
        "random_weights": loaded.is_random,
        "test_images": source,
        "num_tokens": budgets,
        "seconds": round(time.perf_counter() - start, 1),
    }
    (args.output_dir / "summary.json").write_text(json.dumps(report, indent=2))
    for name in ("generated.png", "reconstructions.png", "merge_maps.png", "summary.json"):
        print(f"wrote {args.output_dir / name}")
    print(f"done in {report['seconds']} s")


if __name__ == "__main__":
    main()
