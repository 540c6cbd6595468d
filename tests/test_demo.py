import json
import runpy
from pathlib import Path

from PIL import Image

from mergevq_hf.bundled import bundled_model_path

DEMO = Path(__file__).resolve().parents[1] / "examples" / "demo.py"


def test_demo_writes_generations_reconstructions_and_merge_maps(tmp_path):
    main = runpy.run_path(str(DEMO))["main"]
    main(["--output-dir", str(tmp_path), "--images-per-class", "1"])
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["random_weights"] == (bundled_model_path() is None)
    generated = Image.open(tmp_path / "generated.png")
    assert generated.height > 5 * generated.width  # one row per class (10), one image per row
    for name in ("reconstructions.png", "merge_maps.png"):
        assert Image.open(tmp_path / name).size[0] > 0
    assert summary["num_tokens"] == sorted(summary["num_tokens"]) and summary["num_tokens"][-1] == 64
