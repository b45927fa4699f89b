"""Llama layer math as pure functions (Hugging Face semantics, rotate-half RoPE layout).

    plain block:  a = h + o(attn(norm1(h)));  out = a + down(silu(gate(n)) * up(n)),  n = norm2(a)

RMSNorm (optionally Control LLM's relaxed norm), RoPE (default / linear / llama3 scaling), grouped-query
attention (masked softmax or cuDNN), SwiGLU and the decoder layer. The controlled layer (control.py) and the
stack of blocks (stack.py) are built from these.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np
from jax.ad_checkpoint import checkpoint_name

from jax_controlllm.config import ModelConfig
from jax_controlllm.model.fp8 import fp8_backward_matmul, fp8_matmul
from jax_controlllm.model.lora import lora_update
from jax_controlllm.sharding import constrain

# ----------------------------------------------------------------------------------------------
# Rotary position embedding (Hugging Face rotate-half layout; default / linear / llama3 scaling)
# ----------------------------------------------------------------------------------------------

def rope_inv_freq(config: ModelConfig) -> np.ndarray:
    dim = config.head_dim
    inv = 1.0 / (config.rope_theta ** (np.arange(0, dim, 2, dtype=np.int64).astype(np.float32) / dim))
    inv = inv.astype(np.float32)
    scaling = config.rope_scaling or {}
    kind = scaling.get("rope_type", scaling.get("type", "default"))
    if kind == "linear":
        inv = inv / np.float32(scaling["factor"])
    elif kind == "llama3":
        factor = scaling["factor"]
        low, high = scaling["low_freq_factor"], scaling["high_freq_factor"]
        old_ctx = scaling["original_max_position_embeddings"]
        wavelen = 2 * np.pi / inv
        scaled = np.where(wavelen > old_ctx / low, inv / factor, inv)
        smooth = (old_ctx / wavelen - low) / (high - low)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        medium = ~(wavelen < old_ctx / high) & ~(wavelen > old_ctx / low)
        inv = np.where(medium, smoothed, scaled).astype(np.float32)
    return inv


def rope_tables(config: ModelConfig, positions: jax.Array) -> tuple[jax.Array, jax.Array]:
    """cos, sin of shape [B, S, head_dim] (float32) for integer positions [B, S]."""
    inv = jnp.asarray(rope_inv_freq(config))
    freqs = positions.astype(jnp.float32)[..., None] * inv
    emb = jnp.concatenate([freqs, freqs], axis=-1)
    return jnp.cos(emb), jnp.sin(emb)


def apply_rope(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
    """x: [B, S, heads, head_dim]."""
    half = x.shape[-1] // 2
    rotated = jnp.concatenate([-x[..., half:], x[..., :half]], axis=-1)
    cos, sin = cos[:, :, None, :].astype(x.dtype), sin[:, :, None, :].astype(x.dtype)
    return x * cos + rotated * sin


# ----------------------------------------------------------------------------------------------
# Building blocks
# ----------------------------------------------------------------------------------------------

@dataclass
class Context:
    """What every layer needs besides its weights and input; built once per forward pass."""
    config: ModelConfig
    cos: jax.Array                   # [B, S, head_dim]
    sin: jax.Array
    mask: Optional[jax.Array]        # [B, 1, S, T] bool: may query s attend to key t
    token_mask: jax.Array            # [B, S] float32: 1 for real tokens (divergence averaging)
    segment_ids: Optional[jax.Array] = None
    cache_index: Optional[jax.Array] = None   # decoding: slot where this chunk's keys are written
    lora_rng: Optional[jax.Array] = None      # training steps: LoRA dropout key (per block inside the stack)
    pretrained_only: bool = False             # the base model's forward: controlled layers run their frozen branch


def dense(x: jax.Array, p: dict, dtype) -> jax.Array:
    """x @ kernel (+ bias). A frozen weight quantised to FP8 (``model.frozen_matmul``, model/fp8.py) runs both of
    its GEMMs in FP8 (``kernel`` is e4m3 with a ``kernel_scale``) or only its input gradient (``kernel_grad_fp8``
    beside the kernel)."""
    if "kernel_grad_fp8" in p:
        y = fp8_backward_matmul(x.astype(dtype), p["kernel"], p["kernel_grad_fp8"], p["kernel_scale"])
    elif "kernel_scale" in p:
        y = fp8_matmul(x.astype(dtype), p["kernel"], p["kernel_scale"])
    else:
        y = jnp.einsum("...i,io->...o", x, p["kernel"].astype(dtype))
    if "bias" in p:
        y = y + p["bias"].astype(dtype)
    return y


def project(x: jax.Array, p: dict, name: str, ctx: Optional[Context] = None) -> jax.Array:
    """The projection ``p[name]`` of x, plus its LoRA update when it has an adapter: every linear map of a block
    goes through here, so a LoRA model runs the same forward as the plain one (``ctx``: needed with adapters)."""
    y = dense(x, p[name], x.dtype)
    if "lora_a" in p[name]:
        y = y + lora_update(x, p[name], name, ctx.config.lora, ctx.lora_rng)
    return y


def rms_norm(x: jax.Array, p: dict, eps: float, relax: Optional[float] = None) -> jax.Array:
    """weight * x / sqrt(mean(x^2) + eps) in float32; optionally Control LLM's relaxed norm
    ``a x + (1 - a) RMSNorm(x)`` with a fixed ``relax`` = a, or a learned one from ``interpolation_factor``."""
    x32 = x.astype(jnp.float32)
    normed = (x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + eps)).astype(x.dtype)
    out = p["weight"].astype(x.dtype) * normed
    a = norm_mix(p, relax)
    if a is not None:
        out = (a * x32 + (1 - a) * out.astype(jnp.float32)).astype(x.dtype)
    return out


def norm_mix(p: dict, relax: Optional[float] = None):
    """The share a of the raw input in a relaxed norm ``a x + (1 - a) RMSNorm(x)``: learned (from
    ``interpolation_factor``), the fixed ``relax``, or None for a plain RMSNorm."""
    if "interpolation_factor" in p:
        return jnp.clip(2 * jax.nn.sigmoid(p["interpolation_factor"].astype(jnp.float32)) - 1, 0, 1)
    return relax or None


def attention_weights_xla(q, k, v, mask):
    """Masked softmax attention with GQA. q [B,S,Hq,D], k/v [B,T,Hkv,D], mask [B,1,S,T] -> [B,S,Hq,D]."""
    b, s, hq, d = q.shape
    probs = attention_probs(q, k, mask).astype(v.dtype)
    out = jnp.einsum("bkgst,btkd->bskgd", probs, v)
    return out.reshape(b, s, hq, d)


def attention_probs(q, k, mask) -> jax.Array:
    """The softmax attention pattern [B, Hkv, G, S, T] (float32) of q [B,S,Hq,D], k [B,T,Hkv,D]; query head
    k * G + g (G = Hq // Hkv) is [:, k, g]."""
    b, s, hq, d = q.shape
    hkv = k.shape[2]
    q = q.reshape(b, s, hkv, hq // hkv, d)
    scores = jnp.einsum("bskgd,btkd->bkgst", q, k, preferred_element_type=jnp.float32) * (d ** -0.5)
    if mask is not None:
        scores = jnp.where(mask[:, :, None], scores, jnp.finfo(jnp.float32).min)
    return jax.nn.softmax(scores, axis=-1)


def attention_weights_cudnn(q, k, v, ctx: Context):
    """Fused attention (cuDNN flash) on GPU, causal. Rows holding one document each (the common case of
    unpacked data) take the fast causal kernel; packed rows take cuDNN with the dense segment mask (about
    half the speed). The choice is made per batch at run time, so one compiled step serves both."""
    if ctx.cache_index is not None or ctx.mask is None:
        return attention_weights_xla(q, k, v, ctx.mask)

    def causal(q, k, v):
        return jax.nn.dot_product_attention(q, k, v, is_causal=True, implementation="cudnn")

    if ctx.segment_ids is None:
        return causal(q, k, v)

    def masked(q, k, v):
        return jax.nn.dot_product_attention(q, k, v, mask=ctx.mask, implementation="cudnn")

    seg = ctx.segment_ids
    one_document = jnp.all((seg == seg[:, :1]) & (seg > 0))
    return jax.lax.cond(one_document, causal, masked, q, k, v)


def self_attention(p: dict, x: jax.Array, ctx: Context, cache: Optional[dict]):
    c, dt = ctx.config, x.dtype
    b, s, _ = x.shape
    q = project(x, p, "q_proj", ctx).reshape(b, s, c.num_attention_heads, c.head_dim)
    k = project(x, p, "k_proj", ctx).reshape(b, s, c.num_key_value_heads, c.head_dim)
    v = project(x, p, "v_proj", ctx).reshape(b, s, c.num_key_value_heads, c.head_dim)
    q = checkpoint_name(constrain(apply_rope(q, ctx.cos, ctx.sin), ("act_batch", "act_seq", "act_heads", None)),
                        "query")
    k = checkpoint_name(constrain(apply_rope(k, ctx.cos, ctx.sin), ("act_batch", "act_seq", "act_kv_heads", None)),
                        "key")
    v = checkpoint_name(v, "value")
    if cache is not None:  # decoding: write this chunk's keys/values at cache_index, attend over the cache
        k = jax.lax.dynamic_update_slice_in_dim(cache["k"], k.astype(cache["k"].dtype), ctx.cache_index, 1)
        v = jax.lax.dynamic_update_slice_in_dim(cache["v"], v.astype(cache["v"].dtype), ctx.cache_index, 1)
        cache = {"k": k, "v": v}
        k, v = k.astype(dt), v.astype(dt)
    if c.attention_impl == "cudnn":
        out = attention_weights_cudnn(q, k, v, ctx)
    else:
        out = attention_weights_xla(q, k, v, ctx.mask)
    out = checkpoint_name(out.reshape(b, s, c.num_attention_heads * c.head_dim), "attention")
    return project(out, p, "o_proj", ctx), cache


def dense_per_head(x: jax.Array, p: dict, n_heads: int, dtype, take=None) -> jax.Array:
    """A q/k/v projection computed head by head -> [B, S, H, head_dim]. ``x`` is [B, S, D] (shared by every
    head) or [H, B, S, D] (head i reads its own input x[i]); ``take`` [H] picks, for each of the H output
    heads, one of the projection's ``n_heads`` (a key/value head serving several query heads under GQA).
    Equals ``dense`` + reshape (up to rounding); the knowledge-circuit graph gives each head private inputs."""
    kernel = p["kernel"].reshape(p["kernel"].shape[0], n_heads, -1).astype(dtype)       # [D, n, head_dim]
    bias = p["bias"].reshape(n_heads, -1).astype(dtype) if "bias" in p else None
    if take is not None:
        kernel, bias = kernel[:, take], (None if bias is None else bias[take])
    y = jnp.einsum("bsd,dhk->bshk" if x.ndim == 3 else "hbsd,dhk->bshk", x, kernel)
    return y if bias is None else y + bias


def head_outputs(z: jax.Array, p: dict, dtype) -> jax.Array:
    """Each head's share z_h W_O[h] of the attention output, [H, B, S, D], from the per-head attention
    output z [B, S, H, head_dim]: their sum plus ``p["bias"]`` (if any) is ``dense(z, p)``."""
    h = z.shape[2]
    kernel = p["kernel"].reshape(h, -1, p["kernel"].shape[-1]).astype(dtype)            # [H, head_dim, D]
    return jnp.einsum("bshk,hkd->hbsd", z, kernel)


def mlp(p: dict, x: jax.Array, ctx: Optional[Context] = None) -> jax.Array:
    gate = checkpoint_name(project(x, p, "gate_proj", ctx), "mlp_gate")
    hidden = jax.nn.silu(gate) * checkpoint_name(project(x, p, "up_proj", ctx), "mlp_up")
    hidden = constrain(hidden, ("act_batch", "act_seq", "act_mlp"))
    return project(hidden, p, "down_proj", ctx)


def decoder_layer(p: dict, h: jax.Array, ctx: Context, cache: Optional[dict] = None,
                  relax: Optional[float] = None):
    """One Llama block with both residual additions. Returns (output, updated cache)."""
    eps = ctx.config.rms_norm_eps
    attn, cache = self_attention(p["self_attn"], rms_norm(h, p["input_layernorm"], eps, relax), ctx, cache)
    h = checkpoint_name(h + attn, "attention_residual")
    h = h + mlp(p["mlp"], rms_norm(h, p["post_attention_layernorm"], eps, relax), ctx)
    return checkpoint_name(constrain(h, ("act_batch", "act_seq", "act_embed")), "layer_output"), cache
