"""The forward pass over the graph: every node's output, and a hook on every destination's input.

    resid_0 = E[ids]                                       (source "input")
    block l: heads_h = z_h W_O[h] from private q/k/v copies of resid_l,  m = MLP(resid_l + sum_h heads_h)
             resid_{l+1} = resid_l + sum_h heads_h + m
    logits = unembed(norm(resid_L)) at the last real position

A controlled block (Control LLM) runs both branches on the same resid_l and merges them; the merge weight w
(a scalar for lerp, one per token for dlerp) is folded into the branch's node outputs,

    resid_{l+1} = resid_l + (1 - w) (sum heads_p + m_p) + w (sum heads_e + m_e)

so the residual stream stays an exact sum of (folded) node outputs. A branch's MLP reads its own heads
unscaled, as the branch computes them. The dlerp gate is evaluated on the run's own p and e and held fixed
when differentiating (it is not a destination of the graph).

What each destination reads is decided by a *reader* (see readers.py): the plain residual stream, a
residual stream with a zero-valued "tap" whose gradient is the attribution score, or an edge-patched
mixture of current and reference source outputs.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np

from jax_controlllm.circuits.weights import Structure


@dataclass
class RunOutput:
    """One run's node outputs (as they enter the residual stream) and final state."""
    groups: tuple                      # folded source outputs, source-major: input [1, B, T, D], then one
                                       # [n_block_sources, B, T, D] per block (kept apart: no big concatenation)
    raw_heads: dict                    # branch number -> [H, B, T, D] unscaled heads of controlled blocks
    folds: dict                        # branch number -> [B, T] merge weight folded into it (controlled blocks)
    resid: jax.Array                   # [B, T, D] residual stream after the last block (the logits input)
    block_resids: list                 # residual stream after each block, [B, T, D] each

    @property
    def sources(self) -> jax.Array:
        """All folded source outputs [n_src, B, T, D]."""
        return jnp.concatenate(self.groups, axis=0)


jax.tree_util.register_dataclass(RunOutput, data_fields=["groups", "raw_heads", "folds", "resid", "block_resids"],
                                 meta_fields=[])


# ----------------------------------------------------------------------------------------------
# Building blocks (each head separately)
# ----------------------------------------------------------------------------------------------

def rms_norm(x: jax.Array, weight: jax.Array, eps: float, mix: Optional[jax.Array] = None) -> jax.Array:
    """``weight * x / sqrt(mean(x^2) + eps)`` in float32, cast back; optionally the relaxed norm
    ``mix * x + (1 - mix) * RMSNorm(x)`` of Control LLM's expanded layers."""
    x32 = x.astype(jnp.float32)
    out = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + eps) * weight.astype(jnp.float32)
    if mix is not None:
        out = mix * x32 + (1 - mix) * out
    return out.astype(x.dtype)


def rotary(structure: Structure, length: int) -> tuple[jax.Array, jax.Array]:
    """cos, sin [T, head_dim] for positions 0..T-1 (prompts always start at position 0)."""
    freqs = np.arange(length, dtype=np.float32)[:, None] * np.asarray(structure.inv_freq, np.float32)
    angles = np.concatenate([freqs, freqs], axis=-1)
    return jnp.asarray(np.cos(angles)), jnp.asarray(np.sin(angles))


