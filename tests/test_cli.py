"""The `mergevq` command. Two checks run the installed console script in a subprocess (each start imports the
package, ~5 s); the rest call `main([...])` in-process, which is the same code path without the start-up cost."""

import importlib.util
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from safetensors import safe_open

from mergevq_hf import cli, defaults

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = sorted((ROOT / "space" / "examples").glob("*.png"))[:2]
L = 64  # the tiny fallback model: 32x32 images, 8x8 grid


@pytest.fixture(autouse=True)
def no_installed_model(monkeypatch):
    """In-process runs get the tiny random fallback whether or not a bundled model has been trained."""
    monkeypatch.setattr(defaults, "bundled_model_path", lambda: None)
    monkeypatch.delenv(defaults.MODEL_ENV_VAR, raising=False)


def _command() -> list[str]:
    script = Path(sys.executable).with_name("mergevq")  # the console script declared in pyproject
    return [str(script)] if script.is_file() else [sys.executable, "-m", "mergevq_hf.cli"]


def _last_line(text: str) -> str:
    return text.strip().splitlines()[-1]


# ---- through the console script ----


@pytest.fixture(scope="module")
def console_runs(tmp_path_factory):
    """Both runs start at once: most of each is the package import, which overlaps on two cores. They load a saved
    tiny pipeline with --model, so they do not depend on which default model is installed."""
    cwd = tmp_path_factory.mktemp("cli")
    (cwd / "notes.png").write_text("not an image")
    defaults.build_tiny_random_pipeline().save_pretrained(cwd / "tiny")
    argv = {
        "generate": ["generate", "--classes", "0", "3", "--num-per-class", "2", "-k", "9", "--guidance", "1.5",
                     "--seed", "1", "--output", "grid.png", "--model", "tiny"],
        "bad": ["encode", "notes.png", "--model", "tiny"],
    }
    procs = {name: subprocess.Popen([*_command(), *args], cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for name, args in argv.items()}
    results = {}
    for name, proc in procs.items():
        out, err = proc.communicate(timeout=180)
        results[name] = (proc.returncode, out, err)
    return cwd, results


def test_console_script_generates_a_png_grid(console_runs):
    cwd, results = console_runs
    returncode, out, err = results["generate"]
    assert returncode == 0, err
    assert "wrote 4 images" in out
    grid = Image.open(cwd / "grid.png")
    assert grid.format == "PNG" and grid.size == (2 * 32 + 3 * 2, 2 * 32 + 3 * 2)  # 2x2 tiles, 2 px padding
    assert np.asarray(grid).std() > 0


def test_console_script_bad_input_is_one_line_error(console_runs):
    returncode, _, err = console_runs[1]["bad"]
    assert returncode == 2
    assert _last_line(err) == "mergevq: error: notes.png is not an image file that can be read (PNG, JPEG, WebP, BMP, ...)"
    assert "Traceback" not in err


# ---- in-process ----


@pytest.mark.parametrize("command", ["generate", "reconstruct", "encode", "export"])
def test_help_explains_every_option(command, capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli.main([command, "--help"])
    assert exit_info.value.code == 0
    text = capsys.readouterr().out
    options = {"generate": ["--classes", "--num-per-class", "--num-tokens", "--guidance", "--top-p", "--seed", "--output"],
               "reconstruct": ["--num-tokens", "--output-dir", "--batch-size"],
               "encode": ["--num-tokens", "--output", "source_maps"], "export": ["--repo-id"]}[command]
    for option in options + ["--model", "--device"]:
        assert option in text


def test_top_level_help_lists_all_commands(capsys):
    with pytest.raises(SystemExit):
        cli.main(["--help"])
    text = capsys.readouterr().out
    for command in ["generate", "reconstruct", "encode", "train-tokenizer", "train-ar", "eval", "convert", "export"]:
        assert command in text


def test_encode_writes_indices_and_source_maps(tmp_path, capsys):
    output = tmp_path / "codes.safetensors"
    assert cli.main(["encode", *map(str, EXAMPLES), "--num-tokens", "9", "--output", str(output)]) == 0
    with safe_open(str(output), "pt") as f:
        indices, source_maps, metadata = f.get_tensor("indices"), f.get_tensor("source_maps"), f.metadata()
    assert indices.shape == (2, 9) and source_maps.shape == (2, L)
    assert source_maps.min() >= 0 and source_maps.max() < 9 and indices.min() >= 0 and indices.max() < 2**10
    assert metadata["num_tokens"] == "9" and metadata["grid_size"] == "8" and metadata["model"] == "tiny-random"
    captured = capsys.readouterr()
    assert "indices [2, 9]" in captured.out
    assert "tiny randomly initialised" in captured.err  # no trained model: the CLI must say so


def test_reconstruct_writes_reconstructions_and_merge_maps(tmp_path):
    assert cli.main(["reconstruct", *map(str, EXAMPLES), "-k", "16", "--batch-size", "1", "--output-dir", str(tmp_path)]) == 0
    for path in EXAMPLES:
        assert Image.open(tmp_path / f"{path.stem}.recon.png").size == (32, 32)
        assert Image.open(tmp_path / f"{path.stem}.merge.png").size == (256, 256)


@pytest.mark.parametrize(
    "argv, message",
    [
        (["generate", "--classes", "12"], "unknown class ids [12]"),
        (["generate", "--num-tokens", "65"], "1 <= K <= L = 64"),
        (["generate", "--temperature", "0"], "temperature must be a number > 0"),
        (["encode", "missing.png"], "no such image file: missing.png"),
        (["generate", "--model", "{tmp}"], "is not a pipeline folder"),
    ],
)
def test_bad_input_exits_2_with_one_line(argv, message, tmp_path, capsys):
    argv = [arg.replace("{tmp}", str(tmp_path)) for arg in argv]
    assert cli.main(argv) == 2
    error = _last_line(capsys.readouterr().err)
    assert error.startswith("mergevq: error: ") and message in error


def test_argument_type_errors_exit_2(capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["generate", "--num-per-class", "0"])
    assert exit_info.value.code == 2
    assert "must be a positive integer" in capsys.readouterr().err


def test_forwarded_commands_get_the_remaining_arguments(tmp_path, monkeypatch):
    """train-* run the example scripts with their own options; eval and convert call the module's main(argv)."""
    record = tmp_path / "argv.txt"
    (tmp_path / "train_tokenizer.py").write_text(f"def main(argv):\n    open({str(record)!r}, 'w').write(' '.join(argv))\n")
    monkeypatch.setattr(cli, "EXAMPLES_DIR", tmp_path)
    assert cli.main(["train-tokenizer", "--max_steps", "3", "--help"]) == 0
    assert record.read_text() == "--max_steps 3 --help"

    calls = []
    fake = type(sys)("fake_convert")
    fake.main = lambda argv: calls.append(argv)
    monkeypatch.setitem(sys.modules, "mergevq_hf.convert", fake)
    assert cli.main(["convert", "--input", "x.ckpt"]) == 0
    assert calls == [["--input", "x.ckpt"]]


def test_training_command_outside_a_checkout_is_one_line_error(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(cli, "EXAMPLES_DIR", tmp_path / "absent")
    assert cli.main(["train-ar"]) == 2
    assert "train_mergear.py is not installed with the package" in capsys.readouterr().err


def _backing_exists(command: str) -> bool:
    if command.startswith("train"):
        return (cli.EXAMPLES_DIR / {"train-tokenizer": "train_tokenizer.py", "train-ar": "train_mergear.py"}[command]).is_file()
    module = {"eval": "mergevq_hf.evaluation", "convert": "mergevq_hf.convert"}[command]
    if importlib.util.find_spec(module) is None:
        return False
    return hasattr(importlib.import_module(module), "main")


@pytest.mark.parametrize("command", list(cli.FORWARDED))
def test_forwarded_help(command, capsys):
    if not _backing_exists(command):
        pytest.skip(f"the module or script behind `mergevq {command}` is not in this checkout")
    with pytest.raises(SystemExit) as exit_info:
        cli.main([command, "--help"])
    assert exit_info.value.code == 0
    assert "usage" in capsys.readouterr().out.lower()
