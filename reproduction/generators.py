"""Issue 13: generator ablations scored side by side (``python -m reproduction score --parts ablations,curves``).

Every finished raster-order run under ``outputs/ablation`` (``python -m reproduction train mergear-ls0 ...``) and the
bundled MergeAR, all on the bundled tokenizer: samples at K = 16 with guidance off and on (FD-LeNet and LeNet class
accuracy against a reference set), and how closely each follows its merge instruction without any sampling constraint
(distinct codes per generated image at K = 9, 16, 25, guidance off). Runs of one recipe with different seeds
(``NAME-stepsS-seedN``) make one row: the mean, and the lowest and highest seed. ``curves`` scores the checkpoints each
run kept (every quarter of its steps): is one model only slower to learn? ``--reference heldout`` compares against
training images the generators never saw (train split from index 50,000; for choosing), ``test`` against the test
split (for reporting). Scores are kept in ``outputs/ablation/scores.json`` (keyed by run, reference and the weights'
size and time), so that adding a run scores only that run.
"""

from __future__ import annotations

import json
import os
import re
from collections import defaultdict
from pathlib import Path

import torch

from mergevq_hf import MergeARForCausalLM, MergeVQModel
from mergevq_hf.bundled import bundled_model_path
from mergevq_hf.evaluation import evaluate_generation, format_seed_spread

INSTRUCTION_K = (9, 16, 25)
BUNDLED = "bundled MergeAR"
SEED_SUFFIX = re.compile(r"-seed(\d+)$")


def generate_codes(transformer, labels, guidance_scale: float, cache, generator: torch.Generator, num_tokens: int | None = None) -> torch.Tensor:
    """Sampled codes [B, L] (temperature 1, no top-k); ``cache=None`` is the model's own MergeARCache."""
    seed = int(torch.randint(0, 2**62, (1,), generator=generator))
    with torch.random.fork_rng():
        torch.manual_seed(seed)  # generate draws from the global RNG: the same seed gives every row the same draws
        sequences = transformer.generate(
            class_labels=labels, num_tokens=num_tokens, guidance_scale=guidance_scale, do_sample=True, top_k=0, cache=cache
        )
    return transformer.image_tokens_from_sequences(sequences)


def _is_raster_model(folder: Path) -> bool:
    config = folder / "config.json"
    return config.is_file() and (folder / "model.safetensors").is_file() and json.loads(config.read_text())["model_type"] == "mergear"


def ablation_runs(ablations: Path) -> dict[str, list[Path]]:
    """Row name -> folders of its finished raster-order runs, one per seed: the bundled MergeAR first, then each
    recipe (``NAME-stepsS``) with all its seeds."""
    rows = {BUNDLED: [Path(bundled_model_path()) / "transformer"]}
    grouped = defaultdict(list)
    if ablations.is_dir():
        for folder in sorted(ablations.iterdir()):
            if _is_raster_model(folder):
                grouped[SEED_SUFFIX.sub("", folder.name)].append(folder)
    return rows | dict(sorted(grouped.items()))


def checkpoints(run: Path) -> dict[int, Path]:
    """Training step -> model folder: the checkpoints a run kept, and the finished model at its last step."""
    kept = {int(folder.name.split("-")[1]): folder for folder in run.glob("checkpoint-*") if _is_raster_model(folder)}
    state = run / "trainer_state.json"
    if state.is_file():
        kept[json.loads(state.read_text())["global_step"]] = run
    return dict(sorted(kept.items()))


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


