"""MergeVQPipeline: class-conditional image generation (MergeAR or MergeRandAR) and tokenizer round trips (MergeVQ).

This file is copied verbatim to the root of a Hub export (see `mergevq_hf.hub.export_for_hub`), where it is loaded
with `trust_remote_code=True` and the package is not installed. It therefore imports nothing from the package: the
two components are used through their public methods and configs only.
"""

import os
import tempfile
from contextlib import contextmanager
from dataclasses import dataclass
from numbers import Integral, Real

import numpy as np
import PIL.Image
import torch
import torch.nn.functional as F
from diffusers import DiffusionPipeline, ImagePipelineOutput
from diffusers.utils import BaseOutput
from huggingface_hub import ModelCard, ModelCardData, create_repo, upload_folder
from transformers import LogitsProcessor, LogitsProcessorList

OUTPUT_TYPES = ("pil", "np", "pt")
GUIDANCE_SCHEDULES = ("constant", "linear")

# Model-card metadata shared by every card this project writes (`mergevq_hf.hub` reuses it).
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


@dataclass
class MergeVQReconstructionOutput(BaseOutput):
    """
    images: reconstructions (list of PIL images, `np.ndarray` [B, H, W, 3] or `torch.Tensor` [B, 3, H, W], in [0, 1]).
    indices: [B, K] codebook indices of the merged tokens.
    source_maps: [B, L] for every grid position, the index in [0, K) of the merged token it belongs to.
    """

    images: list | np.ndarray | torch.Tensor
    indices: torch.LongTensor
    source_maps: torch.LongTensor


class _ProgressTicker(LogitsProcessor):
    """Advances a progress bar once per decoding step; leaves the scores untouched."""

    def __init__(self, bar):
        self.bar = bar

    def __call__(self, input_ids, scores):
        self.bar.update(1)
        return scores


def _is_int(value) -> bool:
    return isinstance(value, Integral) and not isinstance(value, bool)


