"""Pictures for people: opening user images, the merge map drawn over an image, and a grid of images.

Used by the CLI (`mergevq reconstruct`), the Space's Tokenize tab and the README demo.
"""

from __future__ import annotations

import colorsys
import math
from typing import Sequence

import numpy as np
from PIL import Image, UnidentifiedImageError

_GOLDEN_RATIO = 0.618033988749895
MAX_IMAGE_PIXELS = 4096 * 4096  # far above any tokenizer size; refuses decompression bombs before decoding


def load_image(path, max_pixels: int = MAX_IMAGE_PIXELS) -> tuple[Image.Image, str]:
    """Open a user's image file, decoded in its own mode (16-bit grey, alpha, CMYK, ...), which
    `MergeVQImageProcessor` reads faithfully; its size is checked before decoding. Returns (image, mode), e.g. "L"
    or "RGBA" to tell the user it was converted. Raises FileNotFoundError or ValueError with a one-line message."""
    name = getattr(path, "name", None) or str(path)
    try:
        with Image.open(path) as image:  # reads the header only: the size check costs nothing
            if image.width * image.height > max_pixels:
                raise ValueError(
                    f"{name} is {image.width}x{image.height} pixels; images of at most {max_pixels:,} pixels are accepted"
                )
            image.load()
            return image.copy(), image.mode  # a copy outlives the closed file
    except FileNotFoundError:
        raise FileNotFoundError(f"no such image file: {name}") from None
    except (UnidentifiedImageError, Image.DecompressionBombError):
        raise ValueError(f"{name} is not an image file that can be read (PNG, JPEG, WebP, BMP, ...)") from None
    except OSError as error:  # truncated or corrupt data
        raise ValueError(f"{name} could not be decoded: {error}") from None


def _palette(num_colors: int) -> np.ndarray:
    """Distinct, deterministic RGB colours: hues spaced by the golden ratio so neighbouring token ids differ."""
    hues = (np.arange(num_colors) * _GOLDEN_RATIO) % 1.0
    return np.array([colorsys.hsv_to_rgb(h, 0.75, 1.0) for h in hues], dtype=np.float32) * 255.0


def _as_label_grid(source_map, grid_size: int | tuple[int, int]) -> np.ndarray:
    labels = np.asarray(source_map.detach().cpu() if hasattr(source_map, "detach") else source_map).astype(np.int64)
    grid_h, grid_w = (grid_size, grid_size) if isinstance(grid_size, int) else grid_size
    if labels.ndim != 1 or labels.size != grid_h * grid_w:
        raise ValueError(f"source_map must be a 1-D array of {grid_h}x{grid_w} = {grid_h * grid_w} entries, got shape {labels.shape}")
    if labels.min() < 0:
        raise ValueError("source_map entries must be token indices >= 0")
    return labels.reshape(grid_h, grid_w)


def draw_merge_map(
    image: Image.Image,
    source_map,
    grid_size: int | tuple[int, int],
    alpha: float = 0.45,
    display_size: int = 256,
) -> Image.Image:
    """Colour each merged token's region over `image` and outline the regions.

    Grid positions that share a colour (and lie inside one outline) were merged into one token, so they are decoded
    from one code. `source_map` is [L] (torch or numpy): for each grid position in raster order, its token index.
    The picture is enlarged so each grid cell is a whole number of pixels at least `display_size` wide in total:
    32x32 Fashion-MNIST images would be too small to read otherwise.
    """
    labels = _as_label_grid(source_map, grid_size)
    grid_h, grid_w = labels.shape
    cell = max(1, math.ceil(display_size / max(grid_h, grid_w)))
    size = (grid_w * cell, grid_h * cell)

    base = np.asarray(image.convert("RGB").resize(size, Image.Resampling.NEAREST), dtype=np.float32)
    pixel_labels = np.kron(labels, np.ones((cell, cell), dtype=np.int64))
    colours = _palette(int(labels.max()) + 1)[pixel_labels]
    blended = (1.0 - alpha) * base + alpha * colours

    # A pixel is on a boundary when its right or lower neighbour belongs to another token.
    edge = np.zeros(pixel_labels.shape, dtype=bool)
    edge[:, :-1] |= pixel_labels[:, :-1] != pixel_labels[:, 1:]
    edge[:-1, :] |= pixel_labels[:-1, :] != pixel_labels[1:, :]
    blended[edge] = 255.0
    return Image.fromarray(blended.round().clip(0, 255).astype(np.uint8))


def make_grid(images: Sequence[Image.Image], nrow: int = 8, padding: int = 2, background=(255, 255, 255)) -> Image.Image:
    """Tile `images` (resized to the first one's size) `nrow` per row, like torchvision's `make_grid`."""
    if not images:
        raise ValueError("make_grid needs at least one image")
    if nrow < 1:
        raise ValueError(f"nrow must be >= 1, got {nrow}")
    width, height = images[0].size
    cols = min(nrow, len(images))
    rows = math.ceil(len(images) / cols)
    grid = Image.new("RGB", (cols * width + (cols + 1) * padding, rows * height + (rows + 1) * padding), background)
    for i, img in enumerate(images):
        row, col = divmod(i, cols)
        tile = img.convert("RGB")
        if tile.size != (width, height):
            tile = tile.resize((width, height), Image.Resampling.BICUBIC)
        grid.paste(tile, (padding + col * (width + padding), padding + row * (height + padding)))
    return grid


def enlarge(image: Image.Image, min_side: int = 256) -> Image.Image:
    """Scale up by a whole factor (nearest neighbour, so pixels stay sharp) until the short side is >= `min_side`."""
    factor = max(1, math.ceil(min_side / min(image.size)))
    if factor == 1:
        return image
    return image.resize((image.width * factor, image.height * factor), Image.Resampling.NEAREST)


__all__ = ["MAX_IMAGE_PIXELS", "draw_merge_map", "enlarge", "load_image", "make_grid"]