class AblationScorer:
    """Scores model folders against one reference set, remembering every score in ``store`` (a JSON file)."""

    def __init__(self, reference: tuple[torch.Tensor, torch.Tensor], reference_name: str, num_samples: int, store: Path):
        self.vq_model = MergeVQModel.from_pretrained(os.path.join(bundled_model_path(), "vq_model")).eval()
        (self.reference_images, self.reference_labels), self.reference_name = reference, reference_name
        self.num_samples = num_samples
        self.labels = torch.arange(num_samples) % 10
        self.store = store
        self.scores = json.loads(store.read_text()) if store.is_file() else {}

    def _key(self, folder: Path, what: str, reference: str) -> str:
        weights = (folder / "model.safetensors").stat()
        return f"{folder.resolve()}|{what}|{reference}|{self.num_samples}|{weights.st_size}|{weights.st_mtime_ns}"

    def _remembered(self, folder: Path, what: str, compute, uses_reference: bool = True) -> dict:
        key = self._key(folder, what, self.reference_name if uses_reference else "none")
        if key not in self.scores:
            self.scores[key] = compute(MergeARForCausalLM.from_pretrained(folder).eval())
            # Another scorer may have written since this one read the file: keep its scores too.
            if self.store.is_file():
                self.scores = json.loads(self.store.read_text()) | self.scores
            self.store.parent.mkdir(parents=True, exist_ok=True)
            staged = self.store.with_suffix(f".tmp{os.getpid()}")
            staged.write_text(json.dumps(self.scores, indent=1))
            os.replace(staged, self.store)
        return self.scores[key]

    def samples(self, folder: Path, scales: tuple[float, ...] = (1.0, 2.0), num_tokens: int = 16) -> dict:
        """FD-LeNet and class accuracy of samples at K = ``num_tokens`` at each guidance scale (``fd_g2``, ...)."""
        def compute(model):
            scores = {}
            for guidance in scales:
                def sample(batch_labels, generator, guidance=guidance):
                    return self.vq_model.decode(generate_codes(model, batch_labels, guidance, None, generator, num_tokens=num_tokens))

                row = evaluate_generation(sample, self.labels, self.reference_images, feature_networks=("lenet-fashion",))
                scores[f"fd_g{guidance:g}"] = row["fd/lenet-fashion"]
                scores[f"accuracy_g{guidance:g}"] = row["class_accuracy/lenet-fashion"]
            return scores

        what = "samples" if (scales, num_tokens) == ((1.0, 2.0), 16) else f"samples{scales}k{num_tokens}"
        return self._remembered(folder, what, compute)

    def leak(self, folder: Path) -> dict:
        """Teacher-forced on the reference images tokenised at K = 16: the mean probability of a code the row does not
        hold where the true next code is a repeat (what sampling turns into stray codes), and the expected number of
        new codes per image (the real images hold about 15.7)."""
        def compute(model):
            with torch.no_grad():
                encoded = self.vq_model.encode(self.reference_images[:300], num_tokens=16)
                codes = encoded.indices.gather(1, encoded.source_map)
                sequences = torch.cat([model.build_prompt(self.reference_labels[: len(codes)], 16), codes], dim=1)
                probs = model(input_ids=sequences[:, :-1], use_cache=False).logits[:, 1:].float().softmax(-1)
            held = torch.zeros_like(probs, dtype=torch.bool)
            held[:, 1:] = torch.nn.functional.one_hot(codes[:, :-1], probs.shape[-1]).cummax(dim=1).values.bool()
            new_mass = (probs * ~held).sum(-1)
            is_repeat = held.gather(2, codes[..., None])[..., 0]
            return {"new_mass_at_repeats": float(new_mass[is_repeat].mean()), "expected_new_codes": float(new_mass.sum(1).mean())}

        return self._remembered(folder, "leak", compute)

    def instruction(self, folder: Path) -> dict:
        """Distinct codes per image generated at each K of ``INSTRUCTION_K`` (guidance off)."""
        return self._remembered(
            folder, "instruction", lambda model: {f"distinct_k{k}": distinct_codes(model, k, self.num_samples) for k in INSTRUCTION_K},
            uses_reference=False,
        )


