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
from jax_controlllm.circuits.forward import (apply_rotary, attention_probs, last_position, project_qkv, rms_norm,
                                             rotary, unembedding)
from jax_controlllm.circuits.weights import Structure, circuit_model

HEAD_CLASSES = ("mover", "relation", "mixture")


@partial(jax.jit, static_argnames=("structure",))
def head_position_dla(structure: Structure, weights: dict, ids, last, target) -> jax.Array:
    """[B, n_head_sources, T]: each head's direct logit attribution to ``target`` [B] at the last position,
    split by the source position it attends to. Heads in graph source order; scaled by the merge weight for
    controlled blocks (so the numbers add up to what enters the residual stream)."""
    out = plain_run(structure, weights, ids)
    inputs = [out.groups[0][0]] + out.block_resids[:-1]             # residual entering each block
    final = last_position(out.resid, last).astype(jnp.float32)
    scale = jax.lax.rsqrt(jnp.mean(final * final, axis=-1, keepdims=True) + structure.eps)
    u = weights["norm"].astype(jnp.float32) * jnp.take(unembedding(structure, weights), target, axis=0) * scale
    cos, sin = rotary(structure, ids.shape[1])
    graph, per_head = structure.graph, []
    for b in graph.branches:
        w = weights["blocks"][b.block]["branches"][b.branch]
        q, k, v = project_qkv(w, rms_norm(inputs[b.block], w["ln1"], structure.eps, w.get("mix1")))
        probs = attention_probs(apply_rotary(q, cos, sin), apply_rotary(k, cos, sin))       # [B, H, T, T]
        at_last = jnp.take_along_axis(probs, last[:, None, None, None], axis=2)[:, :, 0]      # [B, H, T]
        value_logit = jnp.einsum("bhtk,hkd,bd->bht", v.astype(jnp.float32), w["wo"].astype(jnp.float32), u)
        fold = last_position(out.folds[b.number], last)[:, None, None] if b.number in out.folds else 1.0
        per_head.append(at_last * value_logit * fold)
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
    prompts = prepare(ids, None, target_ids, None, lengths, model.structure.vocab_size)
    n, t = prompts.clean.shape
    out = np.zeros((n, int(model.graph.is_head.sum()), t), np.float32)
    with matmul_precision(dtype):
        for chunk in chunks(prompts, np.ones(n), batch_size, pad_multiple=1):
            dla = head_position_dla(model.structure, model.weights, chunk["clean"], chunk["last"],
                                    chunk["labels"][:, 0])
            out[chunk["items"]] = np.asarray(dla)[:len(chunk["items"])]
    return out
