"""Sample-and-gather for generation metrics, sharded over processes with 🤗 accelerate.

The N conditioning labels are cut into fixed batches; batch ``b`` goes to process ``b % world_size`` and is sampled
with its own generator seeded from ``(seed, b)``. The gathered result is therefore the same, in the same order,
whatever the number of processes (for the same seed, batch size and device type). Gathering images is heavy (50k
RGB images at 256 px are ~40 GB in float32), so pass ``transform`` to reduce each batch to features on its own
process and gather only those.

One process: call :func:`sample_and_gather` directly. Several: start the same script with ``accelerate launch`` or
``torchrun``; nothing else changes.
"""

from __future__ import annotations

import math
from typing import Any, Callable

import numpy as np
import torch

__all__ = ["batch_generator", "pipeline_sample_fn", "sample_and_gather"]

SampleFn = Callable[[torch.Tensor, torch.Generator], torch.Tensor]


def batch_generator(seed: int, batch_index: int) -> torch.Generator:
    """CPU generator for one batch; SeedSequence keeps the streams of different (seed, batch) pairs unrelated."""
    state = np.random.SeedSequence([seed, batch_index]).generate_state(1, dtype=np.uint64)[0]
    return torch.Generator().manual_seed(int(state))


def pipeline_sample_fn(pipeline: Any, **call_kwargs: Any) -> SampleFn:
    """A ``sample_fn`` for :class:`~mergevq_hf.pipeline_mergevq.MergeVQPipeline`: one image per label.

    ``call_kwargs`` go to every pipeline call (``num_tokens``, ``guidance_scale``, ``temperature``, ...). The
    pipeline's [0, 1] output is mapped to the [-1, 1] convention of the metrics.
    """
    reserved = {"class_labels", "generator", "output_type", "num_images_per_class", "return_dict"} & call_kwargs.keys()
    if reserved:
        raise ValueError(f"{sorted(reserved)} are set by the sampler; do not pass them")
    pipeline.set_progress_bar_config(disable=True)

    def sample(class_labels: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        output = pipeline(class_labels=class_labels, num_images_per_class=1, generator=generator, output_type="pt", **call_kwargs)
        return output.images * 2 - 1

    return sample


def _as_rows(output: Any, batch_len: int) -> dict[str, torch.Tensor]:
    output = {"images": output} if isinstance(output, torch.Tensor) else output
    if not isinstance(output, dict) or not output:
        raise ValueError(f"sample_fn/transform must return a tensor or a non-empty dict of tensors, got {type(output).__name__}")
    for key, value in output.items():
        if not isinstance(value, torch.Tensor) or value.ndim == 0 or value.shape[0] != batch_len:
            raise ValueError(f"output {key!r} must be a tensor with one row per label ({batch_len}), got {getattr(value, 'shape', type(value))}")
    return output


def sample_and_gather(
    sample_fn: SampleFn,
    class_labels: Any,
    batch_size: int = 50,
    seed: int = 0,
    transform: Callable[[torch.Tensor], torch.Tensor | dict[str, torch.Tensor]] | None = None,
    state: Any = None,
) -> dict[str, torch.Tensor]:
    """Sample one image per label on every process's share of the batches, then gather everything everywhere.

    Args:
        sample_fn: ``(class_labels [b] long, generator) -> images [b, C, H, W]`` (e.g. :func:`pipeline_sample_fn`).
        class_labels: the N conditioning labels (1-D ints), e.g. ``torch.arange(10).repeat_interleave(1000)``.
        batch_size: labels per ``sample_fn`` call.
        seed: base seed; batch ``b`` uses :func:`batch_generator` ``(seed, b)``.
        transform: maps a batch of images to a tensor or a dict of tensors with one row per image (e.g. features);
            by default the images themselves are gathered under ``"images"``.
        state: an ``accelerate`` ``Accelerator`` or ``PartialState``; default ``PartialState()`` (which reads the
            ``accelerate launch`` / ``torchrun`` environment, or is a single process).

    Returns, on every process, a dict with the gathered outputs (float/int tensors on the CPU, in label order) and
    ``"class_labels"``.
    """
    from accelerate import PartialState
    from accelerate.utils import gather

    labels = torch.as_tensor(class_labels)
    if labels.ndim != 1 or len(labels) == 0 or labels.is_floating_point() or labels.dtype == torch.bool:
        raise ValueError(f"class_labels must be a non-empty 1-D integer sequence, got {getattr(labels, 'shape', None)} {labels.dtype}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    labels = labels.long()
    state = PartialState() if state is None else state
    world, rank = state.num_processes, state.process_index
    num_batches = math.ceil(len(labels) / batch_size)
    if num_batches < world:
        raise ValueError(f"{num_batches} batches cannot feed {world} processes; lower batch_size to at most {len(labels) // world}")

    rows: dict[str, list[torch.Tensor]] = {}
    positions = []
    for b in range(rank, num_batches, world):
        batch_labels = labels[b * batch_size : (b + 1) * batch_size]
        with torch.no_grad():
            images = sample_fn(batch_labels, batch_generator(seed, b))
            output = _as_rows(transform(images) if transform is not None else images, len(batch_labels))
        for key, value in output.items():
            rows.setdefault(key, []).append(value.detach().cpu())
        positions.append(torch.arange(b * batch_size, b * batch_size + len(batch_labels)))

    # Every process pads to the same number of rows (gather needs equal shapes); padding rows get position -1.
    capacity = math.ceil(num_batches / world) * batch_size
    local_positions = torch.cat(positions)
    padded = {"__position__": torch.cat([local_positions, local_positions.new_full((capacity - len(local_positions),), -1)])}
    for key, chunks in rows.items():
        value = torch.cat(chunks)
        padded[key] = torch.cat([value, value.new_zeros((capacity - len(value), *value.shape[1:]))])
    gathered = {key: value.cpu() for key, value in gather({k: v.to(state.device) for k, v in padded.items()}).items()}

    keep = gathered.pop("__position__")
    order = keep[keep >= 0].argsort()
    result = {key: value[keep >= 0][order] for key, value in gathered.items()}
    result["class_labels"] = labels
    return result
