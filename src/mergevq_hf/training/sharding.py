"""Sharded training (PyTorch FSDP2, ``torch.distributed.fsdp.fully_shard``) for both training stages.

Both trainers take the Trainer's own FSDP switches (``--fsdp --fsdp_config '{"version": 2, ...}'``, or
``accelerate launch`` with ``distributed_type: FSDP`` and ``fsdp_version: 2``); :class:`ShardedTrainingMixin` adds
what our models and this machine need on top of accelerate's FSDP2 path:

* **CPU processes.** accelerate 1.15 takes the FSDP plugin only for GPU-like process groups: for a CPU run it
  picks ``DistributedType.MULTI_CPU`` and drops the plugin without a word (``AcceleratorState.__init__``), so the
  run would silently be DDP. FSDP2 itself runs on CPU over gloo, so the mixin switches the state to FSDP.
* **Wrap policy.** accelerate's ``TRANSFORMER_BASED_WRAP`` defaults to the model's ``_no_split_modules``: one FSDP
  unit per ``TransformerBlock`` and per ``ResBlock`` (tokenizer), per ``MergeARDecoderLayer`` (MergeAR). accelerate
  adds a unit for ``get_input_embeddings()`` (the tokenizer's first stem conv, MergeAR's image-code table) and one
  for MergeAR's final norm with its head; the rest sits in the root unit. The tokenizer's encoder runs a block as
  two calls (``attention``, token merging, ``feed_forward``), not through ``forward``, so those methods are
  registered with ``register_fsdp_forward_method`` to gather the block's weights around each of them.
* **Export.** With ``state_dict_type: SHARDED_STATE_DICT`` checkpoints are distributed checkpoints (DCP, one
  shard per process) and the Trainer's ``save_model`` writes no weights at all; :meth:`ShardedTrainingMixin.save_model`
  gathers a full state dict and writes a normal ``save_pretrained`` folder, loadable in one process.

The tokenizer trainer's other networks are deliberately *not* sharded (see :mod:`.trainer_tokenizer`): the
discriminator is replicated (accelerate's FSDP2 path prepares one model per run, and the discriminator is small),
and the frozen perceptual network is a constant held by every process. Its EMA is sharded like the model.

``Trainer.train`` also reports each run's largest per-process footprint (:func:`local_state_bytes`, peak RSS),
which ``benchmarks/bench_fsdp_memory.py`` tabulates.
"""

from __future__ import annotations

import os
import resource

import torch
from torch import nn

__all__ = [
    "FSDP_FORWARD_METHODS",
    "ShardedTrainingMixin",
    "full_tensor",
    "is_sharded",
    "local_state_bytes",
    "peak_rss_bytes",
    "save_unsharded",
    "shard_like",
]

# Modules whose weights are used through methods other than ``forward`` (class name -> method names).
FSDP_FORWARD_METHODS = {"TransformerBlock": ("attention", "feed_forward")}


def full_tensor(tensor: torch.Tensor) -> torch.Tensor:
    """The whole tensor: a sharded ``DTensor`` is all-gathered (a collective: call it on every process)."""
    from torch.distributed.tensor import DTensor

    return tensor.full_tensor() if isinstance(tensor, DTensor) else tensor


def is_sharded(tensor: torch.Tensor) -> bool:
    from torch.distributed.tensor import DTensor

    return isinstance(tensor, DTensor)


