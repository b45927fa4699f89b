"""The model: the stack of blocks over a parameter pytree, from token ids to logits.

    h_0   = E[ids]
    h_l+1 = block_l(h_l)         plain:  a = h + o(attn(norm1(h)));  out = a + down(silu(gate(n)) * up(n)), n = norm2(a)
                                 controlled (Control LLM): see control.py
    logits = norm(h_L) @ W_head

Attention masks combine causality, padding (attention_mask) and packed documents (segment_ids): a token
attends to keys at or before it, in the same segment, that are not padding. Positions restart per document
when the caller passes them (the data pipeline does).
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Optional

import jax
import jax.numpy as jnp

from jax_controlllm.config import ModelConfig
from jax_controlllm.model.control import controlled_layer
from jax_controlllm.model.layers import Context, decoder_layer, rms_norm, rope_tables
from jax_controlllm.model.layout import BlockGroup, block_groups
from jax_controlllm.model.params import block_key, group_key
from jax_controlllm.sharding import constrain

# ----------------------------------------------------------------------------------------------
# The stack of blocks: one lax.scan per group of repeated blocks
# ----------------------------------------------------------------------------------------------

# "selective": keep every matmul output that a nonlinearity or a later matmul's backward needs (rotated
# q/k/v, the attention output and cuDNN's softmax statistics, the SwiGLU gate and up projections, the
# residual stream after attention and after each layer) and recompute only element-wise work (norms,
# SwiGLU product, merge gates, divergence). No matmul runs twice, and the fp32 norm inputs, the
# silu(gate) * up product and the dlerp features are not kept: about 3x less activation memory than none.
SELECTIVE_SAVED_NAMES = frozenset({"query", "key", "value", "attention", "attention_residual", "mlp_gate",
                                   "mlp_up", "layer_output"})


def _save_selected(prim, *_, **params) -> bool:
    if prim.name == "name":  # a checkpoint_name marker
        return params["name"] in SELECTIVE_SAVED_NAMES
    return prim.name.startswith("dot_product_attention_fwd")  # cuDNN attention: output + softmax stats


_REMAT_POLICIES = {
    "full": None,
    "selective": _save_selected,
    "save_dots": jax.checkpoint_policies.dots_saveable,
    "save_dots_no_batch": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}


def _apply_block(kind: str, p: dict, h, ctx: Context, cache):
    if kind == "llama":
        h, cache = decoder_layer(p, h, ctx, cache)
        return h, cache, None
    return controlled_layer(p, h, ctx, cache)


def _group_body(group: BlockGroup, ctx: Context):
    kinds = [b.kind for b in group.pattern]

    def body(h, xs):
        block_params, block_caches, rng = xs
        new_caches, aux = {}, {}
        for j, kind in enumerate(kinds):
            key = block_key(j)
            cache = None if block_caches is None else block_caches[key]
            block_ctx = ctx if rng is None else dataclasses.replace(ctx, lora_rng=jax.random.fold_in(rng, j))
            h, cache, block_aux = _apply_block(kind, block_params[key], h, block_ctx, cache)
            if cache is not None:
                new_caches[key] = cache
            if block_aux is not None:
                aux[key] = block_aux
        return h, (new_caches or None, aux)

    policy = ctx.config.remat
    if policy != "none":
        body = jax.checkpoint(body, policy=_REMAT_POLICIES[policy], prevent_cse=False)
    return body


def apply_blocks(config: ModelConfig, layers: dict, h: jax.Array, ctx: Context, cache: Optional[dict] = None):
    """Run all blocks. Returns (h, new cache or None, per-controlled-block aux ordered by block index)."""
    new_cache, aux_by_block = {}, {}
    for i, group in enumerate(block_groups(config)):
        key = group_key(i)
        group_cache = None if cache is None else cache[key]
        # one dropout key per repeat of the group (None outside training steps)
        rngs = None if ctx.lora_rng is None else jax.random.split(jax.random.fold_in(ctx.lora_rng, i), group.repeats)
        h, (group_new_cache, group_aux) = jax.lax.scan(_group_body(group, ctx), h, (layers[key], group_cache, rngs))
        if group_new_cache is not None:
            new_cache[key] = group_new_cache
        for j in range(len(group.pattern)):
            if block_key(j) in group_aux:
                for r in range(group.repeats):
                    aux_by_block[group.block_index(r, j)] = jax.tree.map(lambda x, r=r: x[r], group_aux[block_key(j)])
    aux = [aux_by_block[k] for k in sorted(aux_by_block)]
    return h, (new_cache if cache is not None else None), aux


# ----------------------------------------------------------------------------------------------
# Masks and the full model
# ----------------------------------------------------------------------------------------------

def attention_mask_for(input_ids, attention_mask=None, segment_ids=None) -> jax.Array:
    """[B, 1, S, S] bool: causal, same segment, key not padding."""
    s = input_ids.shape[1]
    causal = jnp.tril(jnp.ones((s, s), dtype=bool))[None, None]
    mask = causal
    if segment_ids is not None:
        mask = mask & (segment_ids[:, None, :, None] == segment_ids[:, None, None, :])
    if attention_mask is not None:
        mask = mask & attention_mask.astype(bool)[:, None, None, :]
    return mask


def token_mask_for(input_ids, attention_mask=None, segment_ids=None) -> jax.Array:
    if attention_mask is not None:
        return attention_mask.astype(jnp.float32)
    if segment_ids is not None:
        return (segment_ids > 0).astype(jnp.float32)
    return jnp.ones(input_ids.shape, jnp.float32)


def embed(config: ModelConfig, params: dict, input_ids: jax.Array) -> jax.Array:
    table = params["embed_tokens"]["embedding"]
    h = jnp.take(table, input_ids, axis=0).astype(jnp.dtype(config.compute_dtype))
    return constrain(h, ("act_batch", "act_seq", "act_embed"))


def head_kernel(config: ModelConfig, params: dict) -> jax.Array:
    """[H, V] output projection (the transposed embedding when tied)."""
    if config.tie_word_embeddings:
        return params["embed_tokens"]["embedding"].T
    return params["lm_head"]["kernel"]


def final_hidden(config: ModelConfig, params: dict, input_ids, attention_mask=None, positions=None,
                 segment_ids=None, return_aux: bool = False, lora_rng=None, pretrained_only: bool = False):
    """Normed last hidden state [B, S, H] (compute dtype), plus Control LLM aux terms when asked.
    ``lora_rng``: the training step's key for LoRA dropout (None: no dropout). ``pretrained_only``: the base
    model's forward through an expanded model (each controlled layer runs only its frozen pretrained branch)."""
    input_ids = jnp.asarray(input_ids)
    b, s = input_ids.shape
    if positions is None:
        positions = jnp.broadcast_to(jnp.arange(s, dtype=jnp.int32), (b, s))
    cos, sin = rope_tables(config, jnp.asarray(positions))
    ctx = Context(config, cos, sin, attention_mask_for(input_ids, attention_mask, segment_ids),
                  token_mask_for(input_ids, attention_mask, segment_ids), segment_ids, lora_rng=lora_rng,
                  pretrained_only=pretrained_only)
    h = embed(config, params, input_ids)
    h, _, aux = apply_blocks(config, params["layers"], h, ctx)
    h = rms_norm(h, params["norm"], config.rms_norm_eps)
    if return_aux:
        return h, aux, ctx
    return h


def logits_from_hidden(config: ModelConfig, params: dict, h: jax.Array) -> jax.Array:
    kernel = head_kernel(config, params).astype(h.dtype)
    logits = jnp.einsum("bsh,hv->bsv", h, kernel, preferred_element_type=jnp.float32)
    return constrain(logits, ("act_batch", "act_seq", "act_vocab"))


@functools.partial(jax.jit, static_argnums=0)
def forward(config: ModelConfig, params: dict, input_ids, attention_mask=None, positions=None,
            segment_ids=None) -> jax.Array:
    """Logits [B, S, V] in float32."""
    h = final_hidden(config, params, input_ids, attention_mask, positions, segment_ids)
    return logits_from_hidden(config, params, h)
