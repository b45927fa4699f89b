"""What attention heads read: direct logit attribution split by source position, and head classes.

At the last real position p, head h writes sum_j A[p, j] (v_j W_O[h]) into the residual stream. Its direct
logit attribution to the target token, position by position, is

    dla[j] = A[p, j] (v_j W_O[h]) . u,    u = g * W_U[target] / rms(resid_final[p])

(the final RMSNorm's scale frozen at its value on this run, g its weight). A head in a knowledge circuit is a

- **mover** head if most of its |dla| comes from the subject's tokens (it moves the subject's information
  to the last position),
- **relation** head if most comes from the relation's tokens,
- **mixture** head otherwise,

with "most" = a share of at least ``threshold`` (0.6 by default), averaged over prompts.
"""
from __future__ import annotations

from functools import partial

import jax
import jax.numpy as jnp
import numpy as np

from jax_controlllm.circuits.attribute import matmul_precision, plain_run
from jax_controlllm.circuits.batching import chunks, prepare
from jax_controlllm.circuits.nodes import (
    branch_layers,
    circuit_model,
    context,
    last_position,
    model_graph,
    project_qkv,
    to_final_stream,
)
from jax_controlllm.config import ModelConfig
from jax_controlllm.model import layer_plan
from jax_controlllm.model.layers import apply_rope, attention_probs, rms_norm
from jax_controlllm.model.stack import head_kernel

HEAD_CLASSES = ("mover", "relation", "mixture")


@partial(jax.jit, static_argnames=("config",))
def head_position_dla(config: ModelConfig, weights: dict, ids, last, target) -> jax.Array:
    """[B, n_head_sources, T]: each head's direct logit attribution to ``target`` [B] at the last position,
    split by the source position it attends to. Heads in graph source order; carried into the final stream
    as the residual stream carries them (merge coefficients of controlled blocks), so the numbers add up to
    what each head contributes to the final residual."""
    out = plain_run(config, weights, ids)
    final = last_position(out.resid, last).astype(jnp.float32)
    scale = jax.lax.rsqrt(jnp.mean(final * final, axis=-1, keepdims=True) + config.rms_norm_eps)
    unembed = jnp.take(head_kernel(config, weights), target, axis=1).T.astype(jnp.float32)        # [B, D]
    u = weights["norm"]["weight"].astype(jnp.float32) * unembed * scale
    ctx = context(config, ids.shape[1])
    plan, graph, per_head = layer_plan(config), model_graph(config), []
    for b in graph.branches:
        layer, relax = branch_layers(config, plan[b.block].kind, weights["blocks"][b.block])[b.branch]
        normed = rms_norm(out.block_inputs[b.block], layer["input_layernorm"], config.rms_norm_eps, relax)
        q, k, v = project_qkv(config, layer["self_attn"], [normed] * 3)
        probs = attention_probs(apply_rope(q, ctx.cos, ctx.sin), apply_rope(k, ctx.cos, ctx.sin), ctx.mask)
        probs = probs[:, :, 0]                                                          # [B, H, T, T]
        at_last = jnp.take_along_axis(probs, last[:, None, None, None], axis=2)[:, :, 0]   # [B, H, T]
        o_proj = layer["self_attn"]["o_proj"]["kernel"]
        wo = o_proj.reshape(config.num_attention_heads, -1, o_proj.shape[-1]).astype(jnp.float32)
        written = jnp.einsum("bthk,hkd->bhtd", v.astype(jnp.float32), wo)              # [B, H, T, D]
        written = to_final_stream(config, weights, out.merges, b.block, b.branch, written, last)
        per_head.append(at_last * jnp.einsum("bhtd,bd->bht", written.astype(jnp.float32), u))
    return jnp.concatenate(per_head, axis=1)


def classify_heads(dla: np.ndarray, subject_mask: np.ndarray, relation_mask: np.ndarray,
                   threshold: float = 0.6) -> list[dict]:
    """Per head: its mean subject and relation shares of |dla| over prompts and its class.

    dla [N, n_heads, T]; masks [N, T] bool."""
    magnitude = np.abs(np.asarray(dla, np.float64))
    total = np.maximum(magnitude.sum(-1), 1e-30)                                # [N, heads]
    subject = (magnitude * subject_mask[:, None]).sum(-1) / total
    relation = (magnitude * relation_mask[:, None]).sum(-1) / total
    out = []
    for s, r in zip(subject.mean(0), relation.mean(0)):
        kind = "mover" if s >= threshold else "relation" if r >= threshold else "mixture"
        out.append({"class": kind, "subject_share": float(s), "relation_share": float(r)})
    return out


def head_dla(config, params, ids, target_ids, lengths=None, batch_size: int = 16, dtype: str = "float32"):
    """``head_position_dla`` over a whole prompt set: np.ndarray [N, n_head_sources, T]."""
    model = circuit_model(config, params, dtype)
    prompts = prepare(ids, None, target_ids, None, lengths, model.config.vocab_size)
    n, t = prompts.clean.shape
    out = np.zeros((n, int(model.graph.is_head.sum()), t), np.float32)
    with matmul_precision(dtype):
        for chunk in chunks(prompts, np.ones(n), batch_size, pad_multiple=1):
            dla = head_position_dla(model.config, model.weights, chunk["clean"], chunk["last"],
                                    chunk["labels"][:, 0])
            out[chunk["items"]] = np.asarray(dla)[:len(chunk["items"])]
    return out
