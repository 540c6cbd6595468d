"""Shared set-up and fixtures. Test modules never import each other: what several of them need is a fixture here.

Markers (registered in pyproject.toml): ``slow`` (over ~30 s; runs by default, ``-m "not slow"`` leaves it out) and
``numerics`` (float results that could depend on the CPU's vector instructions; ``.ci/run`` repeats these under
``ATEN_CPU_CAPABILITY=default``).
"""

import os

# Offline and single-threaded before torch is imported: on 2 cores OpenMP spin-waits cost 100x.
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")

import importlib.util  # noqa: E402
import sys  # noqa: E402
from pathlib import Path  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(1)

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def repo_root() -> Path:
    """The checkout's root folder."""
    return ROOT


# ---- tiny models --------------------------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def make_tiny_pipeline():
    """``make_tiny_pipeline(seed=0)``: a random MergeVQ + MergeAR pipeline (32x32 images, 8x8 grid, 10-bit codes,
    10 classes)."""
    from mergevq_hf import MergeARConfig, MergeARForCausalLM, MergeVQConfig, MergeVQModel, MergeVQPipeline

    def build(seed: int = 0):
        torch.manual_seed(seed)
        vq_model = MergeVQModel(MergeVQConfig.from_preset("tiny")).eval()
        # The generator must share the tokenizer's code length and 8x8 grid.
        ar_config = MergeARConfig.from_preset("tiny", codebook_bits=10, factorized_bits=[4, 6], grid_size=8, num_classes=10)
        pipe = MergeVQPipeline(vq_model=vq_model, transformer=MergeARForCausalLM(ar_config).eval())
        pipe.set_progress_bar_config(disable=True)
        return pipe

    return build


# ---- files that are not packages ----------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def load_script():
    """``load_script("space/app.py")``: a fresh import of a script of the repository that is not in a package (each
    call runs it again, so that it sees the environment of the calling test)."""

    def load(relative_path: str):
        module_name = "mergevq_script_" + "_".join(Path(relative_path).with_suffix("").parts)
        spec = importlib.util.spec_from_file_location(module_name, ROOT / relative_path)
        module = importlib.util.module_from_spec(spec)
        sys.modules[module_name] = module  # dataclasses resolve their annotations through sys.modules
        spec.loader.exec_module(module)
        return module

    return load


# ---- tiny training runs -------------------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def tokenizer_argv():
    """``tokenizer_argv(output_dir, max_steps, *extra)``: a tiny, pretrained-free stage-1 run on 16 procedural images
    (seconds on one CPU thread).

    Without a perceptual loss the recipe's adversarial weight (0.1) swamps the L1 gradient early on, so it is 0.01.
    Checkpoints every 5 steps: 16 images / 8 per batch puts them mid-epoch.
    """

    def argv(output_dir, max_steps: int, *extra: str) -> list[str]:
        return [
            "--output_dir", str(output_dir), "--preset", "tiny", "--dataset", "procedural:16", "--teacher", "none",
            "--perceptual_loss", "none", "--adversarial_weight", "0.01", "--discriminator_channels", "16",
            "--max_steps", str(max_steps), "--per_device_train_batch_size", "8", "--learning_rate", "1e-3",
            "--logging_steps", "1", "--save_steps", "5", "--eval_samples", "16", "--seed", "0", "--use_cpu",
            "--disable_tqdm", "true", *extra,
        ]

    return argv


@pytest.fixture(scope="session")
def mergear_argv():
    """``mergear_argv(tokenizer_dir, output_dir, cache_dir, max_steps, *extra)``: a tiny stage-2 run on 64 procedural
    images, checkpoints every 6 steps."""

    def argv(tokenizer_dir, output_dir, cache_dir, max_steps: int, *extra: str) -> list[str]:
        return [
            "--tokenizer", str(tokenizer_dir), "--output_dir", str(output_dir), "--preset", "tiny", "--dataset", "procedural:64",
            "--token_cache_dir", str(cache_dir), "--max_steps", str(max_steps), "--per_device_train_batch_size", "16",
            "--learning_rate", "3e-3", "--warmup_steps", "2", "--logging_steps", "1", "--save_steps", "6", "--eval_samples", "32",
            "--seed", "0", "--use_cpu", "--disable_tqdm", "true", *extra,
        ]

    return argv


@pytest.fixture(scope="session")
def train_logs():
    """``train_logs(log_history)``: the per-step training log entries (those with a ``loss``), keyed by step."""

    def by_step(log_history: list[dict]) -> dict[int, dict]:
        return {entry["step"]: entry for entry in log_history if "loss" in entry}

    return by_step


@pytest.fixture(scope="session")
def tiny_model():
    """Factory of small MergeAR models (L = 36, 6-bit codes split 3+3, no dropout) with random, non-zero heads, so
    that their logits are informative: ``tiny_model(seed=0, **config_overrides)``."""
    from mergevq_hf.configuration_mergear import MergeARConfig
    from mergevq_hf.modeling_mergear import MergeARForCausalLM

    no_dropout = {"token_dropout": 0.0, "resid_dropout": 0.0, "ffn_dropout": 0.0, "class_dropout_prob": 0.0}
    small = {"grid_size": 6, "codebook_bits": 6, "factorized_bits": [3, 3]}  # generation tests stay fast on 2 cores

    def make(seed=0, **overrides):
        torch.manual_seed(seed)
        model = MergeARForCausalLM(MergeARConfig.from_preset("tiny", **{**no_dropout, **small, **overrides})).eval()
        with torch.no_grad():
            for parameter in model.parameters():
                parameter.normal_(0.0, 0.1)
        return model

    return make


@pytest.fixture(scope="session")
def null_swapped():
    """``null_swapped(model, sequence)``: the sequence with every class token replaced by the null class (the
    unconditional branch of classifier-free guidance)."""

    def swap(model, sequence):
        config = model.config
        is_class = (sequence >= config.codebook_size) & (sequence <= config.codebook_size + config.num_classes)
        return sequence.masked_fill(is_class, config.codebook_size + config.num_classes)

    return swap


@pytest.fixture(scope="module")
def vq_model():
    """A random tiny MergeVQ tokenizer: 32x32 images, L = 64, 10-bit codes."""
    from mergevq_hf import MergeVQConfig, MergeVQModel

    torch.manual_seed(0)
    return MergeVQModel(MergeVQConfig.from_preset("tiny")).eval()


@pytest.fixture(scope="module")
def encoded(vq_model):
    """Six random images encoded by ``vq_model`` at K = 16."""
    with torch.no_grad():
        return vq_model.encode(torch.rand(6, 3, 32, 32) * 2 - 1, num_tokens=16)
