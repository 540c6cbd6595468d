"""Image data for tokenizer/generator training, as 🤗 ``datasets`` objects.

Sources (all offline):

* :func:`load_fashion_mnist`: Fashion-MNIST from the Debian package ``dataset-fashion-mnist`` (the original IDX gz
  files), padded 28 -> 32 with black (uint8 0, i.e. -1 after scaling) and replicated to RGB.
* :func:`procedural_images`: deterministic synthetic labelled images (shapes, stripes, blobs) for tests.
* :func:`load_imagefolder`: any ``root/<split>/<class>/*.png`` tree through ``datasets``' built-in ``imagefolder``.

All three give ``image`` (PIL, RGB) and ``label`` (``ClassLabel``) columns. :class:`ImageTransform` turns a batch of
such rows into tensors (``dataset.with_transform(ImageTransform(32))``) and :func:`collate_images` stacks them.
With the HF ``Trainer`` pass ``remove_unused_columns=False`` (otherwise the ``image`` column is dropped before the
transform runs).

Storage note: the two in-package sources keep each image as an uncompressed PGM/PPM byte string inside the standard
``Image`` feature (decoded by PIL, cast to RGB by ``Image(mode="RGB")``). Encoding 60k PNGs would take ~7 s; this takes
well under a second and decodes just as fast.
"""

from __future__ import annotations

import gzip
import math
import os
import random
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

__all__ = [
    "AlignmentViewsTransform",
    "FASHION_MNIST_APT_COMMAND",
    "FASHION_MNIST_CLASSES",
    "FASHION_MNIST_DIR",
    "PROCEDURAL_CLASSES",
    "ImageTransform",
    "collate_images",
    "load_fashion_mnist",
    "load_imagefolder",
    "procedural_images",
    "read_idx",
]

FASHION_MNIST_DIR = Path("/usr/share/datasets/fashion-mnist")
FASHION_MNIST_APT_COMMAND = "apt-get update && apt-get install -y dataset-fashion-mnist"
FASHION_MNIST_CLASSES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot")
PROCEDURAL_CLASSES = ("disk", "square", "triangle", "h-stripes", "v-stripes", "diagonal", "checker", "blobs", "ring", "cross")

_IDX_IMAGES_MAGIC = 0x00000803  # unsigned byte, 3 dimensions
_IDX_LABELS_MAGIC = 0x00000801  # unsigned byte, 1 dimension


# ----------------------------------------------------------------------------------------------------- IDX / datasets


