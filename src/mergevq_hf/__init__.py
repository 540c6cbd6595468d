"""mergevq_hf: the MergeVQ tokenizer and the MergeAR generator, native to Hugging Face transformers and diffusers.

Model modules are imported eagerly: diffusers resolves pipeline components from `sys.modules`.
"""

from .configuration_mergevq import MergeVQConfig
from .modeling_mergevq import MergeVQEncoderOutput, MergeVQModel, MergeVQOutput, register_mergevq_auto_classes

register_mergevq_auto_classes()

__version__ = "0.1.0"

__all__ = ["MergeVQConfig", "MergeVQModel", "MergeVQEncoderOutput", "MergeVQOutput"]
