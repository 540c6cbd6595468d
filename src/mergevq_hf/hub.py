"""Hub packaging: a self-contained remote-code export of the pipeline, and the tokenizer's model card.

A folder written by `MergeVQPipeline.save_pretrained` names its components by the package's module paths
(`mergevq_hf.modeling_mergevq`), so it loads only where `mergevq_hf` is installed. `export_for_hub` turns it into the
layout that `trust_remote_code=True` loads anywhere (docs/design.md §5):

    folder/
      model_index.json        {"_class_name": ["pipeline_mergevq", "MergeVQPipeline"],
                               "vq_model": ["modeling_mergevq", "MergeVQModel"], "transformer": [...]}
      pipeline_mergevq.py     (+ the siblings it imports)
      modeling_*.py, ...      every component's code again (see below)
      README.md               model card
      vq_model/               config.json with auto_map, weights, modeling_mergevq.py and its sibling imports,
                              preprocessor_config.json with auto_map and image_processing_mergevq.py
      transformer/            likewise for MergeARForCausalLM

Each component's code is needed twice: diffusers loads it from the component's folder, while transformers 5.24
resolves `auto_map` against the repository root even with `subfolder=` (`get_cached_module_file` drops the
subfolder), so `AutoModel.from_pretrained(folder, subfolder="vq_model", trust_remote_code=True)` needs root copies.
Both libraries load all code of one repository into one module namespace, so a file name used twice must have
identical content; the export checks that.
"""

import json
import re
import shutil
import sys
from pathlib import Path

from huggingface_hub import ModelCard, ModelCardData

from .pipeline_mergevq import CARD_DATASETS, CARD_LICENSE, CARD_TAGS, EVALUATION_PROTOCOL

# The pipeline components that get remote code; each is loaded by the Auto class its model class registered for.
COMPONENT_NAMES = ("vq_model", "transformer")
_RELATIVE_IMPORT = re.compile(r"^\s*from\s+\.(\w+)\s+import\b", re.MULTILINE)


def sibling_closure(module_file) -> list[Path]:
    """`module_file` plus every sibling module it imports with `from .name import ...`, transitively."""
    module_file = Path(module_file)
    found, todo = {}, [module_file]
    while todo:
        path = todo.pop()
        if path.name in found:
            continue
        if not path.is_file():
            raise FileNotFoundError(f"{path} is imported as a sibling module but does not exist")
        found[path.name] = path
        todo.extend(path.parent / f"{name}.py" for name in _RELATIVE_IMPORT.findall(path.read_text()))
    return sorted(found.values())


def _source_file(obj) -> Path:
    return Path(sys.modules[obj.__module__].__file__)


def _copy_code(files, destination: Path, copied: dict[str, Path]) -> None:
    """Copy `files` into `destination`, refusing a file name that was already exported with other content."""
    for path in files:
        previous = copied.setdefault(path.name, path)
        if previous.read_bytes() != path.read_bytes():
            raise ValueError(
                f"two exported modules are both named {path.name} ({previous} and {path}) with different content; "
                "diffusers would load only one of them"
            )
        shutil.copyfile(path, destination / path.name)


def export_for_hub(pipeline, folder, repo_id: str | None = None) -> Path:
    """
    Save `pipeline` to `folder` as a self-contained repository: `DiffusionPipeline.from_pretrained(folder,
    trust_remote_code=True)`, `AutoModel.from_pretrained(folder, subfolder="vq_model", trust_remote_code=True)` and
    `AutoModelForCausalLM.from_pretrained(folder, subfolder="transformer", trust_remote_code=True)` (`AutoModel` for
    a random-order transformer) then work in an
    environment without `mergevq_hf`. `repo_id` only fills the usage example of the model card. Returns the folder.

    With `mergevq_hf` installed, load the export with `trust_remote_code=True` as well: its `model_index.json` names
    the copied modules, not the package.
    """
    folder = Path(folder)
    pipeline.save_pretrained(folder, repo_id=repo_id)
    copied: dict[str, Path] = {}
    index_path = folder / "model_index.json"
    index = json.loads(index_path.read_text())

    for name in COMPONENT_NAMES:
        model = getattr(pipeline, name)
        auto_class = type(model)._auto_class
        model_file, config_file = _source_file(type(model)), _source_file(type(model.config))
        files = sorted(set(sibling_closure(model_file)) | set(sibling_closure(config_file)))
        _copy_code(files, folder / name, copied)
        _copy_code(files, folder, copied)
        config_path = folder / name / "config.json"
        config = json.loads(config_path.read_text())
        config["auto_map"] = {
            "AutoConfig": f"{config_file.stem}.{type(model.config).__name__}",
            auto_class: f"{model_file.stem}.{type(model).__name__}",
        }
        config_path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
        index[name] = [model_file.stem, type(model).__name__]

    # The image processor's preprocessor_config.json sits next to the tokenizer: AutoImageProcessor finds it there.
    processor = pipeline.image_processor
    processor_file = _source_file(type(processor))
    _copy_code(sibling_closure(processor_file), folder / "vq_model", copied)
    processor_path = folder / "vq_model" / "preprocessor_config.json"
    processor_config = json.loads(processor_path.read_text())
    processor_config["auto_map"] = {"AutoImageProcessor": f"{processor_file.stem}.{type(processor).__name__}"}
    processor_path.write_text(json.dumps(processor_config, indent=2, sort_keys=True) + "\n")

    pipeline_file = _source_file(type(pipeline))
    _copy_code(sibling_closure(pipeline_file), folder, copied)
    index["_class_name"] = [pipeline_file.stem, type(pipeline).__name__]
    index_path.write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
    pipeline.model_card(repo_id, remote_code=True).save(folder / "README.md")
    return folder


def tokenizer_model_card(model, model_id: str | None = None, source: str | None = None, license: str = CARD_LICENSE):
    """Model card of a standalone MergeVQ tokenizer folder (e.g. a converted official checkpoint).

    `source` says where the weights came from (shown in the card); `license` defaults to Apache-2.0, the license
    of the official MergeVQ release: set it to the license of the weights you publish.
    """
    config = model.config
    data = ModelCardData(
        license=license, library_name="mergevq_hf", pipeline_tag="image-to-image",
        tags=CARD_TAGS + ["image-reconstruction"], datasets=CARD_DATASETS, metrics=["fid", "psnr", "ssim", "lpips"],
    )
    provenance = f"\nWeights: {source}.\n" if source else ""
    content = f"""---
{data.to_yaml()}
---

# {model_id or "MergeVQ tokenizer"}

MergeVQ image tokenizer ([arXiv 2504.00999](https://arxiv.org/abs/2504.00999)) in `mergevq_hf` format:
{config.image_size}x{config.image_size} images, L = {config.num_patches} tokens merged to K = {config.num_tokens} by
default, {config.codebook_bits}-bit look-up-free codes.
{provenance}
## Usage

```python
import mergevq_hf  # registers the model type
from transformers import AutoModel

tokenizer = AutoModel.from_pretrained("{model_id or "path/to/folder"}")
encoded = tokenizer.encode(pixel_values, num_tokens={config.num_tokens})  # pixel_values in [-1, 1]
pixels = tokenizer.decode(encoded.indices, encoded.source_map)
```

## Evaluation protocol

{EVALUATION_PROTOCOL}
"""
    return ModelCard(content)


__all__ = ["COMPONENT_NAMES", "export_for_hub", "sibling_closure", "tokenizer_model_card"]
