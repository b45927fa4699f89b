"""jax_controlllm: Control LLM continual training for Llama models in JAX, with knowledge-circuit analysis."""
__version__ = "0.1.0"
