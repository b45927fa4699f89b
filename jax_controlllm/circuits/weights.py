"""Per-head weights for the graph forward pass, built from Hugging Face-named tensors.

The circuit code needs each head's slice of q/k/v/o and each block's merge parameters, so it does not use
the model's (stacked, scanned) parameter tree: it goes through ``to_hf_tensors`` and rebuilds a per-block
structure. Attention weights are laid out per *query* head; with grouped-query attention each query head gets
its own copy of its group's key/value projection, so every head has private q, k and v inputs (the graph
gives each its own destination).

``CircuitModel`` = a static, hashable ``Structure`` (shapes, block kinds, merge methods; a jit static argument)
plus ``weights``, a pytree of arrays.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Mapping, Optional

import jax.numpy as jnp
import numpy as np

from jax_controlllm.circuits.graph import Graph
from jax_controlllm.config import ConfigError, ModelConfig

SUPPORTED_MERGES = ("lerp", "dlerp")


@dataclass(frozen=True)
class BlockSpec:
    kind: str                          # "llama" | "controlled"
    merge: Optional[str] = None        # controlled blocks: "lerp" | "dlerp"
    relaxed: tuple[bool, ...] = (False,)   # per branch: do its norms mix in the raw input (relaxed norm)?


@dataclass(frozen=True)
class Structure:
    """Everything static about the model the graph forward needs (hashable: used as a jit static arg)."""
    n_heads: int
    n_kv_heads: int
    head_dim: int
    hidden_size: int
    vocab_size: int
    eps: float
    inv_freq: tuple[float, ...]        # rotary inverse frequencies (scaling already applied)
    tied: bool
    blocks: tuple[BlockSpec, ...]

    @property
    def graph(self) -> Graph:
        return graph_for(self.n_heads, tuple(b.kind for b in self.blocks))


@functools.lru_cache(maxsize=32)
def graph_for(n_heads: int, block_kinds: tuple[str, ...]) -> Graph:
    """One shared Graph per shape, so its cached masks and orders are computed once."""
    return Graph(n_heads, block_kinds)


@dataclass
class CircuitModel:
    structure: Structure
    weights: dict

    @property
    def graph(self) -> Graph:
        return self.structure.graph


# ----------------------------------------------------------------------------------------------
# Rotary frequencies (Hugging Face conventions: default, linear and llama3 scaling)
# ----------------------------------------------------------------------------------------------

def rotary_inv_freq(config: ModelConfig) -> tuple[float, ...]:
    dim = config.head_dim
    inv = 1.0 / (config.rope_theta ** (np.arange(0, dim, 2, dtype=np.float64) / dim))
    scaling = config.rope_scaling or {}
    kind = scaling.get("rope_type", scaling.get("type", "default"))
    if kind == "linear":
        inv = inv / scaling["factor"]
    elif kind == "llama3":
        factor, low, high = scaling["factor"], scaling["low_freq_factor"], scaling["high_freq_factor"]
        context = scaling["original_max_position_embeddings"]
        wavelength = 2 * np.pi / inv
        # long wavelengths are slowed down by `factor`, short ones kept, the band between blended smoothly
        blend = np.clip((context / wavelength - low) / (high - low), 0.0, 1.0)
        inv = (1 - blend) * inv / factor + blend * inv
    elif kind != "default":
        raise ConfigError(f"model.rope_scaling: rope_type {kind!r} is not supported by the circuit code "
                          f"(supported: default, linear, llama3)")
    return tuple(float(x) for x in inv.astype(np.float32))


# ----------------------------------------------------------------------------------------------
# Tensors -> per-head weights
# ----------------------------------------------------------------------------------------------

def _get(tensors: Mapping, name: str) -> np.ndarray:
    if name not in tensors:
        raise ConfigError(f"tensor {name!r} is missing; the circuit code expects Hugging Face Llama names "
                          f"(model.layers.{{i}}.self_attn.q_proj.weight, ...)")
    return np.asarray(tensors[name], dtype=np.float32)


def _layer_weights(tensors: Mapping, prefix: str, config: ModelConfig, dtype) -> dict:
    """One decoder layer's weights with heads split out: wq/wk/wv [H, D, dh], wo [H, dh, D]."""
    h, kv, dh, d = config.num_attention_heads, config.num_key_value_heads, config.head_dim, config.hidden_size
    group = np.arange(h) // (h // kv)          # the key/value head each query head reads

    def heads(name, n):  # HF [n*dh, D] -> [n, D, dh]
        return _get(tensors, f"{prefix}.self_attn.{name}.weight").reshape(n, dh, d).transpose(0, 2, 1)

    out = {
        "ln1": _get(tensors, f"{prefix}.input_layernorm.weight"),
        "wq": heads("q_proj", h),
        "wk": heads("k_proj", kv)[group],
        "wv": heads("v_proj", kv)[group],
        "wo": _get(tensors, f"{prefix}.self_attn.o_proj.weight").reshape(d, h, dh).transpose(1, 2, 0),
        "ln2": _get(tensors, f"{prefix}.post_attention_layernorm.weight"),
        "gate": _get(tensors, f"{prefix}.mlp.gate_proj.weight").T,
        "up": _get(tensors, f"{prefix}.mlp.up_proj.weight").T,
        "down": _get(tensors, f"{prefix}.mlp.down_proj.weight").T,
    }
    return {k: jnp.asarray(v, dtype) for k, v in out.items()}


