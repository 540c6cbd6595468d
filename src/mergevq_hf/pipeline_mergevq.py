"""MergeVQPipeline: class-conditional image generation (MergeAR or MergeRandAR) and tokenizer round trips (MergeVQ).

This file is copied verbatim to the root of a Hub export (see `mergevq_hf.hub.export_for_hub`), where it is loaded
with `trust_remote_code=True` and the package is not installed. It therefore imports only flat sibling modules
(`from .image_processing_mergevq import ...`), which the export and diffusers' remote-code loader copy along; the two
components are used through their public methods and configs only.
"""

import os
import warnings
from dataclasses import dataclass

import numpy as np
import torch
from diffusers import DiffusionPipeline, ImagePipelineOutput
from diffusers.callbacks import MultiPipelineCallbacks, PipelineCallback
from diffusers.utils import BaseOutput
from transformers import StoppingCriteria, StoppingCriteriaList

from .hub import push_pipeline, save_pipeline
from .image_processing_mergevq import MergeVQImageProcessor
from .sampling_utils import DEFAULT_GUIDANCE_SCALE, check_guidance_scale, check_guidance_schedule, check_sampling_arguments, is_integer

OUTPUT_TYPES = ("pil", "np", "pt")


@dataclass
class MergeVQReconstructionOutput(BaseOutput):
    """
    images: reconstructions (list of PIL images, `np.ndarray` [B, H, W, 3] or `torch.Tensor` [B, 3, H, W], in [0, 1]).
    indices: [B, K] codebook indices of the merged tokens.
    source_map: [B, L] for every grid position, the index in [0, K) of the merged token it belongs to (the name of
        `MergeVQModel.encode`'s field; `source_maps` is its deprecated alias).
    """

    images: list | np.ndarray | torch.Tensor
    indices: torch.LongTensor
    source_map: torch.LongTensor

    @property
    def source_maps(self) -> torch.LongTensor:
        warnings.warn("MergeVQReconstructionOutput.source_maps is now source_map.", FutureWarning, stacklevel=2)
        return self.source_map


