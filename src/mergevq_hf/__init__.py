"""mergevq_hf: the MergeVQ tokenizer and the MergeAR generator, native to Hugging Face transformers and diffusers.

Model modules are imported eagerly: diffusers resolves pipeline components from `sys.modules`.
"""

from .cache_mergear import MergeARCache
from .configuration_mergear import MergeARConfig
from .configuration_mergevq import MergeVQConfig
from .modeling_mergear import MergeARForCausalLM, register_mergear_auto_classes
from .configuration_randar import MergeRandARConfig
from .modeling_randar import MergeRandARForCausalLM, MergeRandARGenerationOutput, register_randar_auto_classes
from .modeling_mergevq import MergeVQEncoderOutput, MergeVQModel, MergeVQOutput, register_mergevq_auto_classes
from .image_processing_mergevq import MergeVQImageProcessor, register_image_processor
from .pipeline_mergevq import MergeVQPipeline, MergeVQReconstructionOutput
from .hub import export_for_hub

register_mergevq_auto_classes()
register_mergear_auto_classes()
register_randar_auto_classes()
register_image_processor(MergeVQConfig)

__version__ = "0.1.0"

__all__ = [
    "MergeARCache",
    "MergeARConfig",
    "MergeARForCausalLM",
    "MergeRandARConfig",
    "MergeRandARForCausalLM",
    "MergeRandARGenerationOutput",
    "MergeVQConfig",
    "MergeVQEncoderOutput",
    "MergeVQImageProcessor",
    "MergeVQModel",
    "MergeVQOutput",
    "MergeVQPipeline",
    "MergeVQReconstructionOutput",
    "export_for_hub",
]
