"""The `mergevq` command. Two checks run the installed console script in a subprocess (each start imports the
package, ~5 s), one builds and installs a wheel and trains from it; the rest call `main([...])` in-process, which is
the same code path without the start-up cost."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from safetensors import safe_open

from mergevq_hf import cli, defaults
from mergevq_hf.sampling_utils import DEFAULT_GUIDANCE_SCALE, GUIDANCE_SCHEDULES

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
        "generate": ["generate", "--classes", "0", "3", "--num-per-class", "2", "-k", "9", "--guidance-scale", "1.5",
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
    options = {"generate": ["--classes", "--num-per-class", "--num-tokens", "--guidance-scale", "--top-p", "--seed", "--output"],
               "reconstruct": ["--num-tokens", "--output-dir", "--batch-size"],
               "encode": ["--num-tokens", "--output", "source_map"], "export": ["--repo-id"]}[command]
    for option in options + ["--model", "--device"]:
        assert option in text


def test_top_level_help_lists_all_commands(capsys):
    with pytest.raises(SystemExit):
        cli.main(["--help"])
    text = capsys.readouterr().out
    for command in ["generate", "reconstruct", "encode", "train-tokenizer", "train-ar", "eval", "convert", "export"]:
        assert command in text


def test_guidance_is_a_hidden_alias_of_guidance_scale(capsys):
    parser = cli.build_parser()
    assert parser.parse_args(["generate", "--guidance", "3.5"]).guidance_scale == 3.5
    assert parser.parse_args(["generate", "--guidance-scale", "3.5"]).guidance_scale == 3.5
    assert parser.parse_args(["generate"]).guidance_scale is None  # the pipeline's default
    with pytest.raises(SystemExit):
        cli.main(["generate", "--help"])
    assert "--guidance " not in capsys.readouterr().out


@pytest.fixture
def pipeline_calls(monkeypatch):
    """The keyword arguments of every pipeline call `cli generate` makes, with a spy instead of a loaded pipeline."""
    calls = []

    def pipe(**kwargs):
        calls.append(kwargs)
        return type("Output", (), {"images": [Image.new("RGB", (32, 32))]})()

    monkeypatch.setattr(cli, "_load", lambda args: (pipe, "spy"))
    return calls


def test_generate_without_guidance_scale_uses_the_pipelines_default(tmp_path, pipeline_calls, capsys):
    assert cli.main(["generate", "-o", str(tmp_path / "default.png")]) == 0
    assert cli.main(["generate", "--guidance-scale", "1", "-o", str(tmp_path / "off.png")]) == 0
    assert "guidance_scale" not in pipeline_calls[0] and pipeline_calls[1]["guidance_scale"] == 1.0
    capsys.readouterr()
    with pytest.raises(SystemExit):
        cli.main(["generate", "--help"])
    assert f"the pipeline's, {DEFAULT_GUIDANCE_SCALE:g}" in " ".join(capsys.readouterr().out.split())  # the real default


def test_generate_passes_the_guidance_schedule(tmp_path, pipeline_calls):
    assert cli.main(["generate", "-o", str(tmp_path / "constant.png")]) == 0
    assert cli.main(["generate", "--guidance-schedule", "linear", "-o", str(tmp_path / "linear.png")]) == 0
    assert [call["guidance_schedule"] for call in pipeline_calls] == ["constant", "linear"]
    parser = cli.build_parser()  # it lists the schedules itself (no torch import): every one the library has
    for schedule in GUIDANCE_SCHEDULES:
        assert parser.parse_args(["generate", "--guidance-schedule", schedule]).guidance_schedule == schedule
    with pytest.raises(SystemExit):
        parser.parse_args(["generate", "--guidance-schedule", "cosine"])


def test_encode_writes_indices_and_source_maps(tmp_path, capsys):
    output = tmp_path / "codes.safetensors"
    assert cli.main(["encode", *map(str, EXAMPLES), "--num-tokens", "9", "--output", str(output)]) == 0
    with safe_open(str(output), "pt") as f:
        indices, source_maps, metadata = f.get_tensor("indices"), f.get_tensor("source_map"), f.metadata()
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


def test_forwarded_commands_get_the_remaining_arguments(monkeypatch):
    """Each forwarded command calls its package module's main(argv) with the rest of the command line."""
    calls = []
    for command, (_, module) in cli.FORWARDED.items():
        fake = type(sys)(module)
        # The training mains return their Trainer: anything but an int means success.
        fake.main = lambda argv, command=command: calls.append((command, argv)) or object()
        monkeypatch.setitem(sys.modules, module, fake)
    assert cli.main(["train-tokenizer", "--max_steps", "3", "--help"]) == 0
    assert cli.main(["train-ar", "--tokenizer", "tok"]) == 0
    assert cli.main(["convert", "--input", "x.ckpt"]) == 0
    assert calls == [("train-tokenizer", ["--max_steps", "3", "--help"]), ("train-ar", ["--tokenizer", "tok"]),
                     ("convert", ["--input", "x.ckpt"])]