class _AfterEachStep(StoppingCriteria):
    """Runs after each decoding step of either generator: advances the progress bar and calls the pipeline's step
    callback, whose replacement codes are written where the next step reads them.

    MergeAR's `generate` calls it as a stopping criterion (it never stops generation: the length does); the newest
    token of `input_ids` has no key/value entry yet, so replacing it in place changes what the next step sees.
    MergeRandAR's loop calls `after_step` through its `callback` and uses the codes it returns.
    """

    def __init__(self, bar, step_callback):
        self.bar, self.step_callback, self.step = bar, step_callback, 0

    def __call__(self, input_ids, scores=None, **kwargs):
        input_ids[:, -1] = self.after_step(input_ids[:, -1])
        return torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)

    def after_step(self, next_tokens):
        self.bar.update(1)
        if self.step_callback is not None:
            next_tokens = self.step_callback(self.step, next_tokens)
        self.step += 1
        return next_tokens


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
              (docs/design.md §3.4), so the tokenizer must have `use_source_recovery=True`.

    Example:
        >>> pipe = MergeVQPipeline.from_pretrained("path/or/hub-id")
        >>> generator = torch.Generator().manual_seed(0)
        >>> images = pipe(class_labels=[1, 7], num_images_per_class=4, generator=generator).images
        >>> rec = pipe.reconstruct(images, num_tokens=144)
    """

    model_cpu_offload_seq = "transformer->vq_model"
    # What `callback_on_step_end` may read (and replace) after each decoding step: the [N] codes just sampled.
    _callback_tensor_inputs = ["next_tokens"]
    # Images per call, checked before any work. Each image keeps its own KV cache (two with guidance); above this a
    # call should be split by the caller rather than risk an out-of-memory failure halfway.
    max_batch_size = 256

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
        self.image_processor = self._image_processor_for(vq_model)

    @staticmethod
    def _image_processor_for(vq_model) -> MergeVQImageProcessor:
        """The `preprocessor_config.json` saved next to the tokenizer's weights, else the default for its config."""
        folder = getattr(vq_model, "name_or_path", "")
        if folder and os.path.isfile(os.path.join(folder, "preprocessor_config.json")):
            processor = MergeVQImageProcessor.from_pretrained(folder)
            if processor.image_size != vq_model.config.image_size:
                raise ValueError(
                    f"{folder}/preprocessor_config.json has image_size={processor.image_size} but the tokenizer "
                    f"expects {vq_model.config.image_size}x{vq_model.config.image_size} images"
                )
            return processor
        return MergeVQImageProcessor.from_model_config(vq_model.config)

    @property
    def num_timesteps(self) -> int:
        """Decoding steps of the current (or last) call: L in raster mode, K in random mode. diffusers' step
        callbacks (`PipelineCallback` with `cutoff_step_ratio`) read it."""
        return self._num_timesteps

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
        guidance_scale: float | None = DEFAULT_GUIDANCE_SCALE,
        guidance_schedule: str = "constant",
        temperature: float = 1.0,
        top_k: int | None = None,
        top_p: float | None = None,
        generator: torch.Generator | list[torch.Generator] | None = None,
        output_type: str = "pil",
        return_dict: bool = True,
        callback_on_step_end=None,
        callback_on_step_end_tensor_inputs: list[str] | tuple[str, ...] = ("next_tokens",),
        token_budget: bool = False,
        sampling: str | None = None,
    ):
        r"""
        Generate `num_images_per_class` images for each class id in `class_labels` (grouped by class, in order).

        Args:
            class_labels: an int, a list of ints, or a 1-D integer tensor or numpy array of class ids in
                `[0, num_classes)` (numpy integers count as ints).
            num_images_per_class: images sampled per class id; the batch `len(class_labels) * num_images_per_class`
                may not exceed `max_batch_size` (256).
            num_tokens: K, the number of distinct merged tokens the generator is told to produce (the merge
                instruction); default `transformer.config.num_tokens`; must lie in `[1, L]`.
            guidance_scale: classifier-free guidance scale `s` (logits `u + s (c - u)`, one batched forward per step);
                None or 1.0 turns guidance off. The default, `sampling_utils.DEFAULT_GUIDANCE_SCALE`, is where the
                bundled model's samples are classified as their class nearly as often as real images; 2 gives its
                best FD (the Open-MAGVIT2 / LlamaGen sampling scripts use about 2).
            guidance_schedule: `"constant"`, or `"linear"` (as RandAR): the scale rises from 1 at the first generated
                token to `guidance_scale` at the last (raster mode: over the L grid positions; random mode: over the
                K tokens).
            temperature, top_k, top_p: sampling controls applied after guidance (`top_k=None` or 0 and
                `top_p=None` or 1.0 disable the filters). Both generators, with a factorised head, sample each code per
                sub-token (its low bits, then its high bits given them), and the filters act on each sub-token:
                `top_k=k` keeps the k most likely low values, then the k most likely high values given the drawn
                low value; `top_p` keeps the p-mass of each.
            generator: what seeds the sampling. Every image draws from its own `torch.Generator`, so an image does
                not depend on the others in its batch:
                - a list of `N` generators (one per image, N = the batch size): image i comes from `generator[i]`;
                  `pipe(7, generator=[g])` reproduces image i of a grid made with `generator=[..., g, ...]`.
                - one generator: image i's generator is seeded with the i-th number drawn from it, so with equally
                  seeded generators image i comes out the same (same class and settings) whatever the batch size.
                - None: as one generator, but the numbers come from torch's global RNG.
                The caller's global RNG state is left untouched when a generator is given.
            output_type: `"pil"` (list of PIL images), `"np"` (float32 `[N, H, W, 3]` in [0, 1]) or `"pt"`
                (float32 `[N, 3, H, W]` in [0, 1]).
            return_dict: return an `ImagePipelineOutput` (else a one-element tuple).
            callback_on_step_end: called after each decoding step as `callback_on_step_end(pipe, step, timestep,
                callback_kwargs)` (diffusers' convention; `timestep` is the step index too). `callback_kwargs` holds
                the tensors named in `callback_on_step_end_tensor_inputs`: `next_tokens`, the `[N]` codes just
                sampled. Return a dict (or None); a `next_tokens` in it replaces the sampled codes, which the next
                step then reads.
            callback_on_step_end_tensor_inputs: names from `_callback_tensor_inputs` to pass to the callback.
            token_budget: raster mode (MergeAR): make the merge instruction hold, i.e. once an image has produced K
                distinct codes it may only repeat them (its cache then holds at most 2 + K + W entries). Off by
                default: on the bundled model it lowers sample quality (benchmarks/RESULTS.md). Random mode always
                produces exactly K tokens.
            sampling: how each code is drawn, as in the transformer's `generate`: None (default) or `"sub_token"`
                draws a factorised head's low bits, then its high bits given them; `"joint"` draws whole codes from
                the exact joint distribution (slower at large codebooks; guidance and the filters then act on whole
                codes). A dense head always draws whole codes.

        A progress bar advances once per decoding step (L steps in raster mode, K in random mode); configure it
        with `set_progress_bar_config`.
        """
        # 1. Check inputs
        labels, num_tokens, guidance_scale = self.check_inputs(
            class_labels, num_images_per_class, num_tokens, guidance_scale, guidance_schedule, temperature, top_k,
            top_p, output_type, token_budget, sampling,
        )
        # 2. Prepare: one class id and one generator per image, the step callback
        batch_size = len(labels) * num_images_per_class
        generators = self._row_generators(generator, batch_size)
        step_callback = self._step_callback(callback_on_step_end, callback_on_step_end_tensor_inputs)
        device = self._execution_device
        labels = labels.repeat_interleave(num_images_per_class).to(device)
        random_order = self.generation_mode == "random"
        self._num_timesteps = num_tokens if random_order else self.transformer.config.num_patches

        # 3. Generate the codes, one decoding step per progress-bar tick
        shared = dict(  # what both generators take
            labels=labels, num_tokens=num_tokens, guidance_scale=guidance_scale, temperature=float(temperature),
            top_k=int(top_k or 0), top_p=None if top_p is None else float(top_p), generators=generators,
            sampling=sampling, guidance_schedule=guidance_schedule,
        )
        with self.progress_bar(total=self.num_timesteps) as bar:
            after_step = _AfterEachStep(bar, step_callback)
            if random_order:
                codes, positions = self._generate_random_order(**shared, after_step=after_step)
            else:
                codes = self._generate_raster(**shared, token_budget=token_budget, after_step=after_step)
        codes = codes.to(device)

        # 4. Decode: raster codes cover every grid position; random-order codes go through the source map predicted
        # from them and from the positions the generator chose
        source_map = self.vq_model.predict_source_map(codes, positions.to(device)) if random_order else None
        decoded = self.vq_model.decode(codes, source_map)

        # 5. Post-process
        images = self.image_processor.postprocess(decoded, output_type)
        self.maybe_free_model_hooks()
        return ImagePipelineOutput(images=images) if return_dict else (images,)

    def check_inputs(
        self, class_labels, num_images_per_class, num_tokens, guidance_scale, guidance_schedule, temperature, top_k,
        top_p, output_type, token_budget, sampling,
    ) -> tuple[torch.LongTensor, int, float | None]:
        """Raise a ValueError for any bad `__call__` argument (before any work); returns the class ids as a tensor,
        K and the guidance scale (None when guidance is off)."""
        labels = self._check_class_labels(class_labels)
        if not is_integer(num_images_per_class) or num_images_per_class < 1:
            raise ValueError(f"num_images_per_class must be a positive integer, got {num_images_per_class!r}")
        num_tokens = self._check_num_tokens(num_tokens, self.transformer.config.num_tokens)
        guidance_scale = check_guidance_scale(guidance_scale)
        check_sampling_arguments(temperature, top_k, top_p)
        if not isinstance(token_budget, bool):
            raise ValueError(f"token_budget must be True or False, got {token_budget!r}")
        self.transformer._resolve_sampling(sampling, do_sample=True)
        check_guidance_schedule(guidance_schedule)
        self._check_output_type(output_type)
        batch_size = len(labels) * num_images_per_class
        if batch_size > self.max_batch_size:
            raise ValueError(
                f"{len(labels)} class ids x {num_images_per_class} images per class = {batch_size} images, more than "
                f"max_batch_size = {self.max_batch_size} per call; split the call into smaller ones"
            )
        return labels, num_tokens, guidance_scale

    def _generate_raster(
        self, labels, num_tokens, guidance_scale, temperature, top_k, top_p, generators, sampling, guidance_schedule,
        token_budget, after_step,
    ) -> torch.LongTensor:
        """MergeAR: codes [N, L] for the grid positions in raster order, from transformers' `generate`, which runs
        `after_step` as a stopping criterion (one that never stops)."""
        sequences = self.transformer.generate(
            class_labels=labels, num_tokens=num_tokens, guidance_scale=guidance_scale,
            guidance_schedule=guidance_schedule, do_sample=True,
            temperature=temperature, top_k=top_k, top_p=1.0 if top_p is None else top_p, token_budget=token_budget,
            sampling=sampling, generators=generators, stopping_criteria=StoppingCriteriaList([after_step]),
        )
        return self.transformer.image_tokens_from_sequences(sequences)

    def _generate_random_order(
        self, labels, num_tokens, guidance_scale, temperature, top_k, top_p, generators, sampling, guidance_schedule,
        after_step,
    ) -> tuple[torch.LongTensor, torch.LongTensor]:
        """MergeRandAR: codes [N, K] of the merged tokens and their grid positions [N, K] (canonical order), generated
        in random order; its loop runs `after_step` after each token."""
        generated = self.transformer.generate(
            class_labels=labels, num_tokens=num_tokens, guidance_scale=guidance_scale,
            guidance_schedule=guidance_schedule, temperature=temperature, top_k=top_k, top_p=top_p,
            sampling=sampling, generator=generators, callback=lambda step, codes: after_step.after_step(codes),
        )
        return generated.image_tokens, generated.positions

    @staticmethod
    def _row_generators(generator, batch_size: int) -> list[torch.Generator]:
        """One generator per image (see `__call__`'s `generator`)."""
        if isinstance(generator, (list, tuple)):
            if len(generator) != batch_size or not all(isinstance(g, torch.Generator) for g in generator):
                kinds = sorted({type(g).__name__ for g in generator})
                raise ValueError(
                    f"a list of generators needs one torch.Generator per image: {batch_size} images, got "
                    f"{len(generator)} of {kinds}"
                )
            return list(generator)
        if generator is not None and not isinstance(generator, torch.Generator):
            raise ValueError(
                f"generator must be a torch.Generator, a list of them (one per image) or None, got "
                f"{type(generator).__name__}"
            )
        device = generator.device if generator is not None else torch.device("cpu")
        # One draw per image, in order: image i's seed does not depend on how many images follow it.
        seeds = [int(torch.randint(0, 2**62, (1,), generator=generator, device=device)) for _ in range(batch_size)]
        return [torch.Generator(device).manual_seed(seed) for seed in seeds]

    def _step_callback(self, callback, tensor_inputs):
        """`callback_on_step_end` as the function both decoding loops call: (step, next_tokens) -> codes to keep."""
        if isinstance(callback, (PipelineCallback, MultiPipelineCallbacks)):
            tensor_inputs = callback.tensor_inputs
        if callback is not None and not callable(callback):
            raise ValueError(f"callback_on_step_end must be callable, got {type(callback).__name__}")
        if isinstance(tensor_inputs, str) or not all(name in self._callback_tensor_inputs for name in tensor_inputs):
            raise ValueError(
                f"callback_on_step_end_tensor_inputs must be a list of names from {self._callback_tensor_inputs}, got "
                f"{tensor_inputs!r}"
            )
        if callback is None:
            return None
        codebook_size = self.transformer.config.codebook_size

        def run(step: int, next_tokens: torch.LongTensor) -> torch.LongTensor:
            named = {"next_tokens": next_tokens}
            returned = callback(self, step, step, {name: named[name] for name in tensor_inputs})
            if returned is None or "next_tokens" not in returned:
                return next_tokens
            replacement = returned["next_tokens"]
            if (
                not isinstance(replacement, torch.Tensor)
                or replacement.shape != next_tokens.shape
                or replacement.is_floating_point()
                or replacement.dtype == torch.bool
                or not ((replacement >= 0) & (replacement < codebook_size)).all()
            ):
                raise ValueError(
                    f"callback_on_step_end returned next_tokens that are not {list(next_tokens.shape)} integer "
                    f"codes in [0, {codebook_size}) at step {step}"
                )
            return replacement.to(next_tokens)

        return run

    # ---- reconstruction ------------------------------------------------------------------------------------------

    @torch.no_grad()
    def reconstruct(self, images, num_tokens: int | None = None, output_type: str = "pil", return_dict: bool = True):
        r"""
        Encode images to `num_tokens` merged tokens and decode them back.

        Args:
            images: a PIL image (any mode), a numpy array, a torch tensor in **[0, 1]** (what `output_type="pt"`
                returns), or a list of them; sizes may differ. `self.image_processor` (a `MergeVQImageProcessor`)
                prepares them: RGB with transparency over white, shorter side resized to the tokenizer's
                `image_size`, centre square, as in the rFID protocol. Strips longer than its `max_aspect_ratio`
                and inputs above its `max_input_pixels` raise a ValueError before any resizing.
            num_tokens: K merged tokens kept, in `[1, L]`; default `vq_model.config.num_tokens`.
            output_type: `"pil"`, `"np"` or `"pt"`, as in `__call__`.

        Returns:
            `MergeVQReconstructionOutput(images, indices, source_map)`, or that tuple when `return_dict=False`.
        """
        num_tokens = self._check_num_tokens(num_tokens, self.vq_model.config.num_tokens)
        self._check_output_type(output_type)
        pixel_values = self.image_processor(images).pixel_values
        pixel_values = pixel_values.to(device=self._execution_device, dtype=self.vq_model.dtype)
        encoded = self.vq_model.encode(pixel_values, num_tokens=num_tokens)
        decoded = self.vq_model.decode(encoded.indices, encoded.source_map)
        output = MergeVQReconstructionOutput(
            images=self.image_processor.postprocess(decoded, output_type), indices=encoded.indices,
            source_map=encoded.source_map,
        )
        self.maybe_free_model_hooks()
        return output if return_dict else output.to_tuple()

    # ---- shared checks and output conversion --------------------------------------------------------------------

    def _check_class_labels(self, class_labels) -> torch.LongTensor:
        num_classes = self.transformer.config.num_classes
        if is_integer(class_labels):
            class_labels = [class_labels]
        if isinstance(class_labels, torch.Tensor):
            if class_labels.is_floating_point() or class_labels.dtype == torch.bool or class_labels.ndim > 1:
                raise ValueError(
                    f"class_labels must be a 1-D integer tensor, got {class_labels.dtype} {tuple(class_labels.shape)}"
                )
            class_labels = class_labels.reshape(-1).tolist()
        if isinstance(class_labels, np.ndarray):
            if class_labels.dtype.kind not in "iu" or class_labels.ndim > 1:
                raise ValueError(
                    f"class_labels must be a 1-D integer array, got {class_labels.dtype} {class_labels.shape}"
                )
            class_labels = class_labels.reshape(-1).tolist()
        if not isinstance(class_labels, (list, tuple)) or not all(is_integer(label) for label in class_labels):
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
        if not is_integer(num_tokens) or not 1 <= num_tokens <= num_patches:
            raise ValueError(f"num_tokens must be an integer K with 1 <= K <= L = {num_patches}, got {num_tokens!r}")
        return int(num_tokens)

    @staticmethod
    def _check_output_type(output_type):
        if output_type not in OUTPUT_TYPES:
            raise ValueError(f"output_type must be one of {OUTPUT_TYPES}, got {output_type!r}")

    # ---- saving and Hub upload (the card and the upload live in hub.py) ------------------------------------------

    def save_pretrained(self, save_directory, push_to_hub: bool = False, **kwargs):
        """diffusers' save plus the image processor's `vq_model/preprocessor_config.json` and a generated `README.md`
        model card. With `push_to_hub=True` (and optionally `repo_id`, `token`, `private`, `commit_message`,
        `create_pr`) the repository is created before anything is written, then the folder is uploaded
        (`hub.save_pipeline`)."""
        return save_pipeline(self, save_directory, super().save_pretrained, push_to_hub, **kwargs)

    def push_to_hub(self, repo_id: str, commit_message=None, private=None, token=None, create_pr=False, **save_kwargs):
        """Save to a temporary folder (weights, configs, model card) and upload it to `repo_id` (`hub.push_pipeline`;
        diffusers' own would replace the card with a generic one)."""
        return push_pipeline(self, repo_id, commit_message, private, token, create_pr, **save_kwargs)
