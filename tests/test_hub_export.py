"""Hub packaging: hub ids from a pre-seeded cache, the self-contained remote-code export, model cards, push_to_hub."""

import json
import os
import shutil
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from huggingface_hub import ModelCard
from huggingface_hub.errors import OfflineModeIsEnabled

import mergevq_hf
from mergevq_hf import MergeVQPipeline, export_for_hub
from mergevq_hf import hub as hub_module
from mergevq_hf.hub import _copy_code, sibling_closure

SNAPSHOT = "0123456789abcdef0123456789abcdef01234567"


@pytest.fixture(scope="module")
def pipe(make_tiny_pipeline):
    return make_tiny_pipeline()


def seed_hub_cache(folder, cache, repo_id):
    """Lay `folder` out as the cached snapshot of model repo `repo_id`, as a download would."""
    repo = Path(cache) / ("models--" + repo_id.replace("/", "--"))
    shutil.copytree(folder, repo / "snapshots" / SNAPSHOT)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(SNAPSHOT)


def sample(pipe):
    return pipe([1, 2], generator=torch.Generator().manual_seed(0), output_type="np").images


def assert_same_floats(actual, expected):
    """Loaded weights compute the same function, up to float rounding: memory-mapped safetensors are not 64-byte
    aligned, so the CPU kernels may take another vector path and round differently (seen: 7e-7)."""
    np.testing.assert_allclose(actual, expected, rtol=1e-5, atol=1e-5)


# ---- hub ids, offline ---------------------------------------------------------------------------------------------


@pytest.mark.numerics
def test_hub_id_loads_offline_from_a_seeded_cache(tmp_path, pipe):
    assert os.environ["HF_HUB_OFFLINE"] == "1"
    pipe.save_pretrained(tmp_path / "saved")
    seed_hub_cache(tmp_path / "saved", tmp_path / "cache", "org/mergevq-tiny")
    loaded = MergeVQPipeline.from_pretrained("org/mergevq-tiny", cache_dir=tmp_path / "cache")
    loaded.set_progress_bar_config(disable=True)
    assert_same_floats(sample(loaded), sample(pipe))


def test_absent_hub_id_fails_fast_and_clearly_offline(tmp_path):
    start = time.monotonic()
    with pytest.raises(OSError, match="org/absent.*not fully cached locally.*outgoing traffic has been disabled"):
        MergeVQPipeline.from_pretrained("org/absent", cache_dir=tmp_path / "cache")
    assert time.monotonic() - start < 5  # no retry loop


# ---- self-contained export ----------------------------------------------------------------------------------------

FRESH_PROCESS = textwrap.dedent(
    """
    import importlib.abc, sys

    class BlockMergeVQ(importlib.abc.MetaPathFinder):  # the package is installed (editable): hide it
        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] == "mergevq_hf":
                raise ImportError("mergevq_hf is not available in this process")

    sys.meta_path.insert(0, BlockMergeVQ())
    import numpy as np, torch
    from diffusers import DiffusionPipeline
    from transformers import AutoModel, AutoModelForCausalLM

    folder, repo_id, cache, out = sys.argv[1:5]
    results = {}
    for name, source, kwargs in [("folder", folder, {}), ("hub_id", repo_id, {"cache_dir": cache})]:
        pipe = DiffusionPipeline.from_pretrained(source, trust_remote_code=True, **kwargs)
        pipe.set_progress_bar_config(disable=True)
        results[name] = pipe([1, 2], generator=torch.Generator().manual_seed(0), output_type="np").images
        results[name + "_class"] = np.array(type(pipe).__module__)
    vq_model = AutoModel.from_pretrained(folder, subfolder="vq_model", trust_remote_code=True)
    transformer = AutoModelForCausalLM.from_pretrained(folder, subfolder="transformer", trust_remote_code=True)
    with torch.no_grad():
        results["decoded"] = vq_model.decode(torch.arange(64).reshape(1, 64) * 7).numpy()
        results["logits"] = transformer(transformer.build_prompt([3], 16)).logits.numpy()
    results["modules"] = np.array([type(vq_model).__module__, type(transformer).__module__])
    results["leaked"] = np.array(sorted(m for m in sys.modules if m.split(".")[0] == "mergevq_hf"), dtype=str)
    np.savez(out, **results)
    """
)


