"""Issue 17: the two global-alignment recipes side by side (``python -m reproduction score --parts alignment``).

Both recipes train the bundled tokenizer's recipe and budget (1,200 steps x 32 images) and differ only in alignment:
``tokenizer-cached`` aligns the main pass's CLS to teacher features cached once per image from a centre view;
``tokenizer-paper`` runs the encoder a second time, merging at the step's K, on a strong view and aligns that pass's
CLS to the teacher run every step on its own random view (docs/design.md §1.4). Seed 0 of the cached recipe is the
bundled tokenizer itself (same recipe, same seed), used when ``tokenizer-cached`` was not trained.

For each model: linear probe and 20-NN of the CLS token after merging to K (the representation the paper's Table 4
probes, here for one model at several K), and reconstruction FD-LeNet / PSNR at every K; then the mean and the
spread (max - min) over seeds per recipe.
"""

from __future__ import annotations

from pathlib import Path

from mergevq_hf import MergeVQModel
from mergevq_hf.bundled import bundled_model_path
from mergevq_hf.evaluation import evaluate_reconstruction, evaluate_representation

RECIPES = ("tokenizer-cached", "tokenizer-paper")
PROBE_K = (64, 36, 16, 9)


def trained_models(models: Path) -> dict[tuple[str, int], Path]:
    """(recipe, seed) -> folder, for every trained seed; the bundled tokenizer stands in for cached seed 0."""
    found = {}
    for recipe in RECIPES:
        for seed in range(10):
            folder = models / (recipe if seed == 0 else f"{recipe}-seed{seed}")
            if (folder / "config.json").is_file():
                found[recipe, seed] = folder
    found.setdefault(("tokenizer-cached", 0), Path(bundled_model_path()) / "vq_model")
    if not any(recipe == "tokenizer-paper" for recipe, _ in found):
        raise SystemExit(f"no paper-recipe tokenizer in {models}: run `python -m reproduction train tokenizer-paper` first")
    return found


def score_model(folder: Path, test_images, probe_data) -> dict:
    model = MergeVQModel.from_pretrained(folder).eval()
    row = {}
    for k, recon in zip(PROBE_K, evaluate_reconstruction(model, test_images, num_tokens=PROBE_K, feature_networks=("lenet-fashion",))):
        row[f"fd@{k}"], row[f"psnr@{k}"] = recon["fd/lenet-fashion"], recon["psnr"]
    for k in PROBE_K:
        probe = evaluate_representation(model, *probe_data, num_tokens=k)
        row[f"linear@{k}"], row[f"knn@{k}"] = probe["linear_probe"], probe["knn20"]
    return row


def alignment_table(models: Path, test_images, probe_data) -> str:
    rows = {}
    for (recipe, seed), folder in sorted(trained_models(models).items()):
        rows[recipe, seed] = score_model(folder, test_images, probe_data)
        print(f"{recipe} seed {seed} ({folder}): {rows[recipe, seed]}", flush=True)
    probe_cols = [f"linear@{k}" for k in PROBE_K] + [f"knn@{k}" for k in PROBE_K]
    recon_cols = ["fd@16", "psnr@16", "fd@64", "psnr@64"]
    header = ("| recipe | seed | " + " | ".join(f"lin. K={k}" for k in PROBE_K) + " | " + " | ".join(f"20-NN K={k}" for k in PROBE_K)
              + " | FD-LeNet K=16 | PSNR K=16 | FD-LeNet K=64 | PSNR K=64 |")
    lines = [
        "### Global alignment: cached teacher features vs the paper's two-pass recipe\n",
        "Linear probe / 20-NN: the CLS token after merging to K, fitted on train images, scored on test images. "
        "Reconstruction on the test images. `mean` rows average the seeds; `spread` is max - min over seeds.\n",
        header,
        "|" + "---|" * (2 + len(probe_cols) + len(recon_cols)),
    ]

    def cells(values, fmt_probe="{:.3f}", fmt_fd="{:.1f}", fmt_psnr="{:.2f}"):
        out = [fmt_probe.format(values[c]) for c in probe_cols]
        for c in recon_cols:
            out.append((fmt_fd if c.startswith("fd") else fmt_psnr).format(values[c]))
        return out

    for (recipe, seed), row in rows.items():
        lines.append(f"| {recipe} | {seed} | " + " | ".join(cells(row)) + " |")
    for recipe in RECIPES:
        seeds = [row for (name, _), row in rows.items() if name == recipe]
        if len(seeds) < 2:
            continue
        mean = {c: sum(r[c] for r in seeds) / len(seeds) for c in probe_cols + recon_cols}
        spread = {c: max(r[c] for r in seeds) - min(r[c] for r in seeds) for c in probe_cols + recon_cols}
        lines.append(f"| {recipe} | mean of {len(seeds)} | " + " | ".join(cells(mean)) + " |")
        lines.append(f"| {recipe} | spread | " + " | ".join(cells(spread)) + " |")
    return "\n".join(lines)


__all__ = ["alignment_table", "trained_models"]
