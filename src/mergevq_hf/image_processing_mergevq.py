"""MergeVQImageProcessor: user images (PIL, numpy, torch) -> the tokenizer's `pixel_values`, and decoder output back.

Every image becomes RGB in [0, 1] first, reading its mode faithfully:
- 16-bit greyscale (PIL `I;16*`, numpy uint16) is scaled by 1/65535; PIL's own RGB conversion clips it to 255, which
  turns almost every 16-bit picture white. PIL `I` (32-bit integers, how some decoders open 16-bit files) is read as
  16-bit too, clipped to [0, 65535]. PIL `F` (32-bit float) follows Pillow's own convention of 0..255 greyscale.
- Transparency (`RGBA`, `LA`, `PA`, `P` or `L`/`RGB` with a transparent colour, 4- or 2-channel arrays) is composited
  over `background_color` (white by default), as training does, instead of dropping alpha (which would reveal
  whatever colour the transparent pixels happen to store).
- `CMYK`, `YCbCr`, `LAB`, `1`, `L`, ... go through Pillow's conversion to RGB.
Then the shorter side is resized to `image_size` (antialiased bicubic, like training's PIL bicubic) and the centre
square is cropped, as in the rFID protocol; `pixel_values` are `x * 2 - 1`, channels first.

Sizes are bounded *before* any resizing: the work of one image is at most `image_size**2 * max_aspect_ratio`
pixels, so a 1 x 4,000,000 strip (a few hundred bytes as a PNG) is refused instead of being stretched to a
32 x 128,000,000 intermediate, and inputs of more than `max_input_pixels` are refused (PIL files should be checked
before decoding: see `mergevq_hf.visualization.load_image`).
"""

import numpy as np
import PIL.Image
import torch
import torch.nn.functional as F
from transformers import AutoImageProcessor
from transformers.image_processing_utils import BaseImageProcessor, BatchFeature

OUTPUT_TYPES = ("pil", "np", "pt")
RESAMPLE_MODES = ("bicubic", "bilinear")
DEFAULT_MAX_ASPECT_RATIO = 8.0
DEFAULT_MAX_INPUT_PIXELS = 4096 * 4096
_WITH_ALPHA = ("RGBA", "LA", "PA", "RGBa", "La")


def _is_int(value) -> bool:
    return isinstance(value, (int, np.integer)) and not isinstance(value, (bool, np.bool_))