@pytest.mark.numerics
def test_export_loads_in_a_fresh_process_without_the_package(tmp_path, pipe):
    folder = export_for_hub(pipe, tmp_path / "export", repo_id="org/mergevq-tiny")
    index = json.loads((folder / "model_index.json").read_text())
    assert index["_class_name"] == ["pipeline_mergevq", "MergeVQPipeline"]
    assert index["vq_model"] == ["modeling_mergevq", "MergeVQModel"]
    assert index["transformer"] == ["modeling_mergear", "MergeARForCausalLM"]
    for name, auto_class in [("vq_model", "AutoModel"), ("transformer", "AutoModelForCausalLM")]:
        assert auto_class in json.loads((folder / name / "config.json").read_text())["auto_map"]
    seed_hub_cache(folder, tmp_path / "cache", "org/mergevq-tiny")

    env = dict(os.environ, HF_HOME=str(tmp_path / "hf_home"), HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1", PYTHONPATH="")
    args = [str(folder), "org/mergevq-tiny", str(tmp_path / "cache"), str(tmp_path / "out.npz")]
    run = subprocess.run(
        [sys.executable, "-c", FRESH_PROCESS, *args], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300
    )
    assert run.returncode == 0, run.stderr[-4000:]
    results = np.load(tmp_path / "out.npz")

    assert results["leaked"].size == 0
    assert str(results["folder_class"]).startswith("diffusers_modules.")
    assert all(str(module).startswith("transformers_modules.") for module in results["modules"])
    expected = sample(pipe)
    assert_same_floats(results["folder"], expected)
    assert_same_floats(results["hub_id"], expected)
    with torch.no_grad():
        decoded = pipe.vq_model.decode(torch.arange(64).reshape(1, 64) * 7).numpy()
        logits = pipe.transformer(pipe.transformer.build_prompt([3], 16)).logits.numpy()
    assert_same_floats(results["decoded"], decoded)
    assert_same_floats(results["logits"], logits)


def test_export_finds_sibling_imports_transitively():
    package = Path(mergevq_hf.__file__).parent
    names = {path.name for path in sibling_closure(package / "modeling_mergevq.py")}
    assert {"modeling_mergevq.py", "configuration_mergevq.py", "quantization_lfq.py", "token_merging.py"} <= names
    assert "modeling_mergear.py" not in names and "pipeline_mergevq.py" not in names
    ar_names = {path.name for path in sibling_closure(package / "modeling_mergear.py")}
    assert {"cache_mergear.py", "configuration_mergear.py", "quantization_lfq.py"} <= ar_names
    # diffusers copies a custom pipeline's direct sibling imports only: those must import no siblings themselves.
    pipeline_names = [path.name for path in sibling_closure(package / "pipeline_mergevq.py")]
    assert pipeline_names == ["hub.py", "image_processing_mergevq.py", "pipeline_mergevq.py", "sampling_utils.py"]


def test_export_refuses_two_different_files_with_one_name(tmp_path):
    (tmp_path / "a").mkdir(), (tmp_path / "b").mkdir(), (tmp_path / "out").mkdir()
    (tmp_path / "a" / "layers.py").write_text("X = 1\n")
    (tmp_path / "b" / "layers.py").write_text("X = 2\n")
    copied = {}
    _copy_code([tmp_path / "a" / "layers.py"], tmp_path / "out", copied)
    _copy_code([tmp_path / "a" / "layers.py"], tmp_path / "out", copied)  # the same file twice is fine
    with pytest.raises(ValueError, match="layers.py .* different content"):
        _copy_code([tmp_path / "b" / "layers.py"], tmp_path / "out", copied)


# ---- model cards and uploads ----------------------------------------------------------------------------------------


def test_model_card_is_written_on_save_and_export(tmp_path, pipe):
    pipe.save_pretrained(tmp_path / "saved")
    export_for_hub(pipe, tmp_path / "export", repo_id="org/mergevq-tiny")
    for folder in ("saved", "export"):
        card = ModelCard.load(tmp_path / folder / "README.md")
        data = card.data.to_dict()
        assert data["license"] == "apache-2.0" and data["library_name"] == "diffusers"
        assert data["pipeline_tag"] == "unconditional-image-generation"
        assert {"arxiv:2504.00999", "mergevq", "class-conditional-image-generation"} <= set(data["tags"])
        assert data["datasets"] == ["ILSVRC/imagenet-1k"] and {"fid", "inception_score"} <= set(data["metrics"])
        assert "## Evaluation protocol" in card.text and "50k" in card.text
    assert 'MergeVQPipeline.from_pretrained("path/to/folder")' in ModelCard.load(tmp_path / "saved" / "README.md").text
    export_card = ModelCard.load(tmp_path / "export" / "README.md").text
    assert 'DiffusionPipeline.from_pretrained("org/mergevq-tiny", trust_remote_code=True)' in export_card


def test_push_to_hub_offline_raises_before_any_upload(tmp_path, pipe, monkeypatch):
    uploads = []
    monkeypatch.setattr(hub_module, "upload_folder", lambda **kwargs: uploads.append(kwargs))
    with pytest.raises(OfflineModeIsEnabled):
        pipe.push_to_hub("org/mergevq-tiny")
    with pytest.raises(OfflineModeIsEnabled):
        pipe.save_pretrained(tmp_path / "never", push_to_hub=True, repo_id="org/mergevq-tiny")
    assert uploads == [] and not (tmp_path / "never").exists()


def test_push_to_hub_creates_the_repo_then_uploads_the_whole_folder(pipe, monkeypatch):
    calls = []

    def create_repo(repo_id, private=None, token=None, exist_ok=False):
        calls.append(("create", repo_id, private, token))
        return type("RepoUrl", (), {"repo_id": "someone/" + repo_id.split("/")[-1]})()

    def upload_folder(repo_id, folder_path, token=None, commit_message=None, create_pr=False):
        files = sorted(str(path.relative_to(folder_path)) for path in Path(folder_path).rglob("*") if path.is_file())
        card = ModelCard.load(Path(folder_path) / "README.md").text
        calls.append(("upload", repo_id, token, commit_message, create_pr, files, card))
        return "commit-url"

    monkeypatch.setattr(hub_module, "create_repo", create_repo)
    monkeypatch.setattr(hub_module, "upload_folder", upload_folder)
    assert pipe.push_to_hub("org/mergevq-tiny", private=True, token="t", create_pr=True) == "commit-url"
    (create, upload) = calls
    assert create == ("create", "org/mergevq-tiny", True, "t")
    _, repo_id, token, message, create_pr, files, card = upload
    assert (repo_id, token, message, create_pr) == ("someone/mergevq-tiny", "t", "Upload MergeVQPipeline", True)
    assert {"README.md", "model_index.json", "vq_model/preprocessor_config.json", "vq_model/model.safetensors",
            "transformer/model.safetensors"} <= set(files)
    assert 'MergeVQPipeline.from_pretrained("someone/mergevq-tiny")' in card  # the card names the created repo
