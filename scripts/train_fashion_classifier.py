"""Train the LeNet-style Fashion-MNIST classifier used by the "lenet-fashion" evaluation metrics.

Writes ``src/mergevq_hf/evaluation/weights/lenet_fashion_mnist.safetensors`` and a JSON card next to it with the
test accuracy and the file's SHA-256 (checked by ``load_fashion_classifier``). Seeded; bit-identical reruns need the
same torch build and thread count. About 1.5 minutes on 2 idle cores. Needs the Debian package ``dataset-fashion-mnist``.

    OMP_NUM_THREADS=2 .venv/bin/python scripts/train_fashion_classifier.py
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import torch
from safetensors.torch import save_file

from mergevq_hf.evaluation.classifier import DEFAULT_CLASSIFIER_PATH, evaluate_classifier, file_sha256, train_fashion_classifier
from mergevq_hf.evaluation.suite import dataset_to_tensors
from mergevq_hf.training import load_fashion_mnist


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads (results depend on it bit-wise)")
    parser.add_argument("--output", type=Path, default=DEFAULT_CLASSIFIER_PATH)
    args = parser.parse_args(argv)

    torch.set_num_threads(args.threads)
    train_x, train_y = dataset_to_tensors(load_fashion_mnist("train"), image_size=32)
    test_x, test_y = dataset_to_tensors(load_fashion_mnist("test"), image_size=32)
    # Gray is all the network sees (it averages RGB), so keep one channel: 3x less memory traffic.
    train_x, test_x = train_x[:, :1].contiguous(), test_x[:, :1].contiguous()

    start = time.perf_counter()
    model = train_fashion_classifier(train_x, train_y, epochs=args.epochs, seed=args.seed)
    seconds = time.perf_counter() - start
    accuracy = evaluate_classifier(model, test_x, test_y)

    args.output.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(args.output))
    card = {
        "model": "FashionLeNet (mergevq_hf.evaluation.classifier)",
        "dataset": "Fashion-MNIST (Debian dataset-fashion-mnist), 60k train / 10k test, padded to 32x32",
        "test_accuracy": round(accuracy, 4),
        "num_parameters": sum(p.numel() for p in model.parameters()),
        "epochs": args.epochs,
        "seed": args.seed,
        "optimizer": "Adam lr 1e-3, batch 128, cross-entropy",
        "train_seconds": round(seconds, 1),
        "threads": args.threads,
        "torch": torch.__version__,
        "python": platform.python_version(),
        "script": "scripts/train_fashion_classifier.py",
        "sha256": file_sha256(args.output),
    }
    args.output.with_suffix(".json").write_text(json.dumps(card, indent=2) + "\n")
    print(json.dumps(card, indent=2))


if __name__ == "__main__":
    main()