class MergeVQImageProcessor(BaseImageProcessor):
    r"""
    Prepares images for `MergeVQModel` and turns its decoder output back into images (see the module docstring).

    Args:
        image_size: side of the square the tokenizer sees (`MergeVQConfig.image_size`).
        resample: `"bicubic"` (default) or `"bilinear"`, both antialiased.
        background_color: RGB (0..255) shown through transparent pixels.
        max_aspect_ratio: longest / shortest side accepted; longer strips raise a ValueError before resizing.
        max_input_pixels: largest input (height x width) accepted.

    Example:
        >>> processor = MergeVQImageProcessor(image_size=32)
        >>> pixel_values = processor(PIL.Image.open("shirt.png")).pixel_values  # [1, 3, 32, 32] in [-1, 1]
        >>> images = processor.postprocess(model.decode(indices, source_map))  # list of PIL images
    """

    model_input_names = ["pixel_values"]

    def __init__(
        self,
        image_size: int = 256,
        resample: str = "bicubic",
        background_color: tuple[int, int, int] | list[int] = (255, 255, 255),
        max_aspect_ratio: float = DEFAULT_MAX_ASPECT_RATIO,
        max_input_pixels: int = DEFAULT_MAX_INPUT_PIXELS,
        **kwargs,
    ):
        super().__init__(**kwargs)
        if not _is_int(image_size) or image_size < 1:
            raise ValueError(f"image_size must be a positive integer, got {image_size!r}")
        if resample not in RESAMPLE_MODES:
            raise ValueError(f"resample must be one of {RESAMPLE_MODES}, got {resample!r}")
        if (
            not isinstance(background_color, (tuple, list))
            or len(background_color) != 3
            or not all(_is_int(c) and 0 <= c <= 255 for c in background_color)
        ):
            raise ValueError(f"background_color must be three integers in [0, 255], got {background_color!r}")
        is_number = isinstance(max_aspect_ratio, (int, float)) and not isinstance(max_aspect_ratio, bool)
        if not (is_number and max_aspect_ratio >= 1):
            raise ValueError(f"max_aspect_ratio must be a number >= 1, got {max_aspect_ratio!r}")
        if not _is_int(max_input_pixels) or max_input_pixels < 1:
            raise ValueError(f"max_input_pixels must be a positive integer, got {max_input_pixels!r}")
        self.image_size = int(image_size)
        self.resample = resample
        self.background_color = [int(c) for c in background_color]
        self.max_aspect_ratio = float(max_aspect_ratio)
        self.max_input_pixels = int(max_input_pixels)

    @classmethod
    def from_model_config(cls, config, **kwargs) -> "MergeVQImageProcessor":
        """The processor for a `MergeVQConfig` (its `image_size`)."""
        return cls(image_size=config.image_size, **kwargs)

    # ---- images -> pixel_values -------------------------------------------------------------------------------------

    def preprocess(self, images, return_tensors: str = "pt") -> BatchFeature:
        r"""
        Args:
            images: a PIL image, a numpy array, a torch tensor, or a list of them (sizes and kinds may differ).
                - PIL: any mode (see the module docstring).
                - numpy: `[H, W]`, `[H, W, C]` or `[B, H, W, C]` with C in {1, 2, 3, 4} (2 and 4 carry alpha);
                  uint8 in [0, 255], uint16 in [0, 65535] or float in [0, 1].
                - torch: `[C, H, W]` or `[B, C, H, W]` float in **[0, 1]**, C in {1, 2, 3, 4}. For [-1, 1] tensors
                  pass `(x + 1) / 2`.
            return_tensors: `"pt"` (a float32 tensor) or `"np"` (a float32 array).

        Returns:
            `BatchFeature` with `pixel_values` `[B, 3, image_size, image_size]` in [-1, 1].
        """
        if return_tensors not in ("pt", "np"):
            raise ValueError(f"return_tensors must be 'pt' or 'np', got {return_tensors!r}")
        pixels = self._to_unit_rgb(images) * 2 - 1
        return BatchFeature({"pixel_values": pixels if return_tensors == "pt" else pixels.numpy()})

    def _to_unit_rgb(self, images) -> torch.Tensor:
        """Any supported input -> float32 [B, 3, S, S] in [0, 1]."""
        if isinstance(images, (list, tuple)):
            if not images:
                raise ValueError("images is an empty list; pass at least one image")
            if not all(isinstance(image, (PIL.Image.Image, np.ndarray, torch.Tensor)) for image in images):
                kinds = sorted({type(image).__name__ for image in images})
                raise ValueError(f"a list of images must hold PIL images, numpy arrays or torch tensors, got {kinds}")
            return torch.cat([self._to_unit_rgb(image) for image in images])
        if isinstance(images, PIL.Image.Image):
            self.check_size(images.height, images.width)
            return self._fit(self._from_pil(images))
        if isinstance(images, np.ndarray):
            return self._fit(self._from_numpy(images))
        if isinstance(images, torch.Tensor):
            return self._fit(self._from_torch(images))
        raise ValueError(
            f"images must be a PIL image, a numpy array, a torch tensor or a list of them, got {type(images).__name__}"
        )

    def check_size(self, height: int, width: int) -> None:
        """ValueError unless an image of this size is accepted (callers can check a file's header before decoding)."""
        if min(height, width) == 0:
            raise ValueError(f"images must not be empty, got {width}x{height}")
        if height * width > self.max_input_pixels:
            raise ValueError(
                f"a {width}x{height} image has {height * width:,} pixels; at most {self.max_input_pixels:,} are "
                "accepted"
            )
        if max(height, width) > self.max_aspect_ratio * min(height, width):
            raise ValueError(
                f"a {width}x{height} image is {max(height, width) / min(height, width):.1f} times longer than wide; at "
                f"most {self.max_aspect_ratio:g}:1 is accepted (crop it first)"
            )

    def _from_pil(self, image: PIL.Image.Image) -> torch.Tensor:
        """[1, C, H, W] in [0, 1], C = 1, 3 or 4 (alpha), following the mode's own range."""
        mode = image.mode
        if mode.startswith("I;16") or mode == "I":
            array = np.asarray(image).astype(np.float32).clip(0, 65535) / 65535
        elif mode == "F":
            array = np.asarray(image, dtype=np.float32).clip(0, 255) / 255
        else:
            has_alpha = mode in _WITH_ALPHA or "transparency" in image.info
            try:
                converted = image.convert("RGBA" if has_alpha else "L" if mode in ("1", "L") else "RGB")
            except ValueError as error:
                raise ValueError(f"PIL images in mode {mode} cannot be converted to RGB: {error}") from None
            array = np.asarray(converted, dtype=np.float32) / 255
        return self._from_numpy(array)

    @staticmethod
    def _from_numpy(array: np.ndarray) -> torch.Tensor:
        if array.ndim == 2:
            array = array[..., None]
        if array.ndim == 3:
            array = array[None]
        if array.ndim != 4 or array.shape[-1] not in (1, 2, 3, 4):
            raise ValueError(
                f"numpy images must be [H, W], [H, W, C] or [B, H, W, C] with C in 1, 2, 3, 4; got {array.shape}"
            )
        if array.dtype == np.uint8:
            array = array.astype(np.float32) / 255
        elif array.dtype == np.uint16:
            array = array.astype(np.float32) / 65535
        elif np.issubdtype(array.dtype, np.floating):
            if array.size and not (np.isfinite(array).all() and array.min() >= 0 and array.max() <= 1):
                raise ValueError("float numpy images must be finite and in [0, 1] (or pass uint8 in [0, 255])")
        else:
            raise ValueError(f"numpy images must be uint8, uint16 or float, got dtype {array.dtype}")
        return torch.from_numpy(np.ascontiguousarray(array, dtype=np.float32)).permute(0, 3, 1, 2)

    @staticmethod
    def _from_torch(tensor: torch.Tensor) -> torch.Tensor:
        if tensor.ndim == 3:
            tensor = tensor[None]
        if tensor.ndim != 4 or tensor.shape[1] not in (1, 2, 3, 4):
            raise ValueError(
                f"torch images must be [C, H, W] or [B, C, H, W] with C in 1, 2, 3, 4; got {tuple(tensor.shape)}"
            )
        if not tensor.is_floating_point():
            raise ValueError(f"torch images must be floating point in [0, 1], got dtype {tensor.dtype}")
        tensor = tensor.detach().float().cpu()
        if tensor.numel() and not (torch.isfinite(tensor).all() and tensor.min() >= 0 and tensor.max() <= 1):
            raise ValueError("torch images must be finite and in [0, 1]; for [-1, 1] tensors pass (x + 1) / 2")
        return tensor

    def _fit(self, pixels: torch.Tensor) -> torch.Tensor:
        """[B, C, H, W] in [0, 1] -> RGB over the background, shorter side resized to image_size, centre square."""
        height, width = pixels.shape[-2:]
        self.check_size(height, width)  # before any allocation that scales with the resized size
        if pixels.shape[1] in (2, 4):  # composite over the background: colour * alpha + background * (1 - alpha)
            alpha = pixels[:, -1:]
            background = torch.tensor(self.background_color, dtype=torch.float32).view(1, 3, 1, 1) / 255
            pixels = pixels[:, :-1].expand(-1, 3, -1, -1) * alpha + background * (1 - alpha)
        pixels = pixels.expand(-1, 3, -1, -1)
        size = self.image_size
        if (height, width) != (size, size):
            scale = size / min(height, width)
            new_size = (max(size, round(height * scale)), max(size, round(width * scale)))
            pixels = F.interpolate(pixels, size=new_size, mode=self.resample, antialias=True, align_corners=False)
            top, left = (new_size[0] - size) // 2, (new_size[1] - size) // 2
            pixels = pixels[:, :, top : top + size, left : left + size]
        return pixels.clamp(0, 1).contiguous()

    # ---- decoder output -> images -----------------------------------------------------------------------------------

    def postprocess(self, decoded: torch.Tensor, output_type: str = "pil"):
        """Decoder output `[B, 3, H, W]` in [-1, 1] -> `"pil"` (list of RGB images), `"np"` (float32 `[B, H, W, 3]`
        in [0, 1]) or `"pt"` (float32 `[B, 3, H, W]` in [0, 1])."""
        if output_type not in OUTPUT_TYPES:
            raise ValueError(f"output_type must be one of {OUTPUT_TYPES}, got {output_type!r}")
        if not isinstance(decoded, torch.Tensor) or decoded.ndim != 4 or decoded.shape[1] != 3:
            got = tuple(decoded.shape) if isinstance(decoded, torch.Tensor) else type(decoded).__name__
            raise ValueError(f"decoded images must be a [B, 3, H, W] tensor, got {got}")
        images = ((decoded.detach().float() + 1) / 2).clamp(0, 1).cpu()
        if output_type == "pt":
            return images
        images = images.permute(0, 2, 3, 1).numpy()
        if output_type == "np":
            return images
        return [PIL.Image.fromarray((image * 255).round().astype(np.uint8)) for image in images]


def register_image_processor(config_class) -> None:
    """`AutoImageProcessor` resolves `config_class` (`MergeVQConfig`; passed in so that this file imports no sibling
    and travels alone with the pipeline's remote code) and `"image_processor_type": "MergeVQImageProcessor"` to this
    class (idempotent)."""
    AutoImageProcessor.register(config_class, image_processor_classes={"pil": MergeVQImageProcessor}, exist_ok=True)


__all__ = ["MergeVQImageProcessor", "register_image_processor"]
