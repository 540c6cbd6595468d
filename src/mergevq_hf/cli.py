"""The `mergevq` command: a thin layer over the library.

    mergevq generate --classes 0 3 --num-per-class 2 --output grid.png
    mergevq reconstruct shirt.png --num-tokens 9 --output-dir out/
    mergevq encode *.png --num-tokens 16 --output codes.safetensors
    mergevq export hub_folder/
    mergevq train-tokenizer | train-ar | train-source-recovery | eval | convert ...   (options: mergevq <command> --help)

The last five hand their arguments to the package modules that define them (``mergevq_hf.training.train_tokenizer``,
``mergevq_hf.training.train_mergear``, ``mergevq_hf.training.train_source_recovery``, ``mergevq_hf.evaluation``,
``mergevq_hf.convert``), so their options live in one
place and the commands work from an installed wheel.
Heavy imports happen inside each command. Bad input exits with status 2 and one line `mergevq: error: ...`.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import json
import os
import sys
from pathlib import Path

PROG = "mergevq"


# ---- commands whose options are defined elsewhere -----------------------------------------------------------------


def _run_module_main(module: str, argv: list[str]) -> int:
    result = importlib.import_module(module).main(argv)
    return result if isinstance(result, int) else 0  # the training mains return their Trainer


# command -> (summary, module whose main(argv) parses and runs it)
FORWARDED = {
    "train-tokenizer": ("train a MergeVQ tokenizer", "mergevq_hf.training.train_tokenizer"),
    "train-ar": ("train a MergeAR generator on a tokenizer's codes", "mergevq_hf.training.train_mergear"),
    "train-source-recovery": ("fine-tune or rebuild a tokenizer's source recovery on its frozen codes", "mergevq_hf.training.train_source_recovery"),
    "eval": ("evaluate a tokenizer or generator (rFID, PSNR, SSIM, gFID, IS, ...)", "mergevq_hf.evaluation"),
    "convert": ("convert an official MergeVQ checkpoint to this package's format", "mergevq_hf.convert"),
}


# ---- helpers ------------------------------------------------------------------------------------------------------


def _device(name: str | None):
    """--device as a torch.device that exists on this machine (checked before the model is loaded)."""
    import torch

    if name is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ValueError(f"--device {name!r} is not a torch device; use e.g. cpu, cuda, cuda:1 or mps") from None
    try:
        torch.empty(1, device=device)
    except (RuntimeError, AssertionError) as error:  # torch asserts when it was built without that backend
        raise ValueError(f"--device {name} is not available on this machine ({_one_line(error)})") from None
    return device


def _load(args):
    """The pipeline named by --model (or the default chain), on --device; says so when it is the random one."""
    from .defaults import load_default_pipeline

    device = _device(args.device)
    loaded = load_default_pipeline(args.model)
    if loaded.notice:
        print(f"{PROG}: note: {loaded.notice}", file=sys.stderr)
    pipe = loaded.pipeline.to(device)
    pipe.set_progress_bar_config(disable=None, desc="generating")  # disable=None: a bar only on a terminal
    return pipe, loaded.source


def _check_output_file(path) -> Path:
    """Refuse an output path that exists but is not a regular file (a device such as /dev/null, a folder, a pipe):
    the atomic rename in `_write_atomically` would replace it."""
    path = Path(path)
    if path.exists() and not path.is_file():
        raise ValueError(f"{path} exists and is not a regular file; refusing to replace it (choose another output path)")
    return path


def _write_atomically(path, write) -> None:
    """`write(temporary_path)`, then rename the finished file to `path`. A failure (full disk, no permission) leaves
    no partial file behind and is reported as one OSError naming `path`."""
    path = _check_output_file(path)
    if path.is_symlink():  # write the file it points to, keep the link
        path = path.resolve()
    temporary = path.with_name(f".{path.stem}.partial-{os.getpid()}{path.suffix}")  # same suffix: same format
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        write(temporary)
        os.replace(temporary, path)
    except BaseException as error:
        with contextlib.suppress(OSError):  # e.g. the parent is not a folder: then there is nothing to remove
            temporary.unlink(missing_ok=True)
        if not isinstance(error, OSError):
            raise
        failure = OSError(f"could not write {path}: {error.strerror or _one_line(error)}")
        failure.errno = error.errno
        raise failure from None


def _overlapping(first, second) -> bool:
    """Whether two folders are the same, or one lies inside the other."""
    first, second = Path(first).resolve(), Path(second).resolve()
    return first == second or first in second.parents or second in first.parents


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {value}")
    return value


def _batches(items: list, size: int, desc: str):
    from tqdm.auto import tqdm

    with tqdm(total=len(items), desc=desc, unit="img", disable=None) as bar:
        for start in range(0, len(items), size):
            yield items[start : start + size]
            bar.update(len(items[start : start + size]))


def _reconstruct_all(pipe, paths: list[str], num_tokens: int | None, batch_size: int, desc: str):
    """Yield (path, input image, reconstruction output of its batch, row) for every image, batch by batch."""
    from .visualization import load_image

    for batch in _batches(paths, batch_size, desc):
        images = [load_image(path)[0] for path in batch]
        for path, image in zip(batch, images):
            try:
                pipe.image_processor.check_size(image.height, image.width)
            except ValueError as error:
                raise ValueError(f"{path}: {error}") from None
        output = pipe.reconstruct(images, num_tokens=num_tokens)
        for row, (path, image) in enumerate(zip(batch, images)):
            yield path, image, output, row


# ---- commands -----------------------------------------------------------------------------------------------------


def cmd_generate(args) -> int:
    import torch

    from .visualization import make_grid

    output = _check_output_file(args.output)  # before the work, not after
    pipe, _ = _load(args)
    guidance = {} if args.guidance_scale is None else {"guidance_scale": args.guidance_scale}  # None: the pipeline's default
    images = pipe(
        class_labels=args.classes, num_images_per_class=args.num_per_class, num_tokens=args.num_tokens,
        **guidance, guidance_schedule=args.guidance_schedule, temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
        generator=torch.Generator().manual_seed(args.seed), token_budget=args.token_budget,
    ).images
    grid = make_grid(images, nrow=args.num_per_class)
    _write_atomically(output, grid.save)
    print(f"wrote {len(images)} images ({len(args.classes)} classes x {args.num_per_class}) to {output}")
    return 0


def cmd_reconstruct(args) -> int:
    from .visualization import draw_merge_map

    stems = [Path(path).stem for path in args.images]
    if len(set(stems)) != len(stems):
        raise ValueError("two input images share a file name; their outputs would overwrite each other")
    out_dir = Path(args.output_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise ValueError(f"--output-dir {out_dir} exists and is not a folder")
    for stem in stems:
        _check_output_file(out_dir / f"{stem}.recon.png")
        _check_output_file(out_dir / f"{stem}.merge.png")
    pipe, _ = _load(args)
    config, processor = pipe.vq_model.config, pipe.image_processor
    for path, image, output, row in _reconstruct_all(pipe, args.images, args.num_tokens, args.batch_size, "reconstructing"):
        stem = Path(path).stem
        _write_atomically(out_dir / f"{stem}.recon.png", output.images[row].save)
        # Draw over the square the tokenizer saw (the image processor's output).
        seen = processor.postprocess(processor(image).pixel_values)[0]
        merge_map = draw_merge_map(seen, output.source_map[row], config.grid_size)
        _write_atomically(out_dir / f"{stem}.merge.png", merge_map.save)
    num_tokens = output.indices.shape[1]
    print(
        f"wrote {len(args.images)} reconstructions and merge maps to {out_dir} "
        f"(K = {num_tokens} tokens for L = {config.num_patches} positions, {config.num_patches / num_tokens:.1f}x fewer)"
    )
    return 0


def cmd_encode(args) -> int:
    import torch
    from safetensors.torch import save_file

    output_path = _check_output_file(args.output)  # before the work, not after
    pipe, source = _load(args)
    indices, source_maps = [], []  # one [L] source map per image
    for _, _, output, row in _reconstruct_all(pipe, args.images, args.num_tokens, args.batch_size, "encoding"):
        indices.append(output.indices[row].cpu())
        source_maps.append(output.source_map[row].cpu())
    config = pipe.vq_model.config
    tensors = {"indices": torch.stack(indices).long(), "source_map": torch.stack(source_maps).long()}
    metadata = {  # safetensors metadata values must be strings
        "images": json.dumps(list(args.images)), "model": source, "num_tokens": str(tensors["indices"].shape[1]),
        "grid_size": str(config.grid_size), "codebook_bits": str(config.codebook_bits),
    }
    _write_atomically(output_path, lambda temporary: save_file(tensors, str(temporary), metadata=metadata))
    print(
        f"wrote indices {list(tensors['indices'].shape)} and source_map {list(tensors['source_map'].shape)} to {output_path}"
    )
    return 0


def cmd_export(args) -> int:
    from .hub import export_for_hub

    pipe, source = _load(args)
    # The export rewrites files in place: into the model's own folder it would leave a layout its loaders refuse.
    loaded_from = [pipe.vq_model.name_or_path and Path(pipe.vq_model.name_or_path).parent, Path(source)]
    for model_folder in loaded_from:
        if model_folder and model_folder.is_dir() and _overlapping(args.folder, model_folder):
            raise ValueError(
                f"the export folder {args.folder} overlaps the model folder {model_folder} (the same, inside it or "
                "containing it); export to a separate folder"
            )
    if Path(args.folder).exists() and not Path(args.folder).is_dir():
        raise ValueError(f"{args.folder} exists and is not a folder")
    folder = export_for_hub(pipe, args.folder, repo_id=args.repo_id)
    print(f"wrote a self-contained Hub folder (load with trust_remote_code=True) to {folder}")
    return 0


# ---- parser -------------------------------------------------------------------------------------------------------


def _add_model_options(parser):
    parser.add_argument(
        "--model", metavar="FOLDER_OR_HUB_ID",
        help="pipeline to load: a folder written by save_pretrained or a Hub id (default: $MERGEVQ_MODEL, then the "
        "bundled model, then a tiny random model, announced on stderr)",
    )
    parser.add_argument("--device", help="torch device, e.g. cpu or cuda:0 (default: cuda when available, else cpu)")


def _add_image_options(parser, what: str):
    parser.add_argument("images", nargs="+", metavar="IMAGE", help="image files (any size and mode; resized and centre-cropped to the model's size)")
    parser.add_argument("--num-tokens", "-k", type=_positive_int, metavar="K", help=f"merged tokens per image for {what}, 1 <= K <= L (default: the tokenizer's num_tokens)")
    parser.add_argument("--batch-size", type=_positive_int, default=16, help="images per forward pass (default: 16)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=PROG, description="MergeVQ image tokenizer and MergeAR generator (arXiv 2504.00999).")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    generate = commands.add_parser("generate", help="sample class-conditional images into a PNG grid", description="Sample images with MergeAR and decode them with MergeVQ; one row per class.")
    generate.add_argument("--classes", type=int, nargs="+", default=[0], metavar="ID", help="class ids to sample, in [0, num_classes) (default: 0)")
    generate.add_argument("--num-per-class", type=_positive_int, default=1, metavar="N", help="images per class (default: 1)")
    generate.add_argument("--num-tokens", "-k", type=_positive_int, metavar="K", help="token budget: how many distinct merged tokens each image gets, 1 <= K <= L (default: the generator's num_tokens)")
    generate.add_argument("--guidance-scale", type=float, help="classifier-free guidance scale; 1 turns it off (default: the pipeline's, 2.5)")
    generate.add_argument("--guidance", dest="guidance_scale", type=float, default=argparse.SUPPRESS, help=argparse.SUPPRESS)  # former name
    generate.add_argument("--guidance-schedule", choices=("constant", "linear"), default="constant", help="constant, or linear: the scale rises from 1 at the first generated token to --guidance-scale at the last (default: constant)")
    generate.add_argument("--temperature", type=float, default=1.0, help="sampling temperature > 0 (default: 1.0)")
    generate.add_argument("--top-k", type=int, default=0, help="keep only the k most likely values of each sub-token (low bits, then high bits; whole codes for a dense head); 0 = off (default: 0)")
    generate.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass in (0, 1] of each sub-token (whole codes for a dense head); 1 = off (default: 1.0)")
    generate.add_argument("--token-budget", action=argparse.BooleanOptionalAction, default=False, help="once an image has K distinct codes, only repeat them (the K/V cache then holds at most 2 + K + W entries); off by default, as it lowers quality on the bundled model")
    generate.add_argument("--seed", type=int, default=0, help="random seed; the same seed gives the same images (default: 0)")
    generate.add_argument("--output", "-o", default="mergevq_samples.png", help="PNG file for the image grid (default: mergevq_samples.png)")
    _add_model_options(generate)
    generate.set_defaults(func=cmd_generate)

    reconstruct = commands.add_parser("reconstruct", help="encode images to K merged tokens and decode them back", description="Write NAME.recon.png (the reconstruction) and NAME.merge.png (the merge map: grid cells of one colour share one token) for each image.")
    _add_image_options(reconstruct, "the round trip")
    reconstruct.add_argument("--output-dir", "-o", default="mergevq_reconstructions", help="folder for the outputs (default: mergevq_reconstructions)")
    _add_model_options(reconstruct)
    reconstruct.set_defaults(func=cmd_reconstruct)

    encode = commands.add_parser("encode", help="write token indices and source maps to a safetensors file", description="Encode images to K merged tokens. The file holds 'indices' [N, K] and 'source_map' [N, L] (int64; for each grid position in raster order, its token), and metadata: the image paths (JSON), model, num_tokens, grid_size, codebook_bits.")
    _add_image_options(encode, "the codes")
    encode.add_argument("--output", "-o", default="codes.safetensors", help="safetensors file to write (default: codes.safetensors)")
    _add_model_options(encode)
    encode.set_defaults(func=cmd_encode)

    export = commands.add_parser("export", help="write a self-contained Hub folder (loads with trust_remote_code=True)", description="Save the pipeline with its model code and a model card, ready to upload to the Hub.")
    export.add_argument("folder", help="output folder")
    export.add_argument("--repo-id", help="Hub id shown in the model card's usage example")
    _add_model_options(export)
    export.set_defaults(func=cmd_export)

    for name, (summary, _) in FORWARDED.items():
        commands.add_parser(name, help=f"{summary}; options: {PROG} {name} --help", add_help=False)
    return parser


def _one_line(error: BaseException) -> str:
    text = " ".join(str(error).split()) or type(error).__name__
    return text if len(text) <= 500 else text[:497] + "..."


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    try:
        if argv and argv[0] in FORWARDED:  # the backing script parses (and documents) its own options
            return _run_module_main(FORWARDED[argv[0]][1], argv[1:])
        args = build_parser().parse_args(argv)
        return args.func(args)
    except (ValueError, OSError) as error:  # bad input or a missing file: one readable line, no traceback
        print(f"{PROG}: error: {_one_line(error)}", file=sys.stderr)
        return 2
    except ImportError as error:  # training and evaluation need the optional extras
        print(f"{PROG}: error: {_one_line(error)}; install them with pip install 'mergevq_hf[training,evaluation]'", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
