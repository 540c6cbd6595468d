"""Exponential moving average (EMA) of a model's weights; the released recipe evaluates and exports EMA 0.999 weights.

After every optimiser step, :meth:`EMAModel.step` updates, for each floating-point parameter ``p`` that requires
grad, ``shadow = decay * shadow + (1 - decay) * p``. Frozen parameters and buffers (BatchNorm statistics, constant
tables) are copied, not averaged. ``decay`` is fixed unless ``warmup=True``, in which case step ``n`` (1-based) uses
``min(decay, (1 + n) / (10 + n))`` so that the average forgets the random init quickly in short runs.

Why not ``diffusers.training_utils.EMAModel``: it keeps an unnamed list of parameters only (buffers are not tracked,
state dicts are order-dependent, not checkable against a model), its non-warm-up mode still applies
``(1 + n) / (10 + n)`` so the fixed-decay recipe cannot be expressed, and importing it costs several seconds. This
class keys everything by parameter name, so its tensors can be written with safetensors and copied into any model with
the same names (e.g. a freshly built tokenizer before ``save_pretrained``).
"""

from __future__ import annotations

import contextlib
import os
from typing import Iterator

import torch
from torch import nn

from .sharding import full_tensor, is_sharded, shard_like

__all__ = ["EMAModel"]


