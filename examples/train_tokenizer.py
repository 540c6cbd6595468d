#!/usr/bin/env python
"""Train the MergeVQ tokenizer (stage 1); the same as ``mergevq train-tokenizer``.

The training script lives in the package (:mod:`mergevq_hf.training.train_tokenizer`) so that it also works from a
wheel; this file keeps the ``python examples/train_tokenizer.py ...`` and ``torchrun ... examples/train_tokenizer.py``
commands working. Options: ``python examples/train_tokenizer.py --help``.
"""

from mergevq_hf.training.atomic_checkpoints import end_run
from mergevq_hf.training.train_tokenizer import main

if __name__ == "__main__":
    main()
    end_run()
