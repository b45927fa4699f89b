"""The graph's forward pass, through the model's own layers: every node's output, and a reader on every
destination's input.

    resid_0 = E[ids]                                        (source "input")
    block l: heads_h = z_h W_O[h] from private q/k/v inputs,  m = MLP(resid_l + sum_h heads_h + b_O)
             resid_{l+1} = resid_l + sum_h heads_h + b_O + m
    logits = head(norm(resid_L)) at the last real position

Attention, MLP, norms, RoPE and the merge are ``jax_controlllm.model``'s functions; this module only
splits the attention output per head and lets a *reader* (readers.py) decide what each destination reads.

**Biases.** q/k/v biases belong to their head, gate/up/down biases to their MLP. The attention output bias
b_O of a block is a constant of no single head: it is part of the ``input`` node, whose output as read by
block l is the embedding plus every b_O written before l (so the residual stream stays an exact sum of node
outputs; patching or ablating the input edge moves the biases with the embedding).

**Controlled blocks** (Control LLM) run both branches on the same residual stream and merge them with
``model.control.merge_coefficients``, held at the *clean* run's values (``held``):

    merged = c_p * (p @ L) + c_e * e,   p = resid + P-branch nodes,  e = resid + E-branch nodes

(L: prog's lateral connection, else the identity). Each branch's nodes enter the stream through its map
(c_p (x @ L) or c_e x) and everything already in the stream through R(x) = c_p (x @ L) + c_e x, the identity
for lerp, dlerp, dlerpin, moe and proj (c_p + c_e = 1) and a per-token scale (slerp) or matrix (prog)
otherwise. A source's output is thus "as it currently stands in the stream": ``RunOutput.reads[l]`` holds the
source groups as block l reads them. A branch's MLP reads its own heads unscaled, as the branch computes them.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np

from jax_controlllm.circuits.graph import Graph
from jax_controlllm.circuits.taps import TappedInput
from jax_controlllm.config import ModelConfig
from jax_controlllm.convert import from_hf_tensors
from jax_controlllm.model import layer_plan, unstack_blocks
from jax_controlllm.model.control import expanded_norm_relax, merge_coefficients
from jax_controlllm.model.layers import (
    Context,
    apply_rope,
    attention_weights_xla,
    dense_per_head,
    head_outputs,
    mlp,
    norm_mix,
    rms_norm,
    rope_tables,
)
from jax_controlllm.model.lora import merge_lora
from jax_controlllm.model.stack import attention_mask_for, head_kernel, token_mask_for

# ----------------------------------------------------------------------------------------------
# The model, as the graph sees it
# ----------------------------------------------------------------------------------------------

@dataclass
class CircuitModel:
    """A model's config (static: a jit argument) and its weights with the blocks unstacked."""
    config: ModelConfig
    weights: dict                    # embed_tokens, norm, lm_head (untied), blocks: [per-block params]

    @property
    def graph(self) -> Graph:
        return model_graph(self.config)


def model_graph(config: ModelConfig) -> Graph:
    return graph_for(config.num_attention_heads, tuple(b.kind for b in layer_plan(config)))


_GRAPHS: dict = {}


def graph_for(n_heads: int, block_kinds: tuple[str, ...]) -> Graph:
    """One shared Graph per shape, so its cached masks and orders are computed once."""
    key = (n_heads, block_kinds)
    if key not in _GRAPHS:
        _GRAPHS[key] = Graph(n_heads, block_kinds)
    return _GRAPHS[key]


def circuit_model(config: ModelConfig, params, dtype: str = "float32") -> CircuitModel:
    """The graph model of any model the trainer makes, from our parameter tree or a dict of Hugging Face
    tensors (``model.layers.{i}...``); a CircuitModel passes through. ``dtype``: the compute dtype."""
    if isinstance(params, CircuitModel):
        return params
    if any(str(k).startswith("model.") for k in params):
        params = from_hf_tensors(config, params)
    config, params = merge_lora(config, params)   # a LoRA model's graph is that of its merged weights
    cast = jax.tree.map(lambda x: jnp.asarray(x, dtype), params)
    weights = {k: v for k, v in cast.items() if k != "layers"}
    weights["blocks"] = unstack_blocks(config, cast)          # the stacked layout follows the trained config
    # one static config for every checkpoint of a run (training-only fields cleared): compiled once
    config = dataclasses.replace(config, param_dtype=dtype, frozen_dtype=dtype, compute_dtype=dtype,
                                 attention_impl="xla", remat="none", trainable_layers=None, train_embeddings=False)
    return CircuitModel(config, weights)


# ----------------------------------------------------------------------------------------------
# One forward pass over the graph
# ----------------------------------------------------------------------------------------------