def apply_rotary(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
    """x [B, H, T, dh], rotate-half layout."""
    half = x.shape[-1] // 2
    rotated = jnp.concatenate([-x[..., half:], x[..., :half]], axis=-1)
    return x * cos.astype(x.dtype) + rotated * sin.astype(x.dtype)


def project_qkv(w: dict, normed) -> tuple[jax.Array, jax.Array, jax.Array]:
    """normed: [B, T, D] shared by all heads, or private per head for q, k and v (three [H, B, T, D], or one
    [3, H, B, T, D]) -> q, k, v [B, H, T, dh]."""
    if getattr(normed, "ndim", None) == 3:
        return tuple(jnp.einsum("btd,hdk->bhtk", normed, w[name]) for name in ("wq", "wk", "wv"))
    return tuple(jnp.einsum("hbtd,hdk->bhtk", normed[i], w[name]) for i, name in enumerate(("wq", "wk", "wv")))


def attention_probs(q: jax.Array, k: jax.Array) -> jax.Array:
    """Causal softmax attention pattern [B, H, T, T] (float32). Right padding needs no mask: pads come after
    every real token, so causality keeps them out of real positions."""
    t = q.shape[2]
    scores = jnp.einsum("bhqk,bhsk->bhqs", q, k, preferred_element_type=jnp.float32) / np.sqrt(q.shape[-1])
    causal = jnp.tril(jnp.ones((t, t), bool))
    scores = jnp.where(causal, scores, jnp.finfo(jnp.float32).min)
    return jax.nn.softmax(scores, axis=-1)


def attention_heads(structure: Structure, w: dict, x, cos, sin) -> jax.Array:
    """Each head's output z_h W_O[h], [H, B, T, D], from the inputs x: shared [B, T, D], private per q/k/v
    and head [3, H, B, T, D], or a ``taps.TappedInput`` (norm computed once, tap on the normalised copies)."""
    if hasattr(x, "normed_copies"):
        shared = rms_norm(x.resid, w["ln1"], structure.eps, w.get("mix1"))
        normed = [x.normed_copies(shared, w["ln1"], w.get("mix1"), structure.eps, part, structure.n_heads)
                  for part in range(3)]
    else:
        normed = rms_norm(x, w["ln1"], structure.eps, w.get("mix1"))
    q, k, v = project_qkv(w, normed)
    probs = attention_probs(apply_rotary(q, cos, sin), apply_rotary(k, cos, sin))
    z = jnp.einsum("bhqs,bhsk->bhqk", probs.astype(v.dtype), v)
    return jnp.einsum("bhtk,hkd->hbtd", z, w["wo"])


def mlp(structure: Structure, w: dict, x: jax.Array) -> jax.Array:
    normed = rms_norm(x, w["ln2"], structure.eps, w.get("mix2"))
    hidden = jax.nn.silu(normed @ w["gate"]) * (normed @ w["up"])
    return hidden @ w["down"]


def merge_weight(merge: str, params: dict, p: jax.Array, e: jax.Array) -> jax.Array:
    """w, the expanded branch's share: scalar (lerp) or [B, T, 1] (dlerp, from [p || e]), float32."""
    if merge == "lerp":
        return jax.nn.sigmoid(params["factor"].astype(jnp.float32))
    features = jnp.concatenate([p, e], axis=-1).astype(jnp.float32)
    logit = features @ params["fc_weight"].astype(jnp.float32) + params["fc_bias"].astype(jnp.float32)
    return jax.nn.sigmoid(logit)[..., None]


# ----------------------------------------------------------------------------------------------
# The whole model
# ----------------------------------------------------------------------------------------------

def embed(weights: dict, ids: jax.Array) -> jax.Array:
    return jnp.take(weights["embed"], ids, axis=0)


def unembedding(structure: Structure, weights: dict) -> jax.Array:
    """[V, D] rows of the output projection."""
    return weights["embed"] if structure.tied else weights["unembed"]


def run(structure: Structure, weights: dict, embeds: jax.Array, reader) -> RunOutput:
    """Forward pass from the input embeddings [B, T, D]; ``reader`` builds each destination's input."""
    graph = structure.graph
    cos, sin = rotary(structure, embeds.shape[1])
    resid = embeds
    chunks = [embeds[None]]                 # folded source outputs so far, in source order, [k, B, T, D]
    raw_heads, folds, block_resids = {}, {}, []
    branch_iter = iter(graph.branches)
    for spec, block in zip(structure.blocks, weights["blocks"]):
        outputs = []                         # (branch number, heads [H,B,T,D], mlp [B,T,D]) per branch
        for w in block["branches"]:
            branch = next(branch_iter)
            heads = attention_heads(structure, w, reader.attention(branch, resid, chunks), cos, sin)
            m = mlp(structure, w, reader.mlp(branch, resid + heads.sum(0), heads, chunks))
            outputs.append((branch.number, heads, m))
        if spec.kind == "llama":
            (_, heads, m), = outputs
            folded = [(heads, m)]
        else:
            (n_p, heads_p, m_p), (n_e, heads_e, m_e) = outputs
            p = resid + heads_p.sum(0) + m_p
            e = resid + heads_e.sum(0) + m_e
            w_e = reader.gate(merge_weight(spec.merge, block["merge"], p, e)).astype(resid.dtype)
            w_p = 1 - w_e
            folded = [(heads_p * w_p, m_p * w_p), (heads_e * w_e, m_e * w_e)]
            raw_heads[n_p], raw_heads[n_e] = heads_p, heads_e
            token_shape = resid.shape[:2]
            folds[n_p] = jnp.broadcast_to(jnp.reshape(w_p, w_p.shape[:2]), token_shape).astype(jnp.float32)
            folds[n_e] = jnp.broadcast_to(jnp.reshape(w_e, w_e.shape[:2]), token_shape).astype(jnp.float32)
        for heads, m in folded:
            resid = resid + heads.sum(0) + m
        chunks.append(jnp.concatenate([x for heads, m in folded for x in (heads, m[None])], axis=0))
        block_resids.append(resid)
    resid = reader.logits(resid, chunks)
    return RunOutput(tuple(chunks), raw_heads, folds, resid, block_resids)


def last_position(x: jax.Array, last: jax.Array) -> jax.Array:
    """x [B, T, ...] at position last[b] for each row -> [B, ...]."""
    index = last.reshape((-1, 1) + (1,) * (x.ndim - 2))
    return jnp.take_along_axis(x, index, axis=1)[:, 0]


def final_logits(structure: Structure, weights: dict, resid_last: jax.Array) -> jax.Array:
    """Full-vocabulary logits [B, V] (float32) from the residual stream at one position [B, D]."""
    normed = rms_norm(resid_last, weights["norm"], structure.eps)
    return jnp.einsum("bd,vd->bv", normed, unembedding(structure, weights), preferred_element_type=jnp.float32)


def logit_difference(structure: Structure, weights: dict, resid_last: jax.Array, labels: jax.Array) -> jax.Array:
    """logit[c] - logit[k] per item [B] for label pairs [B, 2] = (clean, corrupted); only the two unembedding
    rows are computed, not the whole vocabulary."""
    normed = rms_norm(resid_last, weights["norm"], structure.eps)
    rows = jnp.take(unembedding(structure, weights), labels, axis=0)          # [B, 2, D]
    logits = jnp.einsum("bd,bcd->bc", normed, rows, preferred_element_type=jnp.float32)
    return logits[:, 0] - logits[:, 1]