def test_forwarded_command_exit_status_is_passed_on(monkeypatch):
    fake = type(sys)("mergevq_hf.evaluation")
    fake.main = lambda argv: 3
    monkeypatch.setitem(sys.modules, "mergevq_hf.evaluation", fake)
    assert cli.main(["eval"]) == 3


def test_training_modules_are_the_package_entry_points(load_script):
    """`mergevq train-*` run package modules (which a wheel installs), never files of a source checkout; the
    examples/ scripts of a checkout are the same entry points."""
    from mergevq_hf.training import train_mergear, train_tokenizer

    assert cli.FORWARDED["train-tokenizer"][1] == train_tokenizer.__name__
    assert cli.FORWARDED["train-ar"][1] == train_mergear.__name__
    assert not hasattr(cli, "EXAMPLES_DIR")
    assert load_script("examples/train_tokenizer.py").main is train_tokenizer.main
    assert load_script("examples/train_mergear.py").main is train_mergear.main


@pytest.mark.parametrize("command", list(cli.FORWARDED))
def test_forwarded_help(command, capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli.main([command, "--help"])
    assert exit_info.value.code == 0
    assert "usage" in capsys.readouterr().out.lower()


# ---- outputs: never a partial file, never a device or the model folder replaced -------------------------------------


def test_output_that_is_not_a_regular_file_is_refused(tmp_path, capsys):
    if not Path("/dev/null").exists():
        pytest.skip("no /dev/null on this system")
    assert cli.main(["encode", str(EXAMPLES[0]), "-o", "/dev/null"]) == 2
    assert "/dev/null exists and is not a regular file" in _last_line(capsys.readouterr().err)
    assert Path("/dev/null").is_char_device()
    assert cli.main(["generate", "-o", str(tmp_path)]) == 2  # an existing folder
    assert "is not a regular file" in _last_line(capsys.readouterr().err)


def _spent(folder: Path) -> list[str]:
    return sorted(path.name for path in folder.iterdir())


def test_full_disk_leaves_no_partial_file(tmp_path, monkeypatch, capsys):
    import errno

    def write_half_then_fail(image, target, *args, **kwargs):
        Path(target).write_bytes(b"\x89PNG half")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(Image.Image, "save", write_half_then_fail)
    assert cli.main(["generate", "-o", str(tmp_path / "grid.png")]) == 2
    error = _last_line(capsys.readouterr().err)
    assert error == f"mergevq: error: could not write {tmp_path / 'grid.png'}: No space left on device"
    assert _spent(tmp_path) == []

    existing = tmp_path / "old.png"
    existing.write_bytes(b"previous grid")
    assert cli.main(["generate", "-o", str(existing)]) == 2
    assert existing.read_bytes() == b"previous grid" and _spent(tmp_path) == ["old.png"]  # left as it was


def test_full_disk_while_encoding_leaves_no_partial_file(tmp_path, monkeypatch, capsys):
    import errno

    import safetensors.torch

    def fail(tensors, filename, metadata=None):
        Path(filename).write_bytes(b"partial")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(safetensors.torch, "save_file", fail)
    assert cli.main(["encode", str(EXAMPLES[0]), "-o", str(tmp_path / "codes.safetensors")]) == 2
    assert "No space left on device" in _last_line(capsys.readouterr().err) and _spent(tmp_path) == []


def test_unwritable_output_is_one_line(tmp_path, capsys):
    (tmp_path / "file.txt").write_text("a file, not a folder")
    assert cli.main(["generate", "-o", str(tmp_path / "file.txt" / "grid.png")]) == 2
    error = _last_line(capsys.readouterr().err)
    assert error.startswith("mergevq: error: could not write") and "Traceback" not in error


@pytest.mark.parametrize("device, message", [("gpu0", "'gpu0' is not a torch device"), ("banana:3", "is not a torch device")])
def test_bad_device_is_one_line(device, message, capsys):
    assert cli.main(["generate", "--device", device]) == 2
    assert message in _last_line(capsys.readouterr().err)


def test_unavailable_device_is_one_line(capsys):
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    assert cli.main(["generate", "--device", "cuda:0"]) == 2
    assert "--device cuda:0 is not available on this machine" in _last_line(capsys.readouterr().err)


def test_export_refuses_the_model_folder_and_folders_around_it(tmp_path, capsys):
    model = tmp_path / "models" / "tiny"
    defaults.build_tiny_random_pipeline().save_pretrained(model)
    before = {path.relative_to(model): path.read_bytes() for path in model.rglob("*") if path.is_file()}
    for target in [model, model / "hub", tmp_path / "models"]:
        assert cli.main(["export", str(target), "--model", str(model)]) == 2
        assert "overlaps the model folder" in _last_line(capsys.readouterr().err)
    after = {path.relative_to(model): path.read_bytes() for path in model.rglob("*") if path.is_file()}
    assert after == before  # untouched
    assert cli.main(["export", str(tmp_path / "hub"), "--model", str(model)]) == 0
    assert (tmp_path / "hub" / "vq_model" / "preprocessor_config.json").is_file()


def test_reconstruct_refuses_a_strip_before_resizing(tmp_path, capsys):
    strip = tmp_path / "strip.png"
    Image.new("L", (1, 300_000)).save(strip)
    assert cli.main(["reconstruct", str(strip), "-o", str(tmp_path / "out")]) == 2
    error = _last_line(capsys.readouterr().err)
    assert error.startswith(f"mergevq: error: {strip}: a 1x300000 image") and "at most 8:1" in error


# ---- from a wheel, outside the checkout -----------------------------------------------------------------------------


@pytest.mark.slow
def test_training_commands_work_from_an_installed_wheel(tmp_path, repo_root, tokenizer_argv):
    """`mergevq train-*` need nothing of the source tree: build the wheel offline, install it into a --target folder
    that shadows the editable install, and train a tiny tokenizer for 2 steps from a folder outside the checkout."""
    pytest.importorskip("setuptools", reason="building the wheel without build isolation needs setuptools")
    source = tmp_path / "source"  # a copy, so that the build's build/ and *.egg-info do not land in the checkout
    shutil.copytree(repo_root / "src", source / "src", ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(repo_root / name, source / name)
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check", "--no-input"]
    build = subprocess.run([*pip, "wheel", "--no-deps", "--no-build-isolation", "--no-index", "--wheel-dir", str(tmp_path / "dist"), str(source)],
                           capture_output=True, text=True, timeout=300)
    assert build.returncode == 0, build.stderr[-3000:]
    (wheel,) = (tmp_path / "dist").glob("mergevq_hf-*.whl")
    site = tmp_path / "site"
    install = subprocess.run([*pip, "install", "--no-deps", "--no-index", "--target", str(site), str(wheel)],
                             capture_output=True, text=True, timeout=300)
    assert install.returncode == 0, install.stderr[-3000:]
    assert (site / "mergevq_hf" / "training" / "train_tokenizer.py").is_file() and not (site / "examples").exists()

    run_dir = tmp_path / "elsewhere"
    run_dir.mkdir()
    env = {**os.environ, "PYTHONPATH": str(site), "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    where = subprocess.run([sys.executable, "-c", "import mergevq_hf.training.train_tokenizer as m; print(m.__file__)"],
                           cwd=run_dir, env=env, capture_output=True, text=True, timeout=120)
    assert where.stdout.strip().startswith(str(site)), where.stderr[-2000:]
    mergevq = str(site / "bin" / "mergevq")  # the console script the wheel declares
    usage = subprocess.run([mergevq, "train-tokenizer", "--help"], cwd=run_dir, env=env, capture_output=True, text=True, timeout=120)
    assert usage.returncode == 0 and "--preset" in usage.stdout, usage.stderr[-2000:]
    argv = tokenizer_argv("run", 2, "--eval_samples", "0", "--save_steps", "100", "--logging_steps", "1")
    train = subprocess.run([mergevq, "train-tokenizer", *argv], cwd=run_dir, env=env, capture_output=True, text=True, timeout=300)
    assert train.returncode == 0, train.stderr[-3000:]
    assert (run_dir / "run" / "model.safetensors").is_file() and (run_dir / "run" / "raw" / "model.safetensors").is_file()
    assert json.loads((run_dir / "run" / "train_results.json").read_text())["epoch"] > 0


def test_decompression_bomb_is_refused_before_decoding(tmp_path, capsys):
    from mergevq_hf.visualization import MAX_IMAGE_PIXELS

    bomb = tmp_path / "bomb.png"
    Image.new("1", (MAX_IMAGE_PIXELS // 1024 + 1, 1024)).save(bomb)  # a few kB of PNG, too many pixels
    assert cli.main(["encode", str(bomb), "-o", str(tmp_path / "codes.safetensors")]) == 2
    assert "images of at most 16,777,216 pixels are accepted" in _last_line(capsys.readouterr().err)
    assert not (tmp_path / "codes.safetensors").exists()