def ablation_table(ablations: Path, reference: tuple[torch.Tensor, torch.Tensor], reference_name: str, num_samples: int) -> str:
    """The ablation rows; ``reference`` holds the reference images and their class labels."""
    scorer = AblationScorer(reference, reference_name, num_samples, ablations / "scores.json")
    reference_images = reference[0]
    lines = [
        "### Generator ablations on the bundled tokenizer\n",
        f"{num_samples} samples per row at K = 16 (labels cycling over the 10 classes, the same seeds in every row) vs "
        f"{len(reference_images)} {reference_name} images; distinct codes: mean over {num_samples} images generated at each K "
        "with guidance off and no sampling constraint (a K-token image holds at most K); leak: teacher-forced on 300 of "
        "the reference images tokenised at K = 16 (about 15.7 distinct codes each), the mean probability of a code the "
        "row does not hold where the true next code is a repeat, and the expected number of new codes per image. "
        "Several training seeds: the mean and, in brackets, the lowest and highest seed.\n",
        "| model | seeds | FD-LeNet, guidance 1 ↓ | class acc., guidance 1 ↑ | FD-LeNet, guidance 2 ↓ | class acc., guidance 2 ↑ | "
        + " | ".join(f"distinct codes at K={k}; ÷K" for k in INSTRUCTION_K) + " | leak at repeats | expected new codes |",
        "|---|---|---|---|---|---|" + "---|" * (len(INSTRUCTION_K) + 2),
    ]
    for name, runs in ablation_runs(ablations).items():
        scores = [scorer.samples(run) | scorer.instruction(run) | scorer.leak(run) for run in runs]
        column = lambda field: [score[field] for score in scores]  # noqa: E731
        cells = [format_seed_spread(column("fd_g1"), 1), format_seed_spread(column("accuracy_g1"), 3), format_seed_spread(column("fd_g2"), 1), format_seed_spread(column("accuracy_g2"), 3)]
        for k in INSTRUCTION_K:
            cells.append(f"{format_seed_spread(column(f'distinct_k{k}'), 1)}; {sum(column(f'distinct_k{k}')) / len(scores) / k:.2f}")
        cells += [format_seed_spread(column("new_mass_at_repeats"), 3), format_seed_spread(column("expected_new_codes"), 1)]
        seeds = ", ".join(SEED_SUFFIX.search(run.name).group(1) if SEED_SUFFIX.search(run.name) else "–" for run in runs)
        print(f"{name}: {cells}", flush=True)
        lines.append(f"| {name} | {seeds} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def curve_table(
    ablations: Path, reference: tuple[torch.Tensor, torch.Tensor], reference_name: str, num_samples: int, names: list[str]
) -> str:
    """FD-LeNet at guidance 1 and 2 after each kept checkpoint of the rows ``names`` (seeds averaged)."""
    scorer = AblationScorer(reference, reference_name, num_samples, ablations / "scores.json")
    reference_images = reference[0]
    curves = {}
    for name, runs in ablation_runs(ablations).items():
        if name not in names:
            continue
        by_step = defaultdict(list)
        for run in runs:
            for step, folder in checkpoints(run).items():
                by_step[step].append(scorer.samples(folder))
        if len(by_step) > 1:
            curves[name] = dict(sorted(by_step.items()))
    steps = sorted({step for curve in curves.values() for step in curve})
    lines = [
        "### Sample quality during training\n",
        f"FD-LeNet of {num_samples} samples at K = 16 vs {len(reference_images)} {reference_name} images after each kept "
        "checkpoint, guidance 1 / guidance 2 (mean over the recipe's seeds).\n",
        "| model | " + " | ".join(f"{step} steps" for step in steps) + " |",
        "|---|" + "---|" * len(steps),
    ]
    for name, curve in curves.items():
        cells = []
        for step in steps:
            scores = curve.get(step)
            mean = lambda field: sum(score[field] for score in scores) / len(scores)  # noqa: E731
            cells.append(f"{mean('fd_g1'):.1f} / {mean('fd_g2'):.1f}" if scores else "–")
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def samples_table(
    ablations: Path, reference: tuple[torch.Tensor, torch.Tensor], reference_name: str, num_samples: int, names: list[str],
    scales: tuple[float, ...], num_tokens: int,
) -> str:
    """FD-LeNet and class accuracy of the rows ``names`` at other guidance scales or another K (seeds averaged)."""
    scorer = AblationScorer(reference, reference_name, num_samples, ablations / "scores.json")
    lines = [
        f"### Samples at K = {num_tokens}, guidance {', '.join(f'{scale:g}' for scale in scales)}\n",
        f"{num_samples} samples vs {len(reference[0])} {reference_name} images, FD-LeNet / class accuracy (mean over the "
        "row's seeds).\n",
        "| model | " + " | ".join(f"guidance {scale:g}" for scale in scales) + " |",
        "|---|" + "---|" * len(scales),
    ]
    for name, runs in ablation_runs(ablations).items():
        if name not in names:
            continue
        scores = [scorer.samples(run, scales, num_tokens) for run in runs]
        mean = lambda field: sum(score[field] for score in scores) / len(scores)  # noqa: E731
        lines.append(f"| {name} | " + " | ".join(f"{mean(f'fd_g{scale:g}'):.1f} / {mean(f'accuracy_g{scale:g}'):.3f}" for scale in scales) + " |")
    return "\n".join(lines)


__all__ = ["AblationScorer", "ablation_runs", "ablation_table", "checkpoints", "curve_table", "distinct_codes", "generate_codes", "samples_table"]