def read_idx(path: str | os.PathLike) -> np.ndarray:
    """Read a (gzipped) IDX file of unsigned bytes (``0x0801`` labels or ``0x0803`` images) into a uint8 array.

    Raises OSError when the file is missing, not gzip, has an unknown magic number or a size that disagrees with its
    header.
    """
    path = Path(path)
    if not path.is_file():
        raise OSError(f"IDX file not found: {path}")
    try:
        with gzip.open(path, "rb") if path.suffix == ".gz" else open(path, "rb") as f:
            raw = f.read()
    except (OSError, EOFError) as err:
        raise OSError(f"{path} is not a readable gzip file: {err}") from err
    if len(raw) < 8:
        raise OSError(f"{path} is too short ({len(raw)} bytes) to be an IDX file")
    magic = int.from_bytes(raw[:4], "big")
    if magic not in (_IDX_IMAGES_MAGIC, _IDX_LABELS_MAGIC):
        raise OSError(f"{path}: bad IDX magic number 0x{magic:08x}, expected 0x{_IDX_IMAGES_MAGIC:08x} (images) or 0x{_IDX_LABELS_MAGIC:08x} (labels)")
    ndim = magic & 0xFF
    header = 4 + 4 * ndim
    dims = [int.from_bytes(raw[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim)]
    if len(raw) != header + int(np.prod(dims)):
        raise OSError(f"{path}: header says shape {dims} ({header + int(np.prod(dims))} bytes) but the file has {len(raw)} bytes")
    return np.frombuffer(raw, dtype=np.uint8, offset=header).reshape(dims)


def _fingerprint(*parts: Any) -> str:
    import hashlib

    return hashlib.blake2b("|".join(map(str, parts)).encode(), digest_size=8).hexdigest()


def _image_dataset(images: np.ndarray, labels: np.ndarray, class_names: Sequence[str], split: str | None = None, fingerprint: str | None = None):
    """``datasets.Dataset`` with ``image`` (Image(mode="RGB")) and ``label`` (ClassLabel) from uint8 arrays.

    ``images`` is ``[N, H, W]`` (gray, stored as PGM) or ``[N, H, W, 3]`` (stored as PPM). ``fingerprint`` (the
    ``datasets`` cache / teacher-cache identity) defaults to a hash of the whole table computed by ``datasets``.
    """
    import datasets
    import pyarrow as pa
    from datasets.table import InMemoryTable

    if images.dtype != np.uint8 or images.ndim not in (3, 4) or (images.ndim == 4 and images.shape[-1] != 3):
        raise ValueError(f"expected uint8 images [N, H, W] or [N, H, W, 3], got {images.dtype} {images.shape}")
    if len(labels) != len(images):
        raise ValueError(f"{len(images)} images but {len(labels)} labels")
    n, h, w = images.shape[:3]
    header = np.frombuffer(f"{'P5' if images.ndim == 3 else 'P6'}\n{w} {h}\n255\n".encode(), dtype=np.uint8)
    pixels = images.reshape(n, -1)
    rows = np.empty((n, header.size + pixels.shape[1]), dtype=np.uint8)
    rows[:, : header.size] = header
    rows[:, header.size :] = pixels
    offsets = np.arange(n + 1, dtype=np.int32) * rows.shape[1]
    blobs = pa.Array.from_buffers(pa.binary(), n, [None, pa.py_buffer(offsets), pa.py_buffer(rows.reshape(-1))])
    image_col = pa.StructArray.from_arrays([blobs, pa.nulls(n, pa.string())], names=["bytes", "path"])
    table = pa.table({"image": image_col, "label": pa.array(np.asarray(labels, dtype=np.int64))})
    features = datasets.Features({"image": datasets.Image(mode="RGB"), "label": datasets.ClassLabel(names=list(class_names))})
    info = datasets.DatasetInfo(features=features)
    return datasets.Dataset(InMemoryTable(table), info=info, split=split, fingerprint=fingerprint)


# Training images that the reproduction's generators never see (they train on the first 30,000): settings are chosen
# against these before anything is measured on the test split.
FASHION_MNIST_HELDOUT_ROWS = range(50000, 60000)


def load_fashion_mnist(split: str = "train", root: str | os.PathLike | None = None, pad_to: int | None = 32):
    """Fashion-MNIST (Zalando, MIT) from the Debian package files, as a ``datasets.Dataset``.

    Args:
        split: ``"train"`` (60,000 images) or ``"test"`` (10,000).
        root: folder with ``{train,t10k}-{images-idx3,labels-idx1}-ubyte.gz``; default ``/usr/share/datasets/fashion-mnist``.
        pad_to: pad the 28x28 images symmetrically with black to this size (``None`` keeps 28x28).

    Returns a dataset with ``image`` (PIL RGB, the gray value replicated) and ``label`` (ClassLabel with the 10
    Fashion-MNIST names). Loads in well under a second.
    """
    prefix = {"train": "train", "test": "t10k"}.get(split)
    if prefix is None:
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    root = FASHION_MNIST_DIR if root is None else Path(root)
    img_path, lbl_path = root / f"{prefix}-images-idx3-ubyte.gz", root / f"{prefix}-labels-idx1-ubyte.gz"
    for p in (img_path, lbl_path):
        if not p.is_file():
            raise OSError(f"Fashion-MNIST file {p} is missing. Install the Debian package with `{FASHION_MNIST_APT_COMMAND}` (as root; `make setup` does it), or pass root= a folder holding the four IDX .gz files.")
    images, labels = read_idx(img_path), read_idx(lbl_path)
    if images.ndim != 3 or labels.ndim != 1:
        raise OSError(f"{img_path} / {lbl_path}: expected an image file and a label file, got shapes {images.shape} and {labels.shape}")
    if len(images) != len(labels):
        raise OSError(f"{img_path} has {len(images)} images but {lbl_path} has {len(labels)} labels")
    if labels.max(initial=0) >= len(FASHION_MNIST_CLASSES):
        raise OSError(f"{lbl_path}: label {labels.max()} out of range 0..9")
    if pad_to is not None:
        ph, pw = pad_to - images.shape[1], pad_to - images.shape[2]
        if ph < 0 or pw < 0:
            raise ValueError(f"pad_to={pad_to} is smaller than the {images.shape[1:]} images")
        images = np.pad(images, ((0, 0), (ph // 2, ph - ph // 2), (pw // 2, pw - pw // 2)))
    # Identity from the source files (path, size, mtime) instead of hashing 60k images.
    stamp = [(str(p.resolve()), p.stat().st_size, p.stat().st_mtime_ns) for p in (img_path, lbl_path)]
    fingerprint = _fingerprint("fashion-mnist", split, pad_to, *stamp)
    return _image_dataset(np.ascontiguousarray(images), labels, FASHION_MNIST_CLASSES, split=split, fingerprint=fingerprint)


def load_imagefolder(data_dir: str | os.PathLike, split: str | None = None, **kwargs: Any):
    """``datasets.load_dataset("imagefolder", data_dir=...)``: ``data_dir/[<split>/]<class>/*.{png,jpg,...}``.

    Works offline (the builder ships with ``datasets``). Returns a ``DatasetDict`` (or a ``Dataset`` when ``split``
    is given) with ``image`` and ``label`` columns (``label`` only when there are class subfolders).
    """
    import datasets

    if not Path(data_dir).is_dir():
        raise OSError(f"image folder not found: {data_dir}")
    return datasets.load_dataset("imagefolder", data_dir=str(data_dir), split=split, **kwargs)


# ------------------------------------------------------------------------------------------------------- procedural


def _procedural_image(rng: np.random.Generator, label: int, size: int) -> np.ndarray:
    """One RGB float image in [0, 1]: a class-specific pattern in a random colour on a random background."""
    yy, xx = np.meshgrid(np.linspace(-1, 1, size), np.linspace(-1, 1, size), indexing="ij")
    px = 2.0 / size  # one pixel in these coordinates; masks are anti-aliased over about a pixel
    cy, cx = rng.uniform(-0.25, 0.25, 2)
    y, x = yy - cy, xx - cx
    scale = rng.uniform(0.35, 0.65)
    freq = rng.uniform(2.0, 4.0) * np.pi
    phase = rng.uniform(0, 2 * np.pi)

    def edge(signed_dist: np.ndarray) -> np.ndarray:  # 1 inside (negative distance), 0 outside
        return np.clip(0.5 - signed_dist / px, 0.0, 1.0)

    name = PROCEDURAL_CLASSES[label]
    if name == "disk":
        mask = edge(np.hypot(x, y) - scale)
    elif name == "square":
        mask = edge(np.maximum(abs(x), abs(y)) - scale * 0.85)
    elif name == "triangle":
        mask = edge(np.maximum(-y - scale * 0.8, np.maximum(abs(x) * 1.7 + y * 0.85, 0) - scale))
    elif name == "h-stripes":
        mask = (np.sin(yy * freq + phase) > 0).astype(float)
    elif name == "v-stripes":
        mask = (np.sin(xx * freq + phase) > 0).astype(float)
    elif name == "diagonal":
        mask = (np.sin((xx + yy) * freq * 0.7 + phase) > 0).astype(float)
    elif name == "checker":
        mask = ((np.sin(xx * freq + phase) > 0) ^ (np.sin(yy * freq + phase) > 0)).astype(float)
    elif name == "blobs":
        mask = np.zeros_like(xx)
        for _ in range(rng.integers(2, 4)):
            by, bx, s = rng.uniform(-0.6, 0.6), rng.uniform(-0.6, 0.6), rng.uniform(0.15, 0.35)
            mask = np.maximum(mask, np.exp(-((yy - by) ** 2 + (xx - bx) ** 2) / (2 * s * s)))
    elif name == "ring":
        mask = edge(abs(np.hypot(x, y) - scale) - scale * 0.25)
    else:  # cross
        arm = scale * 0.3
        mask = edge(np.minimum(np.maximum(abs(x) - arm, abs(y) - scale), np.maximum(abs(y) - arm, abs(x) - scale)))
    background = rng.uniform(0.0, 0.35, 3) if rng.random() < 0.5 else rng.uniform(0.65, 1.0, 3)
    foreground = rng.uniform(0.0, 1.0, 3)
    foreground[rng.integers(3)] = 1.0 - background.mean()  # keep some contrast against the background
    image = background * (1 - mask[..., None]) + foreground * mask[..., None]
    return np.clip(image + rng.normal(0.0, 0.02, image.shape), 0.0, 1.0)


def procedural_images(n: int, size: int = 32, seed: int = 0, num_classes: int = 10):
    """``n`` deterministic synthetic RGB images (``image``, ``label`` columns) for tests and smoke runs.

    Image ``i`` has label ``i % num_classes`` and depends only on ``(seed, i)``, so a larger ``n`` extends a smaller
    one. Classes (first ``num_classes`` of :data:`PROCEDURAL_CLASSES`): disk, square, triangle, horizontal / vertical
    / diagonal stripes, checkerboard, Gaussian blobs, ring, cross — each with random colours, position, scale and
    frequency, plus light noise.
    """
    if not 1 <= num_classes <= len(PROCEDURAL_CLASSES):
        raise ValueError(f"num_classes must lie in 1..{len(PROCEDURAL_CLASSES)}, got {num_classes}")
    if n < 0 or size < 8:
        raise ValueError(f"need n >= 0 and size >= 8, got n={n}, size={size}")
    labels = np.arange(n) % num_classes
    images = np.empty((n, size, size, 3), dtype=np.uint8)
    for i in range(n):
        rng = np.random.default_rng([seed, i])
        images[i] = np.round(_procedural_image(rng, int(labels[i]), size) * 255).astype(np.uint8)
    return _image_dataset(images, labels, PROCEDURAL_CLASSES[:num_classes], fingerprint=_fingerprint("procedural-v1", n, size, seed, num_classes))


# ------------------------------------------------------------------------------------------------------- transforms


def _to_pil_rgb(item: Any, background: tuple[int, int, int]):
    from PIL import Image

    if isinstance(item, dict) and ("bytes" in item or "path" in item):  # an undecoded Image() cell
        import io

        item = Image.open(io.BytesIO(item["bytes"])) if item.get("bytes") else Image.open(item["path"])
    elif isinstance(item, np.ndarray):
        item = Image.fromarray(item)
    if not isinstance(item, Image.Image):
        raise ValueError(f"expected a PIL image, a uint8 numpy array or an Image() dict, got {type(item).__name__}")
    if item.mode == "RGB":
        return item
    if item.mode == "P" and "transparency" in item.info:
        item = item.convert("RGBA")
    if item.mode in ("RGBA", "LA", "PA"):
        rgba = item.convert("RGBA")
        canvas = Image.new("RGBA", rgba.size, (*background, 255))
        return Image.alpha_composite(canvas, rgba).convert("RGB")
    if item.mode.startswith("I;16") or item.mode == "I":  # 16-bit gray, scaled as MergeVQImageProcessor reads it
        arr = np.asarray(item).astype(np.float64).clip(0, 65535) / 65535 * 255
        return Image.fromarray(arr.round().astype(np.uint8)).convert("RGB")
    return item.convert("RGB")


class ImageTransform:
    """Batch transform for ``dataset.with_transform``: image column -> ``pixel_values`` ``[3, size, size]`` in [-1, 1].

    Each image is converted to RGB (gray replicated; alpha composited onto ``background``), resized so that its
    *shorter* side equals ``size`` (aspect ratio kept; skipped when it already does), then cropped to ``size`` x
    ``size`` — centred (``crop="center"``, evaluation) or at a random offset (``crop="random"``, like the released
    training view) — optionally flipped horizontally with probability 0.5, and scaled as ``x / 127.5 - 1``.

    Args:
        size: output side length.
        image_column: name of the input image column.
        label_column: input label column; copied (as int) to ``label_output`` when present in the batch.
            ``None`` drops labels (e.g. for the tokenizer, whose forward takes no labels).
        label_output: output key for labels (``"class_labels"`` by default; use ``"labels"`` if the model wants that).
        crop: ``"center"`` or ``"random"``.
        hflip: random horizontal flips.
        resample: PIL filter name for resizing (``"bicubic"``, ``"bilinear"``, ``"lanczos"``, ``"nearest"``).
        background: RGB fill behind transparent pixels.
        passthrough: other columns to copy into the output as tensors (e.g. precomputed ``"teacher_features"``).
        seed: seed for the crop/flip random generator.
    """

    def __init__(
        self,
        size: int = 32,
        image_column: str = "image",
        label_column: str | None = "label",
        label_output: str = "class_labels",
        crop: str = "center",
        hflip: bool = False,
        resample: str = "bicubic",
        background: tuple[int, int, int] = (255, 255, 255),
        passthrough: Sequence[str] = (),
        seed: int | None = None,
    ) -> None:
        from PIL import Image

        if size < 1:
            raise ValueError(f"size must be positive, got {size}")
        if crop not in ("center", "random"):
            raise ValueError(f"crop must be 'center' or 'random', got {crop!r}")
        filters = {"bicubic": Image.Resampling.BICUBIC, "bilinear": Image.Resampling.BILINEAR, "lanczos": Image.Resampling.LANCZOS, "nearest": Image.Resampling.NEAREST}
        if resample not in filters:
            raise ValueError(f"resample must be one of {sorted(filters)}, got {resample!r}")
        self.size, self.image_column, self.label_column, self.label_output = int(size), image_column, label_column, label_output
        self.crop, self.hflip, self.resample, self.background = crop, bool(hflip), filters[resample], tuple(background)
        self.passthrough = tuple(passthrough)
        self._rng = random.Random(seed)
        # The inference processor's size bounds, so that a thin strip in a dataset is refused before resizing.
        from ..image_processing_mergevq import MergeVQImageProcessor

        self._bounds = MergeVQImageProcessor(image_size=self.size)

    def image_to_tensor(self, image: Any) -> torch.Tensor:
        """One image (PIL / uint8 array / Image() dict) -> float tensor ``[3, size, size]`` in [-1, 1]."""
        img = _to_pil_rgb(image, self.background)
        w, h = img.size
        self._bounds.check_size(h, w)
        s = self.size
        if min(w, h) != s:
            scale = s / min(w, h)
            img = img.resize((max(s, round(w * scale)), max(s, round(h * scale))), self.resample)
            w, h = img.size
        if self.crop == "random":
            left, top = self._rng.randint(0, w - s), self._rng.randint(0, h - s)
        else:
            left, top = (w - s) // 2, (h - s) // 2
        if (w, h) != (s, s):
            img = img.crop((left, top, left + s, top + s))
        arr = torch.from_numpy(np.array(img, dtype=np.uint8)).permute(2, 0, 1)
        if self.hflip and self._rng.random() < 0.5:
            arr = arr.flip(-1)
        return arr.float().div_(127.5).sub_(1.0)

    def __call__(self, batch: dict[str, list]) -> dict[str, list]:
        if self.image_column not in batch:
            raise ValueError(f"image column {self.image_column!r} not in the batch (columns: {sorted(batch)})")
        out: dict[str, list] = {"pixel_values": [self.image_to_tensor(im) for im in batch[self.image_column]]}
        if self.label_column is not None and self.label_column in batch:
            out[self.label_output] = [int(v) for v in batch[self.label_column]]
        for col in self.passthrough:
            if col not in batch:
                raise ValueError(f"passthrough column {col!r} not in the batch (columns: {sorted(batch)})")
            arrays = [np.asarray(v) for v in batch[col]]
            out[col] = [torch.from_numpy(a.astype(np.float32) if a.dtype.kind == "f" else a) for a in arrays]
        return out

    def __repr__(self) -> str:
        return f"ImageTransform(size={self.size}, image_column={self.image_column!r}, label_column={self.label_column!r}, crop={self.crop!r}, hflip={self.hflip})"


class AlignmentViewsTransform(ImageTransform):
    """:class:`ImageTransform` plus the two extra views of the paper's alignment recipe (docs/design.md §1.4).

    Besides ``pixel_values`` (the reconstruction view, exactly as :class:`ImageTransform` makes it), every image gives

    * ``alignment_pixel_values`` ``[3, size, size]``, the student's *strong* view: a random resized crop (area a
      uniform fraction ``strong_scale`` of the image, aspect ratio log-uniform in ``strong_ratio``, bicubic) to the
      tokenizer's own ``size``, so that the second encoder pass has the same L and the step's K applies, then a
      horizontal flip with probability 0.5;
    * ``teacher_pixel_values`` ``[3, teacher_size, teacher_size]``, the teacher's *weak* view: the shorter side
      resized (bilinear) to ``teacher_size``, then a random ``teacher_size`` crop.

    Both are in [-1, 1]; the teacher applies its own normalisation. The released code makes these views at 224 pixels;
    here the student's view follows the tokenizer's resolution and the teacher's view the teacher's input size.
    Under a multi-worker ``DataLoader`` each worker reseeds the generator from its own torch seed, so workers do not
    repeat each other's crops.
    """

    def __init__(
        self,
        size: int,
        teacher_size: int,
        *,
        strong_scale: tuple[float, float] = (0.08, 1.0),
        strong_ratio: tuple[float, float] = (3 / 4, 4 / 3),
        **kwargs: Any,
    ) -> None:
        super().__init__(size, **kwargs)
        if teacher_size < 1:
            raise ValueError(f"teacher_size must be positive, got {teacher_size}")
        if not 0 < strong_scale[0] <= strong_scale[1] <= 1:
            raise ValueError(f"strong_scale must be (low, high) with 0 < low <= high <= 1, got {strong_scale}")
        if not 0 < strong_ratio[0] <= strong_ratio[1]:
            raise ValueError(f"strong_ratio must be (low, high) with 0 < low <= high, got {strong_ratio}")
        self.teacher_size = int(teacher_size)
        self.strong_scale, self.strong_ratio = tuple(strong_scale), tuple(strong_ratio)
        self._worker_id: int | None = None

    def _random_resized_box(self, width: int, height: int) -> tuple[int, int, int, int]:
        """(left, top, right, bottom) of a crop with a random area fraction and aspect ratio; after 10 misses, the
        central crop with the image's aspect ratio clamped into ``strong_ratio``."""
        log_low, log_high = math.log(self.strong_ratio[0]), math.log(self.strong_ratio[1])
        for _ in range(10):
            area = width * height * self._rng.uniform(*self.strong_scale)
            aspect = math.exp(self._rng.uniform(log_low, log_high))
            w, h = round(math.sqrt(area * aspect)), round(math.sqrt(area / aspect))
            if 0 < w <= width and 0 < h <= height:
                left, top = self._rng.randint(0, width - w), self._rng.randint(0, height - h)
                return left, top, left + w, top + h
        aspect = min(max(width / height, self.strong_ratio[0]), self.strong_ratio[1])
        w, h = (width, round(width / aspect)) if width / height < aspect else (round(height * aspect), height)
        left, top = (width - w) // 2, (height - h) // 2
        return left, top, left + w, top + h

    def strong_view(self, image: Any) -> torch.Tensor:
        """The student's strong view of one image: ``[3, size, size]`` in [-1, 1]."""
        from PIL import Image

        img = _to_pil_rgb(image, self.background)
        box = self._random_resized_box(*img.size)
        view = torch.from_numpy(np.array(img.resize((self.size, self.size), Image.Resampling.BICUBIC, box=box), dtype=np.uint8)).permute(2, 0, 1)
        if self._rng.random() < 0.5:
            view = view.flip(-1)
        return view.float().div_(127.5).sub_(1.0)

    def teacher_view(self, image: Any) -> torch.Tensor:
        """The teacher's weak view of one image: ``[3, teacher_size, teacher_size]`` in [-1, 1]."""
        from PIL import Image

        img = _to_pil_rgb(image, self.background)
        s, (w, h) = self.teacher_size, img.size
        if min(w, h) != s:
            img = img.resize((max(s, round(w * s / min(w, h))), max(s, round(h * s / min(w, h)))), Image.Resampling.BILINEAR)
            w, h = img.size
        left, top = self._rng.randint(0, w - s), self._rng.randint(0, h - s)
        view = torch.from_numpy(np.array(img.crop((left, top, left + s, top + s)), dtype=np.uint8)).permute(2, 0, 1)
        return view.float().div_(127.5).sub_(1.0)

    def __call__(self, batch: dict[str, list]) -> dict[str, list]:
        worker = torch.utils.data.get_worker_info()
        if worker is not None and worker.id != self._worker_id:
            self._rng, self._worker_id = random.Random(worker.seed), worker.id
        out = super().__call__(batch)
        images = batch[self.image_column]
        out["alignment_pixel_values"] = [self.strong_view(im) for im in images]
        out["teacher_pixel_values"] = [self.teacher_view(im) for im in images]
        return out

    def __repr__(self) -> str:
        return f"{super().__repr__()[:-1]}, teacher_size={self.teacher_size}, strong_scale={self.strong_scale}, strong_ratio={self.strong_ratio})"


def collate_images(examples: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Collate a list of transformed rows: tensors are stacked, numbers become a tensor, anything else a list."""
    if not examples:
        raise ValueError("collate_images got an empty list of examples")
    keys = examples[0].keys()
    for i, ex in enumerate(examples):
        if ex.keys() != keys:
            raise ValueError(f"example {i} has keys {sorted(ex)} but example 0 has {sorted(keys)}")
    batch: dict[str, Any] = {}
    for key in keys:
        values = [ex[key] for ex in examples]
        if isinstance(values[0], torch.Tensor):
            shapes = {tuple(v.shape) for v in values}
            if len(shapes) != 1:
                raise ValueError(f"cannot stack {key!r}: tensors of different shapes {sorted(shapes)[:3]}")
            batch[key] = torch.stack(values)
        elif isinstance(values[0], (bool, int, float, np.integer, np.floating)):
            batch[key] = torch.tensor(values)
        else:
            batch[key] = values
    return batch