def shard_like(tensor: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """``tensor`` (whole, the same on every process) split the way ``like`` is; unchanged when ``like`` is not a
    ``DTensor``. Every process keeps its own slice, so nothing is communicated."""
    from torch.distributed.tensor import DTensor, distribute_tensor

    if not isinstance(like, DTensor):
        return tensor
    return distribute_tensor(tensor.to(like.device), like.device_mesh, like.placements, src_data_rank=None)


def _local(tensor: torch.Tensor) -> torch.Tensor:
    from torch.distributed.tensor import DTensor

    return tensor.to_local() if isinstance(tensor, DTensor) else tensor


def local_state_bytes(model: nn.Module, optimizer: torch.optim.Optimizer | None = None) -> dict[str, int]:
    """Bytes this process holds for ``model``'s parameters and ``optimizer``'s state (its shard under FSDP)."""
    params = sum(_local(p).numel() * p.element_size() for p in model.parameters())
    states = 0
    if optimizer is not None:
        for state in optimizer.state.values():
            states += sum(_local(v).numel() * v.element_size() for v in state.values() if isinstance(v, torch.Tensor))
    return {"parameter_bytes": int(params), "optimizer_state_bytes": int(states)}


def peak_rss_bytes() -> int:
    """Peak resident memory of this process (``ru_maxrss`` is in KiB on Linux)."""
    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024


def save_unsharded(model: nn.Module, state_dict: dict[str, torch.Tensor], output_dir: str | os.PathLike) -> None:
    """``save_pretrained`` of a ``fully_shard``-ed model's full ``state_dict`` as its original class.

    Saving the sharded model itself would record the FSDP wrapper class (``FSDPMergeARForCausalLM``) in the
    config's ``auto_map`` and copy torch's FSDP sources next to the weights, so the weights go into a copy of the
    original class built on the meta device (no memory, no initialisation).
    """
    from torch.distributed.fsdp import FSDPModule

    original_class = next(c for c in type(model).__mro__ if not issubclass(c, FSDPModule))
    with torch.device("meta"):
        unsharded = original_class(model.config)
    unsharded.load_state_dict(state_dict, assign=True)
    if getattr(model, "generation_config", None) is not None:
        unsharded.generation_config = model.generation_config
    unsharded.save_pretrained(output_dir)


class ShardedTrainingMixin:
    """Mix into a ``Trainer`` subclass (before ``Trainer``): FSDP2 on CPU processes, forward methods, export."""

    def create_accelerator_and_postprocess(self):
        super().create_accelerator_and_postprocess()
        self._enable_fsdp_on_cpu()

    def _enable_fsdp_on_cpu(self) -> None:
        from accelerate import PartialState
        from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin

        state = self.accelerator.state
        if state.distributed_type != DistributedType.MULTI_CPU:
            return
        if self.args.fsdp_plugin_args is not None:
            plugin = FullyShardedDataParallelPlugin(**self.args.fsdp_plugin_args)
        elif os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true":  # accelerate launch, FSDP config
            plugin = FullyShardedDataParallelPlugin()
        else:
            return
        if plugin.fsdp_version != 2:
            raise ValueError("FSDP on CPU processes needs FSDP2: set fsdp_version: 2 (accelerate) or fsdp_config version 2")
        # accelerate dropped the plugin because the processes are CPUs (see the module docstring); FSDP2 runs there.
        state.distributed_type = PartialState._shared_state["distributed_type"] = DistributedType.FSDP
        state.fsdp_plugin = plugin
        self.is_fsdp_enabled = True

    @property
    def is_fsdp2_sharded(self) -> bool:
        """True when the model is trained with FSDP2 (parameters are sharded ``DTensor``s once training starts)."""
        return bool(getattr(self, "is_fsdp_enabled", False)) and self.accelerator.is_fsdp2

    def _prepare_for_training(self, max_steps, train_dataloader, resume_from_checkpoint):
        model, train_dataloader = super()._prepare_for_training(max_steps, train_dataloader, resume_from_checkpoint)
        if self.is_fsdp2_sharded:
            from torch.distributed.fsdp import register_fsdp_forward_method

            for module in model.modules():
                # fully_shard renamed the unit's class (FSDPTransformerBlock): match the classes it derives from
                methods = {m for cls in type(module).__mro__ for m in FSDP_FORWARD_METHODS.get(cls.__name__, ())}
                for method in sorted(methods):
                    register_fsdp_forward_method(module, method)  # a no-op on modules that are not FSDP units
            self.on_model_sharded(model)
        return model, train_dataloader

    def train(self, *args, **kwargs):
        """``Trainer.train``; its metrics (``train_results.json``) also get the largest per-process footprint:
        ``process_parameter_bytes`` and ``process_optimizer_state_bytes`` (this process's shard of the model's
        parameters and of their optimizer state) and ``process_peak_rss_mb``."""
        result = super().train(*args, **kwargs)
        footprint = local_state_bytes(self.model, self.optimizer)
        values = torch.tensor([footprint["parameter_bytes"], footprint["optimizer_state_bytes"], peak_rss_bytes()], dtype=torch.float64)
        if self.accelerator.num_processes > 1:
            torch.distributed.all_reduce(values, op=torch.distributed.ReduceOp.MAX)
        params, states, rss = values.tolist()
        result.metrics.update(
            process_parameter_bytes=int(params), process_optimizer_state_bytes=int(states), process_peak_rss_mb=round(rss / 2**20, 1)
        )
        return result

    def on_model_sharded(self, model: nn.Module) -> None:
        """Hook: runs once the model's parameters are sharded (and a checkpoint, if any, is loaded)."""

    def save_model(self, output_dir: str | None = None, _internal_call: bool = False) -> None:
        """Under FSDP2 with sharded checkpoints, an export (not a checkpoint) gathers the full weights into a
        ``save_pretrained`` folder. Call it on every process (it is a collective)."""
        sharded_checkpoints = self.is_fsdp2_sharded and "SHARDED_STATE_DICT" in str(self.accelerator.state.fsdp_plugin.state_dict_type)
        if not sharded_checkpoints or getattr(self, "is_saving_checkpoint", False):
            return super().save_model(output_dir, _internal_call)
        state_dict = self.accelerator.get_state_dict(self.model)  # full tensors on the main process
        if self.args.should_save:
            output_dir = output_dir if output_dir is not None else self.args.output_dir
            save_unsharded(self.model, state_dict, output_dir)
            from transformers.trainer import TRAINING_ARGS_NAME

            torch.save(self.args, os.path.join(output_dir, TRAINING_ARGS_NAME))
        if self.args.push_to_hub and not _internal_call:  # as Trainer.save_model does
            self.push_to_hub(commit_message="Model save", revision=self.args.hub_revision)