class EMAModel:
    """EMA of ``model``'s parameters (averaged) and buffers (copied), keyed by ``named_parameters`` names.

    Typical use::

        ema = EMAModel(model, decay=0.999)
        for batch in loader:
            ...; optimizer.step(); ema.step(model)
        with ema.average_parameters(model):   # evaluate with EMA weights, then restore the live ones
            evaluate(model)
        ema.copy_to(model); model.save_pretrained(out)   # export the EMA weights
    """

    def __init__(self, model: nn.Module, decay: float = 0.999, warmup: bool = False, update_after_step: int = 0) -> None:
        if not isinstance(model, nn.Module):
            raise ValueError(f"EMAModel expects an nn.Module, got {type(model).__name__}")
        if not 0.0 <= decay <= 1.0:
            raise ValueError(f"decay must lie in [0, 1], got {decay}")
        self.decay = float(decay)
        self.warmup = bool(warmup)
        self.update_after_step = int(update_after_step)
        self.num_updates = 0
        self.shadow: dict[str, torch.Tensor] = {k: v.detach().clone() for k, v in self._named_tensors(model)}
        self._backup: dict[str, torch.Tensor] | None = None

    @staticmethod
    def _named_tensors(model: nn.Module) -> Iterator[tuple[str, torch.Tensor]]:
        yield from model.named_parameters()
        yield from model.named_buffers()

    def get_decay(self, step: int) -> float:
        """Decay used at the ``step``-th update (1-based); 0 (plain copy) while ``step <= update_after_step``."""
        step = step - self.update_after_step
        if step <= 0:
            return 0.0
        return min(self.decay, (1.0 + step) / (10.0 + step)) if self.warmup else self.decay

    def _matched(self, model: nn.Module) -> list[tuple[str, torch.Tensor]]:
        named = list(self._named_tensors(model))
        names = {k for k, _ in named}
        if names != self.shadow.keys():
            missing, extra = sorted(self.shadow.keys() - names), sorted(names - self.shadow.keys())
            raise ValueError(f"model does not match the EMA: EMA tensors missing from the model {missing[:5]}, model tensors unknown to the EMA {extra[:5]}")
        return named

    @torch.no_grad()
    def step(self, model: nn.Module) -> None:
        """Fold the model's current weights into the average (call after each optimiser step)."""
        self.num_updates += 1
        one_minus_decay = 1.0 - self.get_decay(self.num_updates)
        params = dict(model.named_parameters())
        for name, value in self._matched(model):
            shadow = self.shadow[name]
            p = params.get(name)
            if p is not None and p.requires_grad and shadow.is_floating_point():
                shadow.lerp_(value.detach().to(shadow.dtype), one_minus_decay)
            else:
                shadow.copy_(value.detach())

    @torch.no_grad()
    def copy_to(self, model: nn.Module) -> None:
        """Overwrite the model's parameters and buffers with the EMA values."""
        for name, value in self._matched(model):
            value.data.copy_(self.shadow[name])

    @contextlib.contextmanager
    def average_parameters(self, model: nn.Module):
        """Context manager: the model holds the EMA weights inside the block and its own weights again after it."""
        backup = {k: v.detach().clone() for k, v in self._matched(model)}
        self.copy_to(model)
        try:
            yield model
        finally:
            with torch.no_grad():
                for name, value in self._named_tensors(model):
                    value.data.copy_(backup[name])

    def to(self, device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> "EMAModel":
        """Move the shadow tensors (floating-point ones only get ``dtype``)."""
        self.shadow = {
            k: v.to(device=device, dtype=dtype if (dtype is not None and v.is_floating_point()) else None)
            for k, v in self.shadow.items()
        }
        return self

    def state_dict(self) -> dict:
        """Plain dict of tensors and numbers (loadable with ``torch.load(weights_only=True)``)."""
        return {
            "decay": self.decay,
            "warmup": self.warmup,
            "update_after_step": self.update_after_step,
            "num_updates": self.num_updates,
            "shadow": {k: v.clone() for k, v in self.shadow.items()},
        }

    def load_state_dict(self, state: dict) -> None:
        required = {"decay", "num_updates", "shadow"}
        if not isinstance(state, dict) or not required <= state.keys():
            raise ValueError(f"EMA state dict must have the keys {sorted(required)}, got {sorted(state) if isinstance(state, dict) else type(state).__name__}")
        shadow = state["shadow"]
        if shadow.keys() != self.shadow.keys():
            missing, extra = sorted(self.shadow.keys() - shadow.keys()), sorted(shadow.keys() - self.shadow.keys())
            raise ValueError(f"EMA state dict does not match this EMA: missing {missing[:5]}, unexpected {extra[:5]}")
        for k, v in shadow.items():
            if v.shape != self.shadow[k].shape:
                raise ValueError(f"EMA tensor {k!r}: shape {tuple(v.shape)} in the state dict, {tuple(self.shadow[k].shape)} here")
        self.decay = float(state["decay"])
        self.warmup = bool(state.get("warmup", self.warmup))
        self.update_after_step = int(state.get("update_after_step", self.update_after_step))
        self.num_updates = int(state["num_updates"])
        self.shadow = {k: shard_like(v.detach().clone(), self.shadow[k]).to(self.shadow[k].device) for k, v in shadow.items()}

    def shard_like(self, model: nn.Module) -> None:
        """Split every shadow tensor the way ``model``'s tensor of the same name is split (FSDP2 ``DTensor``
        parameters): each process then averages only its own shard, as it only updates its own shard."""
        named = dict(self._matched(model))
        self.shadow = {k: shard_like(v, named[k]) for k, v in self.shadow.items()}

    @contextlib.contextmanager
    def gathered(self):
        """Inside the block the shadow holds whole tensors (sharded ones are all-gathered: a collective, so every
        process must enter the block, e.g. to let one of them :meth:`save`)."""
        sharded = self.shadow
        self.shadow = {k: full_tensor(v) for k, v in sharded.items()}
        try:
            yield self
        finally:
            self.shadow = sharded

    def save(self, path: str | os.PathLike) -> None:
        """Write the shadow tensors with safetensors; the counters go into the file's metadata."""
        from safetensors.torch import save_file

        if any(is_sharded(v) for v in self.shadow.values()):
            raise ValueError("the EMA is sharded over processes (FSDP2): save it inside `with ema.gathered():`")
        meta = {"decay": repr(self.decay), "warmup": str(self.warmup), "update_after_step": str(self.update_after_step), "num_updates": str(self.num_updates)}
        save_file({k: v.contiguous() for k, v in self.shadow.items()}, str(path), metadata=meta)

    def load(self, path: str | os.PathLike) -> None:
        """Inverse of :meth:`save`."""
        from safetensors import safe_open

        if not os.path.isfile(path):
            raise OSError(f"EMA file not found: {path}")
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            shadow = {k: f.get_tensor(k) for k in f.keys()}
        try:
            state = {"decay": float(meta["decay"]), "warmup": meta.get("warmup") == "True", "update_after_step": int(meta.get("update_after_step", 0)),
                     "num_updates": int(meta["num_updates"]), "shadow": shadow}
        except KeyError as err:
            raise ValueError(f"{path} lacks EMA metadata {err}; was it written by EMAModel.save?") from None
        self.load_state_dict(state)
