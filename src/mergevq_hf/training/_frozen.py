"""Keep frozen helper networks (perceptual backbone, alignment teacher) out of checkpoints.

A frozen network often ends up as a submodule of something that gets saved (a loss module held by a model wrapper,
a trainer object). :func:`exclude_from_state_dict` registers two hooks on the owning module so that

* ``owner.state_dict()`` (and the state dict of anything containing ``owner``) omits ``<child_name>.*``, and
* ``load_state_dict(..., strict=True)`` accepts a state dict without those entries: before loading, the hook fills
  them in with the child's current tensors, so the frozen weights are left as they are.
"""

from __future__ import annotations

from torch import nn

__all__ = ["exclude_from_state_dict"]


def exclude_from_state_dict(owner: nn.Module, child_name: str) -> None:
    """Drop ``owner.<child_name>.*`` from state dicts; tolerate (and ignore) their absence when loading."""

    def drop_on_save(module, state_dict, prefix, local_metadata):
        start = f"{prefix}{child_name}."
        for key in [k for k in state_dict if k.startswith(start)]:
            del state_dict[key]

    def keep_on_load(module, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs):
        child = getattr(module, child_name, None)
        if child is None:
            return
        for key, value in child.state_dict().items():
            state_dict.setdefault(f"{prefix}{child_name}.{key}", value)

    owner.register_state_dict_post_hook(drop_on_save)
    owner.register_load_state_dict_pre_hook(keep_on_load)
