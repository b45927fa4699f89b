"""LoRA: low-rank adapters on the projections of a frozen plain Llama (Hu et al. 2021; PEFT's conventions).

    y = x W + (alpha / r) dropout(x) A B        A [in, r] ~ U(-1/sqrt(in), 1/sqrt(in)),  B [r, out] = 0 at the start

An adapter lives beside the kernel it adapts (``.../q_proj/{kernel, lora_a, lora_b}``, declared with the other
weights in params.py) and the model's one projection path adds its update (``layers.project``), so a LoRA model
has no forward of its own. Merging folds the adapters into the kernels, W' = W + (alpha / r) A B, which gives
back a plain Llama (and, transposed, Hugging Face's weight[out, in] += (alpha / r) B_peft A_peft).
"""
from __future__ import annotations

import dataclasses
from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np

from jax_controlllm.config import LORA_TARGETS, ConfigError, LoraConfig, ModelConfig
from jax_controlllm.model.params import init_leaves, param_specs

__all__ = ["LoraConfig", "ADAPTER_LEAVES", "lora_update", "lora_config", "add_lora", "merge_lora"]

ADAPTER_LEAVES = ("lora_a", "lora_b")


def lora_update(x: jax.Array, p: dict, name: str, lora: LoraConfig, rng: Optional[jax.Array]) -> jax.Array:
    """(alpha / r) dropout(x) A B for projection ``name`` with weights ``p``, in x's dtype. Dropout (inverted,
    as torch's) applies only when ``rng`` is given, i.e. in training steps; each projection draws its own mask."""
    if rng is not None and lora.dropout > 0:
        keep = jax.random.bernoulli(jax.random.fold_in(rng, LORA_TARGETS.index(name)), 1 - lora.dropout, x.shape)
        x = jnp.where(keep, x / (1 - lora.dropout), 0).astype(x.dtype)
    down = jnp.einsum("...i,ir->...r", x, p["lora_a"].astype(x.dtype)) * lora.scale
    return jnp.einsum("...r,ro->...o", down, p["lora_b"].astype(x.dtype))


def _adapter_specs(specs: dict) -> dict:
    """The subtree of ``specs`` that holds adapter leaves only."""
    out = {}
    for key, value in specs.items():
        if isinstance(value, dict):
            sub = _adapter_specs(value)
            if sub:
                out[key] = sub
        elif key in ADAPTER_LEAVES:
            out[key] = value
    return out


def _graft(params: dict, adapters: dict) -> dict:
    return {**params, **{k: _graft(params[k], v) if k in params else v for k, v in adapters.items()}}


def lora_config(config: ModelConfig, lora: LoraConfig) -> ModelConfig:
    """``config`` with adapters (validated): the model a LoRA run trains."""
    if config.lora is not None:
        raise ConfigError("lora: this model already has LoRA adapters; merge them first (merge_lora)")
    new = dataclasses.replace(config, lora=lora)
    new.validate()
    return new


def add_lora(config: ModelConfig, params: dict, lora: LoraConfig, rng) -> tuple[ModelConfig, dict]:
    """Fresh adapters on a plain model: A random (from ``rng``), B zero, so the logits are the base's exactly."""
    new = lora_config(config, lora)
    adapters = init_leaves(_adapter_specs(param_specs(new)), rng, new)
    return new, _graft(params, adapters)


def merge_lora(config: ModelConfig, params: dict) -> tuple[ModelConfig, dict]:
    """(plain config, params with every adapter folded into its kernel). Works on host (numpy) or device arrays.
    The merged kernels are float32 whatever the frozen dtype: rounding W + (alpha / r) A B back to a bfloat16 base
    would move the logits by about 1e-2; an export's ``dtype`` or a load's cast rounds them where the user asks.
    A model without adapters passes through."""
    if config.lora is None:
        return config, params
    scale = config.lora.scale

    def fold(tree: dict) -> dict:
        if "lora_a" not in tree:
            return {k: fold(v) if isinstance(v, dict) else v for k, v in tree.items()}
        xp = np if isinstance(tree["kernel"], np.ndarray) else jnp
        a, b = (xp.asarray(tree[k]).astype(np.float32) for k in ADAPTER_LEAVES)
        merged = xp.asarray(tree["kernel"]).astype(np.float32) + scale * xp.einsum("...ir,...ro->...io", a, b)
        return {**{k: v for k, v in tree.items() if k not in ADAPTER_LEAVES}, "kernel": merged}

    return dataclasses.replace(config, lora=None), fold(params)

