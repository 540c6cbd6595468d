"""Hub packaging: a self-contained remote-code export of the pipeline, the model cards, and saving / uploading.

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

`MergeVQPipeline.save_pretrained` / `push_to_hub` are `save_pipeline` / `push_pipeline` here. The pipeline imports
this module as a flat sibling, so the export carries it along, and it must import no other module of the package.
"""

import json
import os
import re
import shutil
import sys
import tempfile
from pathlib import Path

from huggingface_hub import ModelCard, ModelCardData, create_repo, upload_folder

# Model-card metadata shared by every card this project writes.
CARD_LICENSE = "apache-2.0"
CARD_TAGS = ["mergevq", "mergear", "image-tokenizer", "token-merging", "lookup-free-quantization", "arxiv:2504.00999"]
CARD_DATASETS = ["ILSVRC/imagenet-1k"]
EVALUATION_PROTOCOL = """\
- **rFID** (tokenizer): 50k ImageNet-1k validation images, Resize 256 (bilinear) + CenterCrop 256, FID between the
  images and their reconstructions (InceptionV3 pool features, 2048-d); also PSNR, SSIM, LPIPS and codebook usage.
- **gFID / IS** (generator): 50k class-conditional samples (50 per class) against the ImageNet reference batch of
  the ADM evaluator.
- **Linear probe** (representation): frozen encoder on all tokens without merging; parameter-free BN + linear
  layer, 90 epochs (MAE protocol)."""
CARD_METRICS = ["fid", "inception_score", "psnr", "ssim", "lpips", "accuracy"]
# `save_pretrained` keywords that only concern the upload.
HUB_ARGUMENTS = ("repo_id", "token", "private", "commit_message", "create_pr")

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
    pipeline_model_card(pipeline, repo_id, remote_code=True).save(folder / "README.md")
    return folder


def save_pipeline(pipeline, save_directory, save_components, push_to_hub: bool = False, **kwargs):
    """`MergeVQPipeline.save_pretrained`: `save_components(save_directory, **kwargs)` (diffusers' save) writes the
    components, then the image processor's `vq_model/preprocessor_config.json` and a `README.md` model card follow.

    With `push_to_hub=True` (and optionally `HUB_ARGUMENTS` among `kwargs`) the repository is created *before*
    anything is written, so offline this raises the Hub's offline error early; then the folder is uploaded and the
    upload's result returned.
    """
    hub = {name: kwargs.pop(name) for name in HUB_ARGUMENTS if name in kwargs}
    repo_id = hub.get("repo_id")
    if push_to_hub:
        repo_id = repo_id or os.path.basename(os.path.normpath(str(save_directory)))
        repo_id = create_repo(repo_id, private=hub.get("private"), token=hub.get("token"), exist_ok=True).repo_id
    save_components(save_directory, **kwargs)
    pipeline.image_processor.save_pretrained(os.path.join(save_directory, "vq_model"))
    pipeline_model_card(pipeline, repo_id).save(os.path.join(save_directory, "README.md"))
    if push_to_hub:
        return upload_folder(
            repo_id=repo_id, folder_path=save_directory, token=hub.get("token"),
            commit_message=hub.get("commit_message") or f"Upload {type(pipeline).__name__}",
            create_pr=hub.get("create_pr", False),
        )
    return None


def push_pipeline(
    pipeline, repo_id: str, commit_message=None, private=None, token=None, create_pr=False, **save_kwargs
):
    """`MergeVQPipeline.push_to_hub`: save to a temporary folder (weights, configs, model card) and upload it."""
    with tempfile.TemporaryDirectory() as folder:
        return pipeline.save_pretrained(
            folder, push_to_hub=True, repo_id=repo_id, commit_message=commit_message, private=private, token=token,
            create_pr=create_pr, **save_kwargs,
        )


def pipeline_model_card(pipeline, model_id: str | None = None, remote_code: bool = False) -> ModelCard:
    """A model card for a `MergeVQPipeline`: Hub metadata plus the sizes, usage and evaluation protocol.

    `remote_code=True` describes a folder written by `export_for_hub` (loads without the package).
    """
    vq, ar = pipeline.vq_model.config, pipeline.transformer.config
    generator = (
        "MergeRandAR (K merged tokens in random order, decoded through the learned source recovery)"
        if pipeline.generation_mode == "random"
        else "MergeAR (raster order over all L positions)"
    )
    data = ModelCardData(
        license=CARD_LICENSE, library_name="diffusers", pipeline_tag="unconditional-image-generation",
        tags=CARD_TAGS + ["class-conditional-image-generation", "mergevq_hf"], datasets=CARD_DATASETS,
        metrics=CARD_METRICS,
    )
    location = model_id or "path/to/folder"
    if remote_code:
        loader = "from diffusers import DiffusionPipeline"
        call = f'DiffusionPipeline.from_pretrained("{location}", trust_remote_code=True)'
        note = "The repository carries its own code, so `mergevq_hf` need not be installed."
    else:
        loader = "from mergevq_hf import MergeVQPipeline"
        call = f'MergeVQPipeline.from_pretrained("{location}")'
        note = "This folder needs `mergevq_hf` installed; `mergevq_hf.hub.export_for_hub` writes one that does not."
    content = f"""---
{data.to_yaml()}
---

# {model_id or "MergeVQ + MergeAR"}

MergeVQ tokenizer and MergeAR class-conditional generator
([MergeVQ, arXiv 2504.00999](https://arxiv.org/abs/2504.00999)), packaged as a diffusers pipeline by `mergevq_hf`.

- Tokenizer: {vq.image_size}x{vq.image_size} images, L = {vq.num_patches} tokens merged to K = {vq.num_tokens},
  {vq.codebook_bits}-bit look-up-free codes.
- Generator: {generator}, {ar.num_classes} classes, {ar.num_hidden_layers} layers of width {ar.hidden_size},
  default K = {ar.num_tokens}.

## Usage

```python
import torch
{loader}

pipe = {call}
images = pipe(class_labels=[1, 7], guidance_scale=2.0, generator=torch.Generator().manual_seed(0)).images
reconstructions = pipe.reconstruct(images, num_tokens={vq.num_tokens}).images
```

{note}

## Evaluation protocol

{EVALUATION_PROTOCOL}
"""
    return ModelCard(content)


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


__all__ = [
    "COMPONENT_NAMES",
    "export_for_hub",
    "pipeline_model_card",
    "push_pipeline",
    "save_pipeline",
    "sibling_closure",
    "tokenizer_model_card",
]