def _relaxed_mix(tensors: Mapping, prefix: str, config: ModelConfig) -> Optional[dict]:
    """The relaxed-norm mix a (``a x + (1 - a) RMSNorm(x)``) of an expanded layer's two norms, or None."""
    alpha = config.expansion.interpolation_norm_alpha
    if alpha == 0:
        return None
    mixes = {}
    for key, norm in (("mix1", "input_layernorm"), ("mix2", "post_attention_layernorm")):
        if alpha == -1:
            q = _get(tensors, f"{prefix}.{norm}.interpolation_factor").reshape(())
            mixes[key] = float(np.clip(2.0 / (1.0 + np.exp(-q)) - 1.0, 0.0, 1.0))
        else:
            mixes[key] = float(alpha)
    return {k: jnp.asarray(v, jnp.float32) for k, v in mixes.items()}


def _merge_weights(tensors: Mapping, prefix: str, method: str) -> dict:
    if method == "lerp":
        return {"factor": jnp.asarray(_get(tensors, f"{prefix}.interpolation_factor").reshape(()))}
    return {"fc_weight": jnp.asarray(_get(tensors, f"{prefix}.interp_weight.fc.weight").reshape(-1)),
            "fc_bias": jnp.asarray(_get(tensors, f"{prefix}.interp_weight.fc.bias").reshape(()))}


def _block_kinds(config: ModelConfig, tensors: Mapping) -> list[str]:
    if config.expansion is not None:
        from jax_controlllm.model.control import layer_plan
        return [b.kind for b in layer_plan(config)]
    kinds = ["controlled" if f"model.layers.{i}.pretrained_layer.input_layernorm.weight" in tensors else "llama"
             for i in range(config.num_hidden_layers)]
    if "controlled" in kinds:
        raise ConfigError("the tensors hold Control LLM controlled layers (model.layers.{i}.pretrained_layer.*) "
                          "but config.expansion is None; load the model with load_hf so the expansion "
                          "config (merge method) comes with it")
    return kinds


def _check_supported(config: ModelConfig) -> None:
    if config.attention_bias or config.mlp_bias:
        raise ConfigError("circuits: models with attention/MLP biases are not supported (an output bias is "
                          "not the contribution of any one head, so the residual stream would not be a sum "
                          "of node outputs); Llama checkpoints have no biases")
    if config.hidden_act != "silu":
        raise ConfigError(f"circuits: hidden_act {config.hidden_act!r} is not supported (only silu / SwiGLU)")