@dataclass
class RunOutput:
    """One run's node outputs (as they stand in the residual stream) and its final state."""
    reads: tuple                     # per block l, then the logits (index L): the source groups as read there:
                                     # input [1, B, T, D], then one [n_block_sources, B, T, D] per earlier block
    raw_heads: dict                  # branch number -> [H, B, T, D] its heads as computed (unscaled)
    merges: dict                     # controlled block -> (c_p, c_e) merge coefficients used (see ``held``)
    resid: jax.Array                 # [B, T, D] residual stream after the last block (the logits' input)
    block_inputs: list               # residual stream entering each block, [B, T, D] each

    @property
    def sources(self) -> jax.Array:
        """All source outputs as the logits read them, [n_src, B, T, D]."""
        return jnp.concatenate(self.reads[-1], axis=0)


jax.tree_util.register_dataclass(RunOutput, data_fields=["reads", "raw_heads", "merges", "resid", "block_inputs"],
                                 meta_fields=[])


def context(config: ModelConfig, length: int) -> Context:
    """Positions 0..T-1 (prompts start at 0) and a causal mask: right padding needs no more (pads come after
    every real token, so causality keeps them out of real positions)."""
    positions = jnp.arange(length, dtype=jnp.int32)[None]
    cos, sin = rope_tables(config, positions)
    return Context(config, cos, sin, attention_mask_for(positions), token_mask_for(positions))


def branch_layers(config: ModelConfig, kind: str, params: dict) -> list[tuple[dict, Optional[float]]]:
    """(decoder-layer params, fixed relaxed-norm share) of each branch of a block."""
    if kind == "llama":
        return [(params, None)]
    return [(params["pretrained_layer"], None), (params["expanded_layer"], expanded_norm_relax(config.expansion))]


def normed_inputs(config: ModelConfig, norm: dict, x, relax) -> list:
    """The input norm of a block's attention on what its q, k and v read: [B, T, D] shared, [3, H, B, T, D]
    private per part and head, or a ``TappedInput`` (norm computed once, taps on the normalised copies)."""
    eps, heads = config.rms_norm_eps, config.num_attention_heads
    if isinstance(x, TappedInput):
        shared = rms_norm(x.resid, norm, eps, relax)
        mix = norm_mix(norm, relax)
        return [x.normed_copies(shared, norm["weight"], mix, eps, part, heads) for part in range(3)]
    if x.ndim == 3:
        return [rms_norm(x, norm, eps, relax)] * 3
    return [rms_norm(x[part], norm, eps, relax) for part in range(3)]


def query_heads_kv_group(config: ModelConfig) -> np.ndarray:
    """[H] the key/value head each query head reads (grouped-query attention)."""
    h = config.num_attention_heads
    return np.arange(h) // (h // config.num_key_value_heads)


def project_qkv(config: ModelConfig, attention: dict, normed: list) -> tuple[jax.Array, jax.Array, jax.Array]:
    """q, k, v [B, T, H, dh] (before RoPE). Keys and values come per *query* head (its group's projection),
    so that each head has private inputs."""
    dt, group = jnp.dtype(config.compute_dtype), query_heads_kv_group(config)
    h, kv = config.num_attention_heads, config.num_key_value_heads
    return (dense_per_head(normed[0], attention["q_proj"], h, dt),
            dense_per_head(normed[1], attention["k_proj"], kv, dt, group),
            dense_per_head(normed[2], attention["v_proj"], kv, dt, group))


def attention_heads(ctx: Context, layer: dict, x, relax) -> tuple[jax.Array, Optional[jax.Array]]:
    """Each head's output z_h W_O[h] [H, B, T, D] and the output bias b_O [D] (None without biases)."""
    config = ctx.config
    q, k, v = project_qkv(config, layer["self_attn"], normed_inputs(config, layer["input_layernorm"], x, relax))
    z = attention_weights_xla(apply_rope(q, ctx.cos, ctx.sin), apply_rope(k, ctx.cos, ctx.sin), v, ctx.mask)
    o_proj = layer["self_attn"]["o_proj"]
    bias = o_proj["bias"].astype(z.dtype) if "bias" in o_proj else None
    return head_outputs(z, o_proj, jnp.dtype(config.compute_dtype)), bias


def mlp_node(config: ModelConfig, layer: dict, x: jax.Array, relax) -> jax.Array:
    return mlp(layer["mlp"], rms_norm(x, layer["post_attention_layernorm"], config.rms_norm_eps, relax))


def _plus(x: jax.Array, bias: Optional[jax.Array]) -> jax.Array:
    return x if bias is None else x + bias


class BranchMap:
    """How a controlled block's branch enters the stream: x -> c (x @ lateral) (lateral None: c x)."""

    def __init__(self, coefficient, lateral=None):
        self.coefficient, self.lateral = coefficient, lateral

    def __call__(self, x: jax.Array) -> jax.Array:
        if self.lateral is not None:
            x = jnp.einsum("...i,io->...o", x, self.lateral.astype(x.dtype))
        return (self.coefficient * x).astype(x.dtype)


def stream_map(method: str, p_map: BranchMap, e_map: BranchMap):
    """R: what a controlled block does to everything already in the stream (None: the identity)."""
    if method == "slerp":
        return lambda x: ((p_map.coefficient + e_map.coefficient) * x).astype(x.dtype)
    if method == "prog":
        return lambda x: p_map(x) + e_map(x)
    return None


