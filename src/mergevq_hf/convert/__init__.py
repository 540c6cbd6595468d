"""Conversion of official MergeVQ checkpoints to `MergeVQModel` folders (`python -m mergevq_hf.convert --help`)."""

from .official import (
    config_from_official_yaml,
    convert_official_checkpoint,
    convert_state_dict,
    load_official_checkpoint,
    main,
    official_config,
    official_name,
    official_state_dict_shapes,
)

__all__ = [
    "config_from_official_yaml",
    "convert_official_checkpoint",
    "convert_state_dict",
    "load_official_checkpoint",
    "main",
    "official_config",
    "official_name",
    "official_state_dict_shapes",
]
