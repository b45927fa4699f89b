"""Conversion between our parameter trees and Hugging Face / GGUF checkpoints (exports with their tokenizer:
``jax_controlllm.convert.export``)."""
from jax_controlllm.convert.hf import ConversionError, from_hf_tensors, load_hf, save_hf, to_hf_tensors

__all__ = ["load_hf", "save_hf", "to_hf_tensors", "from_hf_tensors", "ConversionError"]
