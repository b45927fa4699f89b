"""Model surgery for Control LLM (spec §2): expanding a plain Llama, casting to the declared dtypes, and
which leaves train.

    concat:  a trainable copy + a merge module beside each selected layer (a controlled layer)
    stack:   a copy with zeroed output projections inserted after each selected layer
    hybrid:  alternating, stack first
"""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from jax_controlllm.config import ConfigError, ExpansionConfig, ModelConfig, selected_layers
from jax_controlllm.model.layout import layer_plan
from jax_controlllm.model.params import (
    abstract_params,
    init_leaf,
    is_spec,
    merge_specs,
    stack_blocks,
    unstack_blocks,
)


def expanded_config(config: ModelConfig, expansion: ExpansionConfig) -> ModelConfig:
    """The config of ``config`` expanded by ``expansion`` (validated; nothing computed yet)."""
    if config.expansion is not None:
        raise ConfigError("expansion: this model is already expanded; expand the plain base model instead")
    exp = dataclasses.replace(expansion, num_ori_layers=config.num_hidden_layers)
    exp.validate()
    chosen = selected_layers(exp, config.num_hidden_layers)
    n_inserted = {"concat": 0, "stack": len(chosen), "hybrid": (len(chosen) + 1) // 2}[exp.expand_type]
    new = dataclasses.replace(config, expansion=exp, num_hidden_layers=config.num_hidden_layers + n_inserted,
                              trainable_layers=None)
    layer_plan(new)  # consistency check
    return new


def _zero_output_projections(layer: dict) -> dict:
    layer = jax.tree.map(lambda x: x, layer)  # shallow structural copy
    for module, name in (("self_attn", "o_proj"), ("mlp", "down_proj")):
        layer[module][name] = jax.tree.map(jnp.zeros_like, layer[module][name])
    return layer


def _init_tree(specs: dict, rng, config: ModelConfig) -> dict:
    leaves, treedef = jax.tree.flatten(specs, is_leaf=is_spec)
    keys = jax.random.split(rng, max(len(leaves), 1))
    return jax.tree.unflatten(treedef, [init_leaf(s, k, config) for s, k in zip(leaves, keys)])


def expand(config: ModelConfig, params: dict, expansion: ExpansionConfig, rng) -> tuple[ModelConfig, dict]:
    """Expand a plain Llama (spec §2): concat adds a trainable copy + merge module beside each selected layer,
    stack inserts a copy with zeroed output projections after it, hybrid alternates (stack first).
    Deterministic from ``rng`` (only merge parameters are random)."""
    new = expanded_config(config, expansion)
    old_blocks = unstack_blocks(config, params)
    relaxed = new.expansion.interpolation_norm_alpha == -1
    blocks, seen = [], set()
    for index, block in enumerate(layer_plan(new)):
        source = old_blocks[block.origin]
        if block.kind == "controlled":
            expanded = jax.tree.map(lambda x: x, source)
            if relaxed:
                for norm in ("input_layernorm", "post_attention_layernorm"):
                    expanded[norm] = {**expanded[norm], "interpolation_factor": jnp.zeros((1,), jnp.float32)}
            gate = _init_tree(merge_specs(new), jax.random.fold_in(rng, index), new)
            blocks.append({"pretrained_layer": source, "expanded_layer": expanded, **gate})
        elif block.origin in seen and block.trainable:  # the inserted (stacked) copy
            blocks.append(_zero_output_projections(source))
        else:
            blocks.append(source)
        seen.add(block.origin)
    out = {k: v for k, v in params.items() if k != "layers"}
    out["layers"] = stack_blocks(new, blocks)
    return new, cast_to_specs(new, out)


def cast_to_specs(config: ModelConfig, params: dict) -> dict:
    """Cast every leaf to its declared dtype (frozen: frozen_dtype, trainable: param_dtype)."""
    target = abstract_params(config)
    return jax.tree.map(lambda x, t: x.astype(t.dtype) if x.dtype != t.dtype else x, params, target)

