"""Control LLM's controlled layer: merge methods and the divergence between its branches.

A controlled layer runs the same input h through the frozen pretrained layer P and its trainable copy E,

    p = P(h),  e = E(h),  out = merge(p, e)                      (spec §3)

and reports the divergence between the branches (spec §4), which the loss adds to the cross-entropy:

    d = mean_H (e - p)^2   (mse)     or   smoothL1(relu(1 - cos(p, e)))   (cosine)
    layer loss = mean over tokens of (lambda * d),  lambda = interpolation_loss_alpha (-1: the gate w)

No stop-gradient on p: the divergence also trains earlier trainable layers through h.
"""
from __future__ import annotations

from typing import Optional

import jax
import jax.numpy as jnp

from jax_controlllm.config import ConfigError, ExpansionConfig
from jax_controlllm.model.layers import Context, decoder_layer

# ----------------------------------------------------------------------------------------------
# Merge methods
# ----------------------------------------------------------------------------------------------

def at_least_f32(x) -> jax.Array:
    """``x`` in float32, or in its own wider dtype (float64 gradient checks run the merge math in float64)."""
    return jnp.asarray(x).astype(jnp.promote_types(jnp.asarray(x).dtype, jnp.float32))


def _sigmoid_param(x) -> jax.Array:
    return jax.nn.sigmoid(at_least_f32(x)).reshape(())


SLERP_MIN_ANGLE = 1e-4  # below this angle (radians) slerp is lerp, as in the release


def slerp(p: jax.Array, e: jax.Array, t) -> jax.Array:
    """Per-token spherical interpolation in (at least) float32, falling back to lerp where the angle is tiny:
    the release's function (spec §3), with theta = arccos(p^.e^) and sin theta = sqrt(1 - cos^2 theta + 1e-8)."""
    p32, e32 = at_least_f32(p), at_least_f32(e)
    degenerate, a, b = slerp_weights(p32, e32, t)
    linear = p32 + t * (e32 - p32)
    return jnp.where(degenerate, linear, a * p32 + b * e32).astype(p.dtype)


def slerp_weights(p32: jax.Array, e32: jax.Array, t):
    """Per token [B, S, 1]: where slerp falls back to lerp (angle below SLERP_MIN_ANGLE), and slerp's weights
    sin((1-t) theta) / sin theta of p and sin(t theta) / sin theta of e (finite and with finite gradients
    everywhere, the fallback tokens included).

    Two numerical choices, neither of which changes the release's function:
    - theta is computed as 2 atan2(|p^ - e^|, |p^ + e^|), accurate near 0. arccos of a float32 cosine is
      not: equal vectors can give a cosine one ulp below 1 (theta 3.4e-4, above the fallback threshold), and
      just above the threshold its gradient is rounding noise amplified by 1 / sin theta.
    - The fallback is a ``jnp.where`` whose unused branch still gets differentiated; its inputs are made safe
      where the fallback is taken (d|x|/dx is NaN at x = 0), so that branch cannot turn zeros into NaN."""
    pn = p32 / jnp.maximum(jnp.linalg.norm(p32, axis=-1, keepdims=True), 1e-12)
    en = e32 / jnp.maximum(jnp.linalg.norm(e32, axis=-1, keepdims=True), 1e-12)
    chord, opposite = pn - en, pn + en
    angle = 2 * jnp.arctan2(jnp.linalg.norm(chord, axis=-1, keepdims=True),
                            jnp.linalg.norm(opposite, axis=-1, keepdims=True))
    degenerate = jax.lax.stop_gradient(angle) < SLERP_MIN_ANGLE
    safe_chord = jnp.where(degenerate, 1.0, chord)
    theta = 2 * jnp.arctan2(jnp.linalg.norm(safe_chord, axis=-1, keepdims=True),
                            jnp.linalg.norm(opposite, axis=-1, keepdims=True))
    sin = jnp.maximum(jnp.sqrt(jnp.sin(theta) ** 2 + 1e-8), 1e-6)
    return degenerate, jnp.sin((1 - t) * theta) / sin, jnp.sin(t * theta) / sin


def merge_weight(params: dict, method: str, h, p, e):
    """The gate w (weight of the expanded branch): a scalar or per token [B, S, 1], at least float32.
    For moe also returns the hard selection mask of the expanded branch."""
    if method in ("lerp", "slerp", "proj", "prog"):
        return _sigmoid_param(params["interpolation_factor"]), None
    if method in ("dlerp", "dlerpin"):
        fc = params["interp_weight"]["fc"]
        features = jnp.concatenate([p, e], axis=-1) if method == "dlerp" else h
        logit = jnp.einsum("bsi,io->bso", at_least_f32(features), at_least_f32(fc["kernel"]))
        return jax.nn.sigmoid(logit + at_least_f32(fc["bias"])), None
    if method == "moe":
        gate = params["gating"]["gate_network_0"]
        logits = jnp.einsum("bsi,io->bso", at_least_f32(h), at_least_f32(gate["kernel"]))
        probs = jax.nn.softmax(logits + at_least_f32(gate["bias"]), axis=-1)
        selected = (jnp.argmax(probs, axis=-1)[..., None] == 1).astype(probs.dtype)
        return probs[..., 1:2] * selected, selected
    raise ConfigError(f"expansion.merge_method: unknown method {method!r}")


