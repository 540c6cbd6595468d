"""One string names the training images of both example scripts (``--dataset``).

* ``fashion_mnist``: Fashion-MNIST from the Debian package ``dataset-fashion-mnist`` (32x32 padded, RGB);
* ``procedural`` or ``procedural:N``: N deterministic synthetic images (default 1024); the ``test`` split uses
  another seed, so it is held out;
* ``imagefolder:<dir>``: ``<dir>/[<split>/]<class>/*.png`` through ``datasets``' ``imagefolder`` builder;
* a folder written by ``Dataset.save_to_disk`` / ``DatasetDict.save_to_disk``;
* anything else: ``datasets.load_dataset(spec, config_name, split=split)`` (a Hub id, which works offline only when
  it is in the local ``datasets`` cache, or a local data folder).
"""

from __future__ import annotations

import os

from .data import load_fashion_mnist, load_imagefolder, procedural_images

__all__ = ["load_image_dataset"]


def load_image_dataset(
    spec: str,
    split: str = "train",
    *,
    image_column: str = "image",
    label_column: str | None = None,
    config_name: str | None = None,
    max_samples: int | None = None,
    image_size: int = 32,
    seed: int = 0,
):
    """The ``datasets.Dataset`` named by ``spec`` (see the module docstring), checked to have the needed columns.

    Args:
        image_column: column holding the images (PIL images or ``Image`` feature).
        label_column: required class-label column (stage 2), or ``None`` when labels are not needed.
        max_samples: keep only the first ``max_samples`` examples.
        image_size: side of the procedural images (the other sources keep their own size).
    """
    import datasets

    if not isinstance(spec, str) or not spec:
        raise ValueError(f"dataset must be 'fashion_mnist', 'procedural[:N]', 'imagefolder:<dir>', a saved dataset folder or a datasets id, got {spec!r}")
    if spec == "fashion_mnist":
        ds = load_fashion_mnist(split)
    elif spec == "procedural" or spec.startswith("procedural:"):
        count = spec.partition(":")[2] or "1024"
        if not count.isdigit() or int(count) < 1:
            raise ValueError(f"expected 'procedural:N' with N a positive integer, got {spec!r}")
        ds = procedural_images(int(count), size=image_size, seed=seed if split == "train" else seed + 1)
    elif spec.startswith("imagefolder:"):
        ds = load_imagefolder(spec.partition(":")[2], split=split)
    elif os.path.isdir(spec) and any(os.path.isfile(os.path.join(spec, f)) for f in ("state.json", "dataset_dict.json")):
        ds = datasets.load_from_disk(spec)
        if isinstance(ds, datasets.DatasetDict):
            if split not in ds:
                raise ValueError(f"saved dataset {spec} has splits {sorted(ds)}, not {split!r}")
            ds = ds[split]
    else:
        ds = datasets.load_dataset(spec, config_name, split=split)

    for column in (image_column, label_column):
        if column is not None and column not in ds.column_names:
            raise ValueError(f"dataset {spec!r} has no column {column!r} (columns: {ds.column_names}); pass --image_column / --label_column")
    if max_samples is not None:
        if max_samples < 1:
            raise ValueError(f"max_samples must be >= 1, got {max_samples}")
        ds = ds.select(range(min(max_samples, len(ds))))
    return ds
