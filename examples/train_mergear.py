#!/usr/bin/env python
"""Train MergeAR or MergeRandAR (stage 2) on a trained tokenizer; the same as ``mergevq train-ar``.

The training script lives in the package (:mod:`mergevq_hf.training.train_mergear`) so that it also works from a
wheel; this file keeps the ``python examples/train_mergear.py ...``, ``torchrun`` and ``accelerate launch`` commands
working. Options: ``python examples/train_mergear.py --help``.
"""

from mergevq_hf.training.atomic_checkpoints import end_run
from mergevq_hf.training.train_mergear import main

if __name__ == "__main__":
    main()
    end_run()