def run(config: ModelConfig, weights: dict, embeds: jax.Array, reader, held: Optional[dict] = None) -> RunOutput:
    """Forward pass from the input embeddings [B, T, D]; ``reader`` builds each destination's input; ``held``:
    the merge coefficients of controlled blocks (a clean run's ``merges``), else computed on this run."""
    graph = model_graph(config)
    ctx = context(config, embeds.shape[1])
    resid, groups = embeds, [embeds[None]]
    reads, raw_heads, merges, block_inputs = [], {}, {}, []
    branches = iter(graph.branches)
    for index, (block, params) in enumerate(zip(layer_plan(config), weights["blocks"])):
        read = tuple(groups)
        reads.append(read)
        block_inputs.append(resid)
        outputs = []                                   # (heads [H,B,T,D], b_O or None, mlp [B,T,D]) per branch
        for layer, relax in branch_layers(config, block.kind, params):
            branch = next(branches)
            heads, bias = attention_heads(ctx, layer, reader.attention(branch, resid, read), relax)
            mid = _plus(resid + heads.sum(0), bias)
            m = mlp_node(config, layer, reader.mlp(branch, mid, heads, read, bias), relax)
            raw_heads[branch.number] = heads
            outputs.append((heads, bias, m))
        written = [_plus(heads.sum(0), bias) + m for heads, bias, m in outputs]    # each branch's nodes, summed
        if block.kind == "llama":
            maps, stream = [lambda x: x], None
            resid = resid + written[0]
        else:
            method = config.expansion.merge_method
            c_p, c_e, lateral = merge_coefficients(params, method, resid, resid + written[0], resid + written[1])
            c_p, c_e = held[index] if held is not None else (c_p, c_e)
            merges[index] = (c_p, c_e)
            maps = [BranchMap(c_p, lateral), BranchMap(c_e)]
            stream = stream_map(method, *maps)
            resid = (resid if stream is None else stream(resid)) + maps[0](written[0]) + maps[1](written[1])
        if stream is not None:
            groups = [stream(g) for g in groups]
        for (heads, bias, m), f in zip(outputs, maps):
            if bias is not None:
                groups[0] = groups[0] + f(bias)[None]
        groups.append(jnp.concatenate([x for (heads, _, m), f in zip(outputs, maps) for x in (f(heads), f(m)[None])],
                                      axis=0))
    reads.append(tuple(groups))
    resid = reader.logits(resid, reads[-1])
    return RunOutput(tuple(reads), raw_heads, merges, resid, block_inputs)


# ----------------------------------------------------------------------------------------------
# Embedding and logits
# ----------------------------------------------------------------------------------------------

def last_position(x: jax.Array, last: jax.Array) -> jax.Array:
    """x [B, T, ...] at position last[b] for each row -> [B, ...]."""
    index = last.reshape((-1, 1) + (1,) * (x.ndim - 2))
    return jnp.take_along_axis(x, index, axis=1)[:, 0]


def final_norm(config: ModelConfig, weights: dict, resid_last: jax.Array) -> jax.Array:
    return rms_norm(resid_last, weights["norm"], config.rms_norm_eps)


def final_logits(config: ModelConfig, weights: dict, resid_last: jax.Array) -> jax.Array:
    """Full-vocabulary logits [B, V] (float32) from the residual stream at one position [B, D]."""
    normed = final_norm(config, weights, resid_last)
    return jnp.einsum("bd,dv->bv", normed, head_kernel(config, weights).astype(normed.dtype),
                      preferred_element_type=jnp.float32)


def logit_difference(config: ModelConfig, weights: dict, resid_last: jax.Array, labels: jax.Array) -> jax.Array:
    """logit[c] - logit[k] per item [B] for label pairs [B, 2] = (clean, corrupted); only the two output
    columns are computed, not the whole vocabulary."""
    normed = final_norm(config, weights, resid_last)
    columns = jnp.take(head_kernel(config, weights), labels, axis=1).astype(normed.dtype)     # [D, B, 2]
    logits = jnp.einsum("bd,dbc->bc", normed, columns, preferred_element_type=jnp.float32)
    return logits[:, 0] - logits[:, 1]


def to_final_stream(config: ModelConfig, weights: dict, merges: dict, block: int, branch: int, x: jax.Array,
                    last: jax.Array) -> jax.Array:
    """Vectors x [B, ..., D] that branch ``branch`` of ``block`` writes at each item's last real position, as
    they stand in the final residual stream: the branch's map, then every later block's stream map, with the
    (held) merge coefficients at that position."""
    plan = layer_plan(config)

    def at_last(c):
        c = jnp.asarray(c)
        return c if c.ndim == 0 else last_position(c, last).reshape((-1,) + (1,) * (x.ndim - 1))

    for index in range(block, len(plan)):
        if plan[index].kind != "controlled":
            continue
        lateral = weights["blocks"][index].get("lateral_connection", {}).get("kernel")
        maps = [BranchMap(at_last(merges[index][0]), lateral), BranchMap(at_last(merges[index][1]))]
        stream = maps[branch] if index == block else stream_map(config.expansion.merge_method, *maps)
        x = x if stream is None else stream(x)
    return x