def circuit_model_from_hf_tensors(config: ModelConfig, tensors: Mapping, dtype: str = "float32") -> CircuitModel:
    """Build the graph model from ``{hf_name: array}`` (PyTorch [out, in] layout), e.g. a safetensors file."""
    _check_supported(config)
    dt = jnp.dtype(dtype)
    kinds = _block_kinds(config, tensors)
    merge = config.expansion.merge_method if config.expansion is not None else None
    if "controlled" in kinds and merge not in SUPPORTED_MERGES:
        raise ConfigError(
            f"circuits: merge_method {merge!r} is not supported; supported: {', '.join(SUPPORTED_MERGES)}. "
            f"Only these merges are linear in the branch outputs, so that the merged residual stream stays an "
            f"exact sum of node outputs; merge the expanded model back into a plain Llama to analyse it")
    blocks, specs = [], []
    for i, kind in enumerate(kinds):
        prefix = f"model.layers.{i}"
        if kind == "llama":
            blocks.append({"branches": [_layer_weights(tensors, prefix, config, dt)]})
            specs.append(BlockSpec("llama"))
            continue
        pretrained = _layer_weights(tensors, f"{prefix}.pretrained_layer", config, dt)
        expanded = _layer_weights(tensors, f"{prefix}.expanded_layer", config, dt)
        mix = _relaxed_mix(tensors, f"{prefix}.expanded_layer", config)
        if mix is not None:
            expanded.update(mix)
        blocks.append({"branches": [pretrained, expanded], "merge": _merge_weights(tensors, prefix, merge)})
        specs.append(BlockSpec("controlled", merge, (False, mix is not None)))
    embed = _get(tensors, "model.embed_tokens.weight")
    weights = {"embed": jnp.asarray(embed, dt), "norm": jnp.asarray(_get(tensors, "model.norm.weight"), dt),
               "blocks": blocks}
    if not config.tie_word_embeddings:
        weights["unembed"] = jnp.asarray(_get(tensors, "lm_head.weight"), dt)
    structure = Structure(config.num_attention_heads, config.num_key_value_heads, config.head_dim,
                          config.hidden_size, config.vocab_size, float(config.rms_norm_eps),
                          rotary_inv_freq(config), bool(config.tie_word_embeddings), tuple(specs))
    return CircuitModel(structure, weights)


def circuit_model(config: ModelConfig, params, dtype: str = "float32") -> CircuitModel:
    """Build the graph model from our parameter tree (via ``to_hf_tensors``), or pass through a CircuitModel."""
    if isinstance(params, CircuitModel):
        return params
    if isinstance(params, Mapping) and any(str(k).startswith("model.") for k in params):
        return circuit_model_from_hf_tensors(config, params, dtype)
    from jax_controlllm.convert import to_hf_tensors
    return circuit_model_from_hf_tensors(config, to_hf_tensors(config, params), dtype)


def random_circuit_model(config: ModelConfig, key, dtype: str = "bfloat16") -> CircuitModel:
    """A plain Llama with random weights built directly in the circuit layout, on the default device (for
    benchmarks: no host copy of a billion-parameter tree). Weights ~ N(0, 1/fan_in), norms 1."""
    import jax

    _check_supported(config)
    if config.expansion is not None:
        raise ConfigError("random_circuit_model builds plain Llamas only")
    dt = jnp.dtype(dtype)
    h, dh, d, f = config.num_attention_heads, config.head_dim, config.hidden_size, config.intermediate_size
    group = np.arange(h) // (h // config.num_key_value_heads)
    keys = iter(jax.random.split(key, 7 * config.num_hidden_layers + 2))

    def normal(shape, fan_in):
        return (jax.random.normal(next(keys), shape, jnp.float32) / np.sqrt(fan_in)).astype(dt)

    blocks = []
    for _ in range(config.num_hidden_layers):
        kv = config.num_key_value_heads
        blocks.append({"branches": [{
            "ln1": jnp.ones(d, dt), "ln2": jnp.ones(d, dt), "wq": normal((h, d, dh), d),
            "wk": normal((kv, d, dh), d)[group], "wv": normal((kv, d, dh), d)[group], "wo": normal((h, dh, d), h * dh),
            "gate": normal((d, f), d), "up": normal((d, f), d), "down": normal((f, d), f)}]})
    weights = {"embed": normal((config.vocab_size, d), 1), "norm": jnp.ones(d, dt), "blocks": blocks}
    if not config.tie_word_embeddings:
        weights["unembed"] = normal((config.vocab_size, d), d)
    structure = Structure(h, config.num_key_value_heads, dh, d, config.vocab_size, float(config.rms_norm_eps),
                          rotary_inv_freq(config), bool(config.tie_word_embeddings),
                          tuple(BlockSpec("llama") for _ in range(config.num_hidden_layers)))
    return CircuitModel(structure, weights)
