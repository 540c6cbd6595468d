"""Issue 13: generator ablations scored side by side (``python -m reproduction score --parts ablations``).

Every trained model under ``outputs/ablation`` (``python -m reproduction train mergear-ls0 ...``) and the bundled
MergeAR, all on the bundled tokenizer: samples at K = 16 with guidance off and on (FD-LeNet and LeNet class accuracy
against a reference set), and how closely each follows its merge instruction without any sampling constraint
(distinct codes per generated image at K = 9, 16, 25, guidance off). ``--reference heldout`` compares against training
images the generators never saw (train split from index 50,000; for choosing), ``test`` against the test split (for
reporting).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch

from mergevq_hf import MergeARForCausalLM, MergeVQModel
from mergevq_hf.bundled import bundled_model_path
from mergevq_hf.evaluation import evaluate_generation

INSTRUCTION_K = (9, 16, 25)


def generate_codes(transformer, labels, guidance_scale: float, cache, generator: torch.Generator, num_tokens: int | None = None) -> torch.Tensor:
    """Sampled codes [B, L] (temperature 1, no top-k); ``cache=None`` is the model's own MergeARCache."""
    seed = int(torch.randint(0, 2**62, (1,), generator=generator))
    with torch.random.fork_rng():
        torch.manual_seed(seed)  # generate draws from the global RNG: the same seed gives every row the same draws
        sequences = transformer.generate(
            class_labels=labels, num_tokens=num_tokens, guidance_scale=guidance_scale, do_sample=True, top_k=0, cache=cache
        )
    return transformer.image_tokens_from_sequences(sequences)


def ablation_models(ablations: Path) -> dict[str, Path]:
    """Name -> folder of every finished raster-order ablation run, after the bundled MergeAR."""
    models = {"bundled MergeAR": Path(bundled_model_path()) / "transformer"}
    if ablations.is_dir():
        for folder in sorted(ablations.iterdir()):
            config = folder / "config.json"
            if config.is_file() and (folder / "model.safetensors").is_file() and json.loads(config.read_text())["model_type"] == "mergear":
                models[folder.name] = folder
    return models


@torch.no_grad()
def distinct_codes(model, num_tokens: int, num_samples: int, batch_size: int = 50) -> float:
    """Mean number of different codes among a generated image's L tokens when asked for K (guidance off)."""
    counts = []
    for start in range(0, num_samples, batch_size):
        labels = torch.arange(start, min(start + batch_size, num_samples)) % model.config.num_classes
        generator = torch.Generator().manual_seed(start)
        codes = generate_codes(model, labels, 1.0, None, generator, num_tokens=num_tokens)
        counts += [len(row.unique()) for row in codes]
    return sum(counts) / len(counts)


def ablation_table(ablations: Path, reference_images: torch.Tensor, reference_name: str, num_samples: int) -> str:
    vq_model = MergeVQModel.from_pretrained(os.path.join(bundled_model_path(), "vq_model")).eval()
    labels = torch.arange(num_samples) % 10
    lines = [
        "### Generator ablations on the bundled tokenizer\n",
        f"{num_samples} samples per row at K = 16 (labels cycling over the 10 classes, the same seeds in every row) vs "
        f"{len(reference_images)} {reference_name} images; distinct codes: mean over {num_samples} images generated at each K "
        "with guidance off and no sampling constraint (a K-token image holds at most K).\n",
        "| model | FD-LeNet, guidance 1 ↓ | class acc., guidance 1 ↑ | FD-LeNet, guidance 2 ↓ | class acc., guidance 2 ↑ | "
        + " | ".join(f"distinct codes at K={k} (÷K)" for k in INSTRUCTION_K) + " |",
        "|---|---|---|---|---|" + "---|" * len(INSTRUCTION_K),
    ]
    for name, folder in ablation_models(ablations).items():
        model = MergeARForCausalLM.from_pretrained(folder).eval()
        cells = []
        for guidance in (1.0, 2.0):
            def sample(batch_labels, generator, guidance=guidance):
                return vq_model.decode(generate_codes(model, batch_labels, guidance, None, generator, num_tokens=16))

            row = evaluate_generation(sample, labels, reference_images, feature_networks=("lenet-fashion",))
            cells += [f"{row['fd/lenet-fashion']:.1f}", f"{row['class_accuracy/lenet-fashion']:.3f}"]
        for k in INSTRUCTION_K:
            count = distinct_codes(model, k, num_samples)
            cells.append(f"{count:.1f} ({count / k:.2f})")
        print(f"{name}: {cells}", flush=True)
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


__all__ = ["ablation_models", "ablation_table", "distinct_codes", "generate_codes"]
