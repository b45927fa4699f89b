"""Parameter declarations: every weight once, with shape, logical axes and initialiser.

Shapes, random init, abstract (ShapeDtypeStruct) trees and shardings are all derived from ``param_specs``.
Linear weights are stored as ``kernel[in, out]`` (the transpose of PyTorch's ``weight[out, in]``), norms as
``weight[H]``; the tree's path names follow Hugging Face's so conversion is a rename plus a transpose.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np

from jax_controlllm.config import ModelConfig
from jax_controlllm.model.layout import Block, block_groups
from jax_controlllm.sharding import DEFAULT_RULES, named_sharding


@dataclass(frozen=True)
class ParamSpec:
    shape: tuple[int, ...]
    logical_axes: tuple[Optional[str], ...]
    init: str            # "normal" (std 0.02), "zeros", "ones", "fan_in" (uniform ±1/sqrt(fan_in)), "eye_noise"
    trainable: bool
    dtype: str

    def stacked(self, repeats: int) -> "ParamSpec":
        return ParamSpec((repeats, *self.shape), ("layers", *self.logical_axes), self.init, self.trainable, self.dtype)


def is_spec(x) -> bool:
    """A ParamSpec leaf (for tree maps over spec trees)."""
    return isinstance(x, ParamSpec)


def _dense(config, din, dout, in_axis, out_axis, trainable, bias=False, init="normal", dtype=None):
    dtype = dtype or (config.param_dtype if trainable else config.frozen_dtype)
    out = {"kernel": ParamSpec((din, dout), (in_axis, out_axis), init, trainable, dtype)}
    if bias:
        out["bias"] = ParamSpec((dout,), (out_axis,), "zeros", trainable, dtype)
    return out


def _norm(config, trainable, relaxed=False):
    dtype = config.param_dtype if trainable else config.frozen_dtype
    out = {"weight": ParamSpec((config.hidden_size,), ("norm",), "ones", trainable, dtype)}
    if relaxed:  # learnable relaxed-norm mix (interpolation_norm_alpha = -1), always trainable
        out["interpolation_factor"] = ParamSpec((1,), (None,), "zeros", True, config.param_dtype)
    return out


def _projection(config, name, din, dout, in_axis, out_axis, trainable, bias) -> dict:
    """A linear projection, plus its LoRA adapter when ``config.lora`` targets it: ``lora_a [in, r]``
    initialised like PEFT's A (kaiming-uniform with a = sqrt(5), i.e. uniform ±1/sqrt(in)) and ``lora_b [r, out]``
    zero, so the adapted model starts exactly at the base. The adapters are the only trainable leaves of a LoRA
    model; their update to the kernel is (alpha / r) lora_a @ lora_b (model/lora.py)."""
    out = _dense(config, din, dout, in_axis, out_axis, trainable, bias)
    lora = config.lora
    if lora is not None and name in lora.targets:
        out["lora_a"] = ParamSpec((din, lora.rank), (in_axis, "lora_rank"), "fan_in", True, config.param_dtype)
        out["lora_b"] = ParamSpec((lora.rank, dout), ("lora_rank", out_axis), "zeros", True, config.param_dtype)
    return out


def decoder_layer_specs(config: ModelConfig, trainable: bool, relaxed_norm: bool = False) -> dict:
    c, t = config, trainable
    d, hq, hkv, m = c.hidden_size, c.num_attention_heads * c.head_dim, c.num_key_value_heads * c.head_dim, \
        c.intermediate_size
    return {
        "input_layernorm": _norm(c, t, relaxed_norm),
        "self_attn": {
            "q_proj": _projection(c, "q_proj", d, hq, "embed", "heads", t, c.attention_bias),
            "k_proj": _projection(c, "k_proj", d, hkv, "embed", "kv_heads", t, c.attention_bias),
            "v_proj": _projection(c, "v_proj", d, hkv, "embed", "kv_heads", t, c.attention_bias),
            "o_proj": _projection(c, "o_proj", hq, d, "heads", "embed", t, c.attention_bias),
        },
        "post_attention_layernorm": _norm(c, t, relaxed_norm),
        "mlp": {
            "gate_proj": _projection(c, "gate_proj", d, m, "embed", "mlp", t, c.mlp_bias),
            "up_proj": _projection(c, "up_proj", d, m, "embed", "mlp", t, c.mlp_bias),
            "down_proj": _projection(c, "down_proj", m, d, "mlp", "embed", t, c.mlp_bias),
        },
    }


def merge_specs(config: ModelConfig) -> dict:
    """Merge-module parameters of a controlled layer (spec §3), trainability per freeze_interpolation_factor."""
    exp, d, dt = config.expansion, config.hidden_size, config.param_dtype
    frozen_factor = exp.freeze_interpolation_factor
    factor = ParamSpec((1,), (None,), "factor", not frozen_factor, dt)
    method = exp.merge_method
    if method in ("lerp", "slerp"):
        return {"interpolation_factor": factor}
    if method in ("dlerp", "dlerpin"):
        fan_in = 2 * d if method == "dlerp" else d
        return {"interp_weight": {"fc": {
            "kernel": ParamSpec((fan_in, 1), ("embed", None), "fan_in", True, dt),
            "bias": ParamSpec((1,), (None,), "factor", not frozen_factor, dt)}}}
    if method == "moe":
        return {"gating": {"gate_network_0": {
            "kernel": ParamSpec((d, 2), ("embed", None), "fan_in", True, dt),
            "bias": ParamSpec((2,), (None,), "moe_bias", True, dt)}}}
    name = "linear_proj" if method == "proj" else "lateral_connection"
    return {"interpolation_factor": factor,
            name: {"kernel": ParamSpec((d, d), (None, "embed"), "eye_noise", True, dt)}}


def block_specs(config: ModelConfig, block: Block) -> dict:
    if block.kind == "llama":
        return decoder_layer_specs(config, block.trainable)
    relaxed = config.expansion.interpolation_norm_alpha == -1
    return {"pretrained_layer": decoder_layer_specs(config, False),
            "expanded_layer": decoder_layer_specs(config, True, relaxed_norm=relaxed),
            **merge_specs(config)}


def group_key(i: int) -> str:
    return f"group_{i}"


def block_key(j: int) -> str:
    return f"block_{j}"


def param_specs(config: ModelConfig) -> dict:
    """The whole parameter tree as ParamSpecs. Layers: layers/group_i/block_j with a leading repeat axis."""
    c = config
    train_outer = c.train_embeddings
    outer_dt = c.param_dtype if train_outer else c.frozen_dtype
    specs = {"embed_tokens": {"embedding": ParamSpec((c.vocab_size, c.hidden_size), ("vocab", "embed"),
                                                     "normal", train_outer, outer_dt)},
             "layers": {}}
    for i, group in enumerate(block_groups(c)):
        specs["layers"][group_key(i)] = {
            block_key(j): jax.tree.map(lambda s: s.stacked(group.repeats), block_specs(c, b), is_leaf=is_spec)
            for j, b in enumerate(group.pattern)}
    specs["norm"] = {"weight": ParamSpec((c.hidden_size,), ("norm",), "ones", train_outer, outer_dt)}
    if not c.tie_word_embeddings:
        specs["lm_head"] = {"kernel": ParamSpec((c.hidden_size, c.vocab_size), ("embed", "vocab"), "normal",
                                                train_outer, outer_dt)}
    return specs


def init_leaf(spec: ParamSpec, key, config: ModelConfig) -> jax.Array:
    """A freshly initialised array for ``spec``."""
    dtype = jnp.dtype(spec.dtype)
    shape = spec.shape
    if spec.init == "zeros":
        return jnp.zeros(shape, dtype)
    if spec.init == "ones":
        return jnp.ones(shape, dtype)
    if spec.init == "factor":
        return jnp.full(shape, config.expansion.interpolation_factor, dtype)
    if spec.init == "moe_bias":  # c = [0, interpolation_factor] (pretrained, expanded)
        base = jnp.array([0.0, config.expansion.interpolation_factor], dtype)
        return jnp.broadcast_to(base, shape)
    if spec.init == "fan_in":  # like a PyTorch nn.Linear weight: uniform(-1/sqrt(fan_in), 1/sqrt(fan_in))
        bound = 1.0 / np.sqrt(shape[-2])
        return jax.random.uniform(key, shape, dtype, -bound, bound)
    if spec.init == "eye_noise":  # I + 0.01 N(0, 1)
        eye = jnp.broadcast_to(jnp.eye(shape[-1], dtype=dtype), shape)
        return eye + 0.01 * jax.random.normal(key, shape, dtype)
    return 0.02 * jax.random.normal(key, shape, dtype)


def init_leaves(specs: dict, rng, config: ModelConfig) -> dict:
    """Initial values of a tree of ParamSpecs (the whole model or a part of it), deterministic from ``rng``."""
    leaves, treedef = jax.tree.flatten(specs, is_leaf=is_spec)
    keys = jax.random.split(rng, max(len(leaves), 1))
    return jax.tree.unflatten(treedef, [init_leaf(s, k, config) for s, k in zip(leaves, keys)])


@functools.partial(jax.jit, static_argnums=0)
def init_params(config: ModelConfig, rng) -> dict:
    """Random parameters (std 0.02 normal for weights), deterministic from ``rng``."""
    return init_leaves(param_specs(config), rng, config)


def abstract_params(config: ModelConfig) -> dict:
    return jax.tree.map(lambda s: jax.ShapeDtypeStruct(s.shape, jnp.dtype(s.dtype)), param_specs(config),
                        is_leaf=is_spec)


def logical_axes(config: ModelConfig) -> dict:
    return jax.tree.map(lambda s: s.logical_axes, param_specs(config), is_leaf=is_spec)


def trainable_mask(config: ModelConfig) -> dict:
    """Pytree of bools: which leaves the optimizer updates. Frozen: original layers, embeddings, final norm,
    LM head and (with freeze_interpolation_factor) the lerp-family factors / dlerp gate bias."""
    return jax.tree.map(lambda s: s.trainable, param_specs(config), is_leaf=is_spec)


def param_shardings(config: ModelConfig, mesh, rules: Optional[dict] = None) -> dict:
    """NamedSharding for every parameter of ``config``, from its logical axes and the sharding rules."""
    rules = rules or DEFAULT_RULES
    return jax.tree.map(lambda s: named_sharding(mesh, s.logical_axes, s.shape, rules), param_specs(config),
                        is_leaf=is_spec)


# ----------------------------------------------------------------------------------------------
# Per-block views: unstack the scanned block groups into a list of block dicts, and back
# ----------------------------------------------------------------------------------------------

def unstack_blocks(config: ModelConfig, params: dict) -> list[dict]:
    """Block i's parameters as a plain dict (no leading repeat axis), in model order."""
    blocks: list[Optional[dict]] = [None] * config.num_hidden_layers
    for i, group in enumerate(block_groups(config)):
        group_params = params["layers"][group_key(i)]
        for j in range(len(group.pattern)):
            stacked = group_params[block_key(j)]
            for r in range(group.repeats):
                # non-array leaves (e.g. the bools of a trainable mask) are per-block already
                blocks[group.block_index(r, j)] = jax.tree.map(lambda x, r=r: x[r] if np.ndim(x) else x, stacked)
    return blocks


def stack_blocks(config: ModelConfig, blocks: list[dict], np_module=jnp) -> dict:
    """Inverse of unstack_blocks: the ``layers`` subtree for ``config``."""
    layers = {}
    for i, group in enumerate(block_groups(config)):
        layers[group_key(i)] = {
            block_key(j): jax.tree.map(lambda *xs: np_module.stack(xs),
                                       *[blocks[group.block_index(r, j)] for r in range(group.repeats)])
            for j in range(len(group.pattern))}
    return layers


def relayout(old: ModelConfig, new: ModelConfig, params: dict, np_module=np) -> dict:
    """The same weights under ``new``'s block layout. Marking layers trainable (partial tuning) changes how
    blocks are grouped for the scan, so a tree loaded under the base layout is regrouped here."""
    if [(s.start, [b.key for b in s.pattern], s.repeats) for s in block_groups(old)] == \
            [(s.start, [b.key for b in s.pattern], s.repeats) for s in block_groups(new)]:
        return params
    return {**params, "layers": stack_blocks(new, unstack_blocks(old, params), np_module)}
