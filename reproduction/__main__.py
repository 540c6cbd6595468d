"""``python -m reproduction train NAME... [--seed N] [--steps N] [--resume]`` and ``python -m reproduction score ...``.

``train`` runs the recipes of :mod:`reproduction.train`; ``score`` (:mod:`reproduction.score`) scores the trained models
and writes the reproduction tables. Run from the repository root: the recipes read the bundled tokenizer there and
write under ``outputs/``.
"""

from __future__ import annotations

import argparse
import os


def main(argv: list[str] | None = None) -> None:
    # The recipes' timings and the table's speed rows assume one torch thread per run, and nothing may download:
    # set before torch and huggingface_hub are imported (below) so that they take effect.
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from . import score, train

    parser = argparse.ArgumentParser(prog="python -m reproduction", description="Train and score the small-scale reproduction of the paper's claims.")
    commands = parser.add_subparsers(dest="command", required=True, metavar="{train,score}")
    train_parser = commands.add_parser(
        "train", help="train models of the reproduction table or generator ablations",
        description="Train models by name with fixed recipes, one after the other.", epilog=train.describe_recipes(),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    train_parser.add_argument("names", nargs="+", metavar="NAME", help="models to train, in this order (listed below)")
    train_parser.add_argument("--seed", type=int, default=0, help="training seed (default 0); another seed trains into NAME-seedN")
    train_parser.add_argument("--steps", type=int, help=f"training steps of a generator ablation (default {train.DEFAULT_ABLATION_STEPS})")
    train_parser.add_argument("--resume", action="store_true", help="continue each run from its last checkpoint")
    score_parser = commands.add_parser("score", help="score the trained models and write the reproduction tables", description=score.__doc__.splitlines()[0])
    score.add_arguments(score_parser)

    args = parser.parse_args(argv)
    if args.command == "train":
        try:  # every name and option is checked before the first model trains
            jobs = [train.training_job(name, seed=args.seed, steps=args.steps, resume=args.resume) for name in args.names]
        except ValueError as error:
            train_parser.error(str(error))
        train.run(jobs)
    else:
        score.run(args)


if __name__ == "__main__":
    main()