class MergeVQPipeline(DiffusionPipeline):
    r"""
    Class-conditional generation with MergeAR or MergeRandAR + MergeVQ, and reconstruction through MergeVQ's merged
    tokens.

    Components:
        vq_model: `MergeVQModel`, the tokenizer; decodes the generated codes and runs `reconstruct`.
        transformer: the generator; its class sets `generation_mode`:
            - `MergeARForCausalLM` ("raster"): all `L` grid positions in raster order, each carrying its merged
              parent's code; decoded without a source map.
            - `MergeRandARForCausalLM` ("random"): the `K` merged tokens in random order with position
              instructions; the tokenizer's learned source recovery then predicts the merge map for decoding
              (method-spec §3.4), so the tokenizer must have `use_source_recovery=True`.

    Example:
        >>> pipe = MergeVQPipeline.from_pretrained("path/or/hub-id")
        >>> generator = torch.Generator().manual_seed(0)
        >>> images = pipe(class_labels=[1, 7], num_images_per_class=4, generator=generator).images
        >>> rec = pipe.reconstruct(images, num_tokens=144)
    """

    model_cpu_offload_seq = "transformer->vq_model"

    def __init__(self, vq_model, transformer):
        super().__init__()
        vq, ar = vq_model.config, transformer.config
        if (vq.codebook_bits, vq.grid_size) != (ar.codebook_bits, ar.grid_size):
            raise ValueError(
                f"vq_model and transformer do not match: the tokenizer has codebook_bits={vq.codebook_bits} and a "
                f"{vq.grid_size}x{vq.grid_size} grid, the transformer codebook_bits={ar.codebook_bits} and a "
                f"{ar.grid_size}x{ar.grid_size} grid"
            )
        if getattr(ar, "model_type", None) == "mergevq_randar" and not vq.use_source_recovery:
            raise ValueError(
                "random-order generation decodes through the tokenizer's learned source recovery, but this vq_model "
                "was built with use_source_recovery=False"
            )
        self.register_modules(vq_model=vq_model, transformer=transformer)

    @property
    def generation_mode(self) -> str:
        """`"random"` for a MergeRandAR transformer (K tokens in random order), `"raster"` for MergeAR (L tokens)."""
        return "random" if self.transformer.config.model_type == "mergevq_randar" else "raster"

    # ---- generation ----------------------------------------------------------------------------------------------

    @torch.no_grad()
    def __call__(
        self,
        class_labels,
        num_images_per_class: int = 1,
        num_tokens: int | None = None,
        guidance_scale: float | None = 2.0,
        guidance_schedule: str = "constant",
        temperature: float = 1.0,
        top_k: int | None = None,
        top_p: float | None = None,
        generator: torch.Generator | None = None,
        output_type: str = "pil",
        return_dict: bool = True,
    ):
        r"""
        Generate `num_images_per_class` images for each class id in `class_labels` (grouped by class, in order).

        Args:
            class_labels: an int, a list of ints or a 1-D integer tensor of class ids in `[0, num_classes)`.
            num_images_per_class: images sampled per class id.
            num_tokens: K, the number of distinct merged tokens the generator is told to produce (the merge
                instruction); default `transformer.config.default_num_tokens`; must lie in `[1, L]`.
            guidance_scale: classifier-free guidance scale `s` (logits `u + s (c - u)`, one batched forward per step);
                None or 1.0 turns guidance off. The Open-MAGVIT2 / LlamaGen sampling scripts use about 2.
            guidance_schedule: `"constant"`, or `"linear"` (random mode only, as RandAR): the scale rises from 1 at
                the first generated token to `guidance_scale` at the last.
            temperature, top_k, top_p: sampling controls applied after guidance (`top_k=None` or 0 and
                `top_p=None` or 1.0 disable the filters).
            generator: a `torch.Generator` that seeds the sampling (same seed, same images on the same device).
                `generate` has no generator argument, so the global RNG is seeded from it inside `fork_rng`: the
                caller's global RNG state is left untouched.
            output_type: `"pil"` (list of PIL images), `"np"` (float32 `[N, H, W, 3]` in [0, 1]) or `"pt"`
                (float32 `[N, 3, H, W]` in [0, 1]).
            return_dict: return an `ImagePipelineOutput` (else a one-element tuple).

        A progress bar advances once per decoding step (L steps in raster mode, K in random mode); configure it
        with `set_progress_bar_config`.
        """
        labels = self._check_class_labels(class_labels)
        if not _is_int(num_images_per_class) or num_images_per_class < 1:
            raise ValueError(f"num_images_per_class must be a positive integer, got {num_images_per_class!r}")
        num_tokens = self._check_num_tokens(num_tokens, self.transformer.config.default_num_tokens)
        cfg_scale = self._check_sampling(guidance_scale, temperature, top_k, top_p)
        if guidance_schedule not in GUIDANCE_SCHEDULES:
            raise ValueError(f"guidance_schedule must be one of {GUIDANCE_SCHEDULES}, got {guidance_schedule!r}")
        if guidance_schedule != "constant" and self.generation_mode != "random":
            raise ValueError("guidance_schedule='linear' needs a random-order (MergeRandAR) transformer")
        self._check_output_type(output_type)
        if generator is not None and not isinstance(generator, torch.Generator):
            raise ValueError(
                f"generator must be a single torch.Generator (all images are sampled as one batch), got "
                f"{type(generator).__name__}"
            )

        labels = labels.repeat_interleave(num_images_per_class).to(self.transformer.device)
        if self.generation_mode == "random":
            with self.progress_bar(total=num_tokens) as bar, self._seeded(generator):
                generated = self.transformer.generate(
                    class_labels=labels, num_tokens=num_tokens, cfg_scale=cfg_scale, cfg_schedule=guidance_schedule,
                    temperature=float(temperature), top_k=top_k or 0, top_p=None if top_p is None else float(top_p),
                    callback=lambda step: bar.update(1),
                )
            codes = generated.image_tokens.to(self.vq_model.device)
            images = self.vq_model.decode(codes, self.vq_model.predict_source_map(codes))
            images = self._postprocess(images, output_type)
            self.maybe_free_model_hooks()
            return ImagePipelineOutput(images=images) if return_dict else (images,)
        with self.progress_bar(total=self.transformer.config.num_image_tokens) as bar, self._seeded(generator):
            sequences = self.transformer.generate(
                class_labels=labels, num_tokens=num_tokens, cfg_scale=cfg_scale, do_sample=True,
                temperature=float(temperature), top_k=top_k or 0, top_p=1.0 if top_p is None else float(top_p),
                logits_processor=LogitsProcessorList([_ProgressTicker(bar)]),
            )
        codes = self.transformer.image_tokens_from_sequences(sequences).to(self.vq_model.device)
        images = self._postprocess(self.vq_model.decode(codes), output_type)  # raster codes: no source map needed
        self.maybe_free_model_hooks()
        return ImagePipelineOutput(images=images) if return_dict else (images,)

    @contextmanager
    def _seeded(self, generator):
        """Seed the global RNG from `generator` for the block and restore the caller's RNG state afterwards."""
        if generator is None:
            yield
            return
        seed = int(torch.randint(0, 2**62, (1,), generator=generator, device=generator.device))
        device = self.transformer.device
        accelerators = [device] if device.type != "cpu" else []
        with torch.random.fork_rng(devices=accelerators, device_type=device.type if accelerators else "cuda"):
            torch.manual_seed(seed)
            yield

    # ---- reconstruction ------------------------------------------------------------------------------------------

    @torch.no_grad()
    def reconstruct(self, images, num_tokens: int | None = None, output_type: str = "pil", return_dict: bool = True):
        r"""
        Encode images to `num_tokens` merged tokens and decode them back.

        Args:
            images: a PIL image, a numpy array, a torch tensor, or a list of them (sizes may differ).
                - PIL: any mode; converted to RGB (grayscale replicated, alpha dropped).
                - numpy: `[H, W]`, `[H, W, C]` or `[B, H, W, C]` with C in {1, 3, 4}; uint8 in [0, 255] or float
                  in [0, 1].
                - torch: `[C, H, W]` or `[B, C, H, W]` float in **[0, 1]** (what `output_type="pt"` returns), C in
                  {1, 3, 4}. For [-1, 1] tensors pass `(x + 1) / 2`.
                Any size: the shorter side is resized to `vq_model.config.image_size` (bilinear, antialiased),
                then the centre is cropped to a square, as in the rFID protocol.
            num_tokens: K merged tokens kept, in `[1, L]`; default `vq_model.config.num_tokens`.
            output_type: `"pil"`, `"np"` or `"pt"`, as in `__call__`.

        Returns:
            `MergeVQReconstructionOutput(images, indices, source_maps)`, or that tuple when `return_dict=False`.
        """
        pixels = self._preprocess(images)
        num_tokens = self._check_num_tokens(num_tokens, self.vq_model.config.num_tokens)
        self._check_output_type(output_type)
        pixel_values = (pixels * 2 - 1).to(device=self.vq_model.device, dtype=self.vq_model.dtype)
        encoded = self.vq_model.encode(pixel_values, num_tokens=num_tokens)
        decoded = self.vq_model.decode(encoded.indices, encoded.source_map)
        output = MergeVQReconstructionOutput(
            images=self._postprocess(decoded, output_type), indices=encoded.indices, source_maps=encoded.source_map
        )
        self.maybe_free_model_hooks()
        return output if return_dict else output.to_tuple()

    def _preprocess(self, images) -> torch.Tensor:
        """Any supported input -> float32 [B, 3, S, S] in [0, 1] at the tokenizer's image size."""
        if isinstance(images, (list, tuple)):
            if not images:
                raise ValueError("images is an empty list; pass at least one image")
            if not all(isinstance(image, (PIL.Image.Image, np.ndarray, torch.Tensor)) for image in images):
                kinds = sorted({type(image).__name__ for image in images})
                raise ValueError(f"a list of images must hold PIL images, numpy arrays or torch tensors, got {kinds}")
            return torch.cat([self._preprocess(image) for image in images])
        if isinstance(images, PIL.Image.Image):
            array = np.asarray(images.convert("RGB"))
            return self._fit(torch.from_numpy(array.copy()).permute(2, 0, 1)[None].float() / 255)
        if isinstance(images, np.ndarray):
            return self._fit(self._from_numpy(images))
        if isinstance(images, torch.Tensor):
            return self._fit(self._from_torch(images))
        raise ValueError(
            f"images must be a PIL image, a numpy array, a torch tensor or a list of them, got {type(images).__name__}"
        )

    @staticmethod
    def _from_numpy(array: np.ndarray) -> torch.Tensor:
        if array.ndim == 2:
            array = array[..., None]
        if array.ndim == 3:
            array = array[None]
        if array.ndim != 4 or array.shape[-1] not in (1, 3, 4):
            raise ValueError(
                f"numpy images must be [H, W], [H, W, C] or [B, H, W, C] with C in 1, 3, 4; got {array.shape}"
            )
        if array.dtype == np.uint8:
            array = array.astype(np.float32) / 255
        elif np.issubdtype(array.dtype, np.floating):
            if array.size and not (np.isfinite(array).all() and array.min() >= 0 and array.max() <= 1):
                raise ValueError("float numpy images must be finite and in [0, 1] (or pass uint8 in [0, 255])")
        else:
            raise ValueError(f"numpy images must be uint8 or float, got dtype {array.dtype}")
        return torch.from_numpy(np.ascontiguousarray(array, dtype=np.float32)).permute(0, 3, 1, 2)

    @staticmethod
    def _from_torch(tensor: torch.Tensor) -> torch.Tensor:
        if tensor.ndim == 3:
            tensor = tensor[None]
        if tensor.ndim != 4 or tensor.shape[1] not in (1, 3, 4):
            raise ValueError(
                f"torch images must be [C, H, W] or [B, C, H, W] with C in 1, 3, 4; got {tuple(tensor.shape)}"
            )
        if not tensor.is_floating_point():
            raise ValueError(f"torch images must be floating point in [0, 1], got dtype {tensor.dtype}")
        tensor = tensor.detach().float().cpu()
        if tensor.numel() and not (torch.isfinite(tensor).all() and tensor.min() >= 0 and tensor.max() <= 1):
            raise ValueError("torch images must be finite and in [0, 1]; for [-1, 1] tensors pass (x + 1) / 2")
        return tensor

    def _fit(self, pixels: torch.Tensor) -> torch.Tensor:
        """[B, C, H, W] in [0, 1] -> RGB, shorter side resized to image_size, centre-cropped to a square."""
        if pixels.shape[1] == 1:
            pixels = pixels.expand(-1, 3, -1, -1)
        pixels = pixels[:, :3]  # drop alpha
        size = self.vq_model.config.image_size
        height, width = pixels.shape[-2:]
        if min(height, width) == 0:
            raise ValueError(f"images must not be empty, got {height}x{width}")
        if (height, width) != (size, size):
            scale = size / min(height, width)
            new_size = (max(size, round(height * scale)), max(size, round(width * scale)))
            pixels = F.interpolate(pixels, size=new_size, mode="bilinear", antialias=True, align_corners=False)
            top, left = (new_size[0] - size) // 2, (new_size[1] - size) // 2
            pixels = pixels[:, :, top : top + size, left : left + size].clamp(0, 1)
        return pixels

    # ---- shared checks and output conversion --------------------------------------------------------------------

    def _check_class_labels(self, class_labels) -> torch.LongTensor:
        num_classes = self.transformer.config.num_classes
        if _is_int(class_labels):
            class_labels = [class_labels]
        if isinstance(class_labels, torch.Tensor):
            if class_labels.is_floating_point() or class_labels.dtype == torch.bool or class_labels.ndim > 1:
                raise ValueError(
                    f"class_labels must be a 1-D integer tensor, got {class_labels.dtype} {tuple(class_labels.shape)}"
                )
            class_labels = class_labels.reshape(-1).tolist()
        if not isinstance(class_labels, (list, tuple)) or not all(_is_int(label) for label in class_labels):
            raise ValueError(
                f"class_labels must be an int or a list of ints in [0, {num_classes}), got {class_labels!r}"
            )
        if not class_labels:
            raise ValueError("class_labels is empty; pass at least one class id")
        unknown = [int(label) for label in class_labels if not 0 <= label < num_classes]
        if unknown:
            raise ValueError(
                f"unknown class ids {unknown}: this transformer knows {num_classes} classes, [0, {num_classes})"
            )
        return torch.tensor([int(label) for label in class_labels], dtype=torch.long)

    def _check_num_tokens(self, num_tokens, default: int) -> int:
        num_patches = self.vq_model.config.num_patches
        num_tokens = default if num_tokens is None else num_tokens
        if not _is_int(num_tokens) or not 1 <= num_tokens <= num_patches:
            raise ValueError(f"num_tokens must be an integer K with 1 <= K <= L = {num_patches}, got {num_tokens!r}")
        return int(num_tokens)

    @staticmethod
    def _check_sampling(guidance_scale, temperature, top_k, top_p) -> float | None:
        def is_real(value):
            return isinstance(value, Real) and not isinstance(value, bool) and np.isfinite(value)

        if guidance_scale is not None and not (is_real(guidance_scale) and guidance_scale >= 0):
            raise ValueError(
                f"guidance_scale must be None or a number >= 0 (1.0 = no guidance), got {guidance_scale!r}"
            )
        if not (is_real(temperature) and temperature > 0):
            raise ValueError(f"temperature must be a number > 0, got {temperature!r}")
        if top_k is not None and not (_is_int(top_k) and top_k >= 0):
            raise ValueError(f"top_k must be None or an integer >= 0 (0 = off), got {top_k!r}")
        if top_p is not None and not (is_real(top_p) and 0 < top_p <= 1):
            raise ValueError(f"top_p must be None or a number in (0, 1] (1 = off), got {top_p!r}")
        return None if guidance_scale is None or guidance_scale == 1.0 else float(guidance_scale)

    @staticmethod
    def _check_output_type(output_type):
        if output_type not in OUTPUT_TYPES:
            raise ValueError(f"output_type must be one of {OUTPUT_TYPES}, got {output_type!r}")

    def _postprocess(self, decoded: torch.Tensor, output_type: str):
        """Decoder output in [-1, 1] -> [0, 1] float32 in the requested container."""
        images = ((decoded.float() + 1) / 2).clamp(0, 1).cpu()
        if output_type == "pt":
            return images
        images = images.permute(0, 2, 3, 1).numpy()
        return images if output_type == "np" else self.numpy_to_pil(images)

    # ---- saving, model card, Hub upload ---------------------------------------------------------------------------

    def model_card(self, model_id: str | None = None, remote_code: bool = False) -> ModelCard:
        """A model card for this pipeline: Hub metadata plus the sizes, usage and evaluation protocol.

        `remote_code=True` describes a folder written by `mergevq_hf.hub.export_for_hub` (loads without the package).
        """
        vq, ar = self.vq_model.config, self.transformer.config
        generator = (
            "MergeRandAR (K merged tokens in random order, decoded through the learned source recovery)"
            if self.generation_mode == "random"
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
  default K = {ar.default_num_tokens}.

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

    def save_pretrained(self, save_directory, push_to_hub: bool = False, **kwargs):
        """diffusers' save plus a generated `README.md` model card.

        With `push_to_hub=True` (and optionally `repo_id`, `token`, `private`, `commit_message`, `create_pr`) the
        repository is created *before* anything is written, so offline this raises the Hub's offline error early;
        then the folder is uploaded.
        """
        hub_names = ("repo_id", "token", "private", "commit_message", "create_pr")
        hub = {name: kwargs.pop(name) for name in hub_names if name in kwargs}
        repo_id = hub.get("repo_id")
        if push_to_hub:
            repo_id = repo_id or os.path.basename(os.path.normpath(str(save_directory)))
            repo_id = create_repo(repo_id, private=hub.get("private"), token=hub.get("token"), exist_ok=True).repo_id
        super().save_pretrained(save_directory, **kwargs)
        self.model_card(repo_id).save(os.path.join(save_directory, "README.md"))
        if push_to_hub:
            return upload_folder(
                repo_id=repo_id, folder_path=save_directory, token=hub.get("token"),
                commit_message=hub.get("commit_message") or "Upload MergeVQPipeline",
                create_pr=hub.get("create_pr", False),
            )

    def push_to_hub(self, repo_id: str, commit_message=None, private=None, token=None, create_pr=False, **save_kwargs):
        """Save to a temporary folder (weights, configs, model card) and upload it to `repo_id`."""
        with tempfile.TemporaryDirectory() as folder:
            return self.save_pretrained(
                folder, push_to_hub=True, repo_id=repo_id, commit_message=commit_message, private=private, token=token,
                create_pr=create_pr, **save_kwargs,
            )
