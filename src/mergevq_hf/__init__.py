"""mergevq_hf: MergeVQ tokenizer and MergeAR generator for Hugging Face transformers/diffusers."""

__version__ = "0.1.0"