def merge_coefficients(params: dict, method: str, h, p, e):
    """The merge as fixed linear maps of the branch outputs, evaluated at these inputs:

        merge(h, p, e) = c_p * (p @ lateral) + c_e * e          (no ``@ lateral`` when lateral is None)

    c_p, c_e: float32 scalars or [B, S, 1]; lateral: prog's lateral-connection kernel [D, D], else None.
    Held fixed, they make a controlled layer linear in its branches (knowledge circuits hold them at the
    clean run's values: the dlerp/dlerpin gates, slerp's weights, moe's routing)."""
    if method == "slerp":
        t = _sigmoid_param(params["interpolation_factor"])
        tiny, a, b = slerp_weights(at_least_f32(p), at_least_f32(e), t)  # tiny: slerp falls back to lerp
        return jnp.where(tiny, 1 - t, a), jnp.where(tiny, t, b), None
    w, selected = merge_weight(params, method, h, p, e)
    if method == "moe":
        return 1 - selected, selected, None
    lateral = params["lateral_connection"]["kernel"] if method == "prog" else None
    return 1 - w, w, lateral


def expanded_norm_relax(exp: ExpansionConfig) -> Optional[float]:
    """The fixed relaxed-norm share of an expanded layer's norms (None: plain, or learned per norm)."""
    alpha = exp.interpolation_norm_alpha
    return alpha if 0 < alpha <= 1 else None


def _project(params: dict, name: str, x):
    return jnp.einsum("bsi,io->bso", x, params[name]["kernel"].astype(x.dtype))


def merge(params: dict, method: str, h, p, e):
    """(merged output, gate w, pretrained term used by the divergence, moe's routing mask [B, S, 1] or None)."""
    w, selected = merge_weight(params, method, h, p, e)
    if method in ("lerp", "proj"):
        out = p + w.astype(p.dtype) * (e - p)
    elif method in ("dlerp", "dlerpin"):
        wd = w.astype(p.dtype)
        out = (1 - wd) * p + wd * e
    elif method == "slerp":
        out = slerp(p, e, w)
    elif method == "moe":
        out = jnp.where(selected.astype(bool), e, p)
    else:  # prog: lateral connection on the pretrained branch, not the identity at init
        wd = w.astype(p.dtype)
        out = (1 - wd) * _project(params, "lateral_connection", p) + wd * e
    p_div = _project(params, "linear_proj", p) if method == "proj" else p
    return out, w, p_div, selected


# ----------------------------------------------------------------------------------------------
# Divergence
# ----------------------------------------------------------------------------------------------

def divergence(p: jax.Array, e: jax.Array, kind: str) -> jax.Array:
    """Per-token divergence [B, S] in (at least) float32 between the pretrained and expanded branch outputs."""
    p32, e32 = at_least_f32(p), at_least_f32(e)
    if kind == "mse":
        return jnp.mean((e32 - p32) ** 2, axis=-1)
    # cosine, as torch.nn.functional.cosine_similarity (eps 1e-8) then smooth-L1 (beta 1) of relu(1 - cos)
    dot = jnp.sum(p32 * e32, axis=-1)
    norms = jnp.sqrt(jnp.maximum(jnp.sum(p32 * p32, -1) * jnp.sum(e32 * e32, -1), 1e-16))
    x = jax.nn.relu(1.0 - dot / norms)
    return jnp.where(x < 1.0, 0.5 * x * x, x - 0.5)


def controlled_layer(params: dict, h: jax.Array, ctx: Context, cache: Optional[dict] = None):
    """Returns (merged output, cache of both branches, aux with this layer's divergence and mean gate)."""
    relax = expanded_norm_relax(ctx.config.expansion)
    p, cache_p = decoder_layer(params["pretrained_layer"], h, ctx, None if cache is None else cache["pretrained_layer"])
    if ctx.pretrained_only:  # the base model's layer, exactly: no expanded branch, no merge, no divergence
        zero = jnp.zeros((), jnp.float32)
        kept = None if cache is None else {"pretrained_layer": cache_p, "expanded_layer": cache["expanded_layer"]}
        return p, kept, {"divergence": zero, "merge_weight": zero}
    e, cache_e = decoder_layer(params["expanded_layer"], h, ctx, None if cache is None else cache["expanded_layer"],
                               relax=relax)
    out, aux = merge_branches(params, ctx.config.expansion, h, p, e, ctx.token_mask)
    new_cache = None if cache is None else {"pretrained_layer": cache_p, "expanded_layer": cache_e}
    return out, new_cache, aux


def merge_branches(params: dict, exp: ExpansionConfig, h, p, e, token_mask):
    """Merge the branch outputs p, e of a controlled layer with input h; returns (output, aux) where aux holds
    the layer's divergence (spec §4) and its mean gate over real tokens (``token_mask`` [B, S], 1 = real)."""
    out, w, p_div, routed = merge(params, exp.merge_method, h, p, e)
    d = divergence(p_div, e, exp.interpolation_loss_type)
    if routed is not None:  # moe: tokens not routed to the expanded branch add zero but still count (spec §5)
        d = d * routed[..., 0]
    lam = exp.interpolation_loss_alpha
    gate = jnp.broadcast_to(w, d.shape + (1,))[..., 0]
    weight = gate if lam == -1 else lam
    tokens = token_mask if exp.divergence_mask == "tokens" else jnp.ones_like(token_mask)
    count = jnp.maximum(jnp.sum(tokens), 1.0)
    real = jnp.maximum(jnp.sum(token_mask), 1.0)
    return out, {"divergence": jnp.sum(weight * d * tokens) / count, "merge_weight": jnp.sum(gate * token_mask) / real}
