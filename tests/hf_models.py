"""Tiny random Hugging Face Llamas (torch) for parity tests, built from transformers configs in the test."""
from __future__ import annotations

import numpy as np

BASE = dict(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=4, max_position_embeddings=2048, rms_norm_eps=1e-5, rope_theta=10000.0,
            tie_word_embeddings=False, bos_token_id=1, eos_token_id=2, pad_token_id=0)

VARIANTS = {
    "mha": {},
    "gqa": dict(num_key_value_heads=2),
    "llama31_rope": dict(num_key_value_heads=2, rope_theta=500000.0,
                         rope_scaling=dict(rope_type="llama3", factor=8.0, low_freq_factor=1.0,
                                           high_freq_factor=4.0, original_max_position_embeddings=128)),
    "linear_rope": dict(rope_scaling=dict(rope_type="linear", factor=4.0)),
    "tied": dict(tie_word_embeddings=True),
    "attention_bias": dict(attention_bias=True, mlp_bias=True),
    "head_dim_32": dict(head_dim=32, num_key_value_heads=2),
}


def random_hf_llama(seed: int = 0, **overrides):
    """A random LlamaForCausalLM (fp32, eval mode) from BASE with ``overrides`` (any LlamaConfig field)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(**{"attn_implementation": "eager", "initializer_range": 0.05, **BASE, **overrides})
    model = LlamaForCausalLM(cfg).eval()
    with torch.no_grad():  # norms and biases away from their trivial init, so they matter
        for name, p in model.named_parameters():
            if "norm" in name or name.endswith("bias"):
                p.add_(0.1 * torch.randn_like(p))
    return model


def make_hf_llama(out_dir, seed: int = 0, **overrides):
    """Save a random LlamaForCausalLM (fp32, safetensors) to ``out_dir``; return the torch model (eval mode)."""
    model = random_hf_llama(seed, **overrides)
    model.save_pretrained(out_dir, safe_serialization=True)
    return model


def hf_logits(model, input_ids: np.ndarray, attention_mask: np.ndarray | None = None) -> np.ndarray:
    import torch

    with torch.no_grad():
        out = model(input_ids=torch.tensor(input_ids, dtype=torch.long),
                    attention_mask=None if attention_mask is None else torch.tensor(attention_mask))
    return out.logits.float().numpy()
