"""Checks against a model's config: field types and ranges (shared by the MergeVQ and MergeAR configs, whose
`validate_architecture` hooks call them) and attention outputs.

A value read from JSON or passed by hand must have the type its field declares: a string in a boolean field would
otherwise count as true, and a string or None in a numeric field would fail deep inside a layer. `huggingface_hub`'s
`@strict` would check the same annotations but raises an error that is neither a ValueError nor a TypeError and
refuses an int in a float field, which hand-written and older JSON configs use.
"""

import dataclasses
import types
import typing

from transformers import PreTrainedConfig


def _matches(value, annotation) -> bool:
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        return any(_matches(value, option) for option in typing.get_args(annotation))
    if annotation is type(None):
        return value is None
    if origin in (list, tuple):  # list[int], tuple[int, ...]: a list or tuple (JSON gives lists) of that type
        item = typing.get_args(annotation)[0]
        return isinstance(value, (list, tuple)) and all(_matches(entry, item) for entry in value)
    if annotation is bool:
        return isinstance(value, bool)
    if annotation is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if annotation is float:  # an int is a fine float (e.g. `"rope_theta": 10000` in JSON)
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    return isinstance(value, annotation)


def check_field_types(config) -> None:
    """Raise TypeError naming the first field declared by ``config``'s class (not the transformers base) whose value
    does not have the declared type."""
    base_fields = {field.name for field in dataclasses.fields(PreTrainedConfig)}
    for field in dataclasses.fields(config):
        if field.name in base_fields:
            continue
        value = getattr(config, field.name)
        if not _matches(value, field.type):
            expected = getattr(field.type, "__name__", str(field.type).replace("typing.", ""))
            raise TypeError(f"{type(config).__name__}.{field.name} must be {expected}, got {value!r}")


def check_field_ranges(
    config, positive_ints=(), positive=(), non_negative=(), probabilities=()
) -> None:
    """Raise ValueError naming the first listed field of ``config`` out of its range: ``positive_ints`` >= 1,
    ``positive`` > 0, ``non_negative`` >= 0, ``probabilities`` in [0, 1). Types are ``check_field_types``'s job."""
    rules = (
        (positive_ints, lambda v: v >= 1, "a positive integer"),
        (positive, lambda v: v > 0, "> 0"),
        (non_negative, lambda v: v >= 0, ">= 0"),
        (probabilities, lambda v: 0 <= v < 1, "in [0, 1)"),
    )
    for names, holds, expected in rules:
        for name in names:
            value = getattr(config, name)
            if not holds(value):
                raise ValueError(f"{type(config).__name__}.{name} must be {expected}, got {value!r}")


def check_attention_outputs(config, output_attentions: bool | None) -> None:
    """Refuse ``output_attentions`` unless the attention is eager: SDPA never forms the weights."""
    output_attentions = config.output_attentions if output_attentions is None else output_attentions
    if output_attentions and config._attn_implementation != "eager":
        raise ValueError(
            f"output_attentions=True needs eager attention, but this model runs {config._attn_implementation!r}: "
            "load it with attn_implementation='eager' or call model.set_attn_implementation('eager')."
        )
