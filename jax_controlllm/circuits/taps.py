"""Zero-valued taps whose gradients are attribution scores (custom VJPs).

A destination v reads ``x_v = x + sum_s c[s, v] delta_s`` with c = 0. Its value is just x, and

    dL/dc[s, v] = sum_{b,t,d} delta_s[b,t,d] * dL/dx_v[b,t,d]

is exactly the EAP score of edge s -> v. Both taps are evaluated at c = 0 only, which lets the forward pass
skip the (zero) einsum and the backward pass contract each destination's gradient with the deltas right
where it is produced: no [n_dst, T, D] gradient for the whole model is ever held.

``deltas`` is a tuple of source-major difference tensors [S_i, B, T, D] (the input, then one per block)
whose rows together are the tap's sources. They are the very buffers of the delta run: a tap never slices or
concatenates them (with 16 layers, per-tap copies of prefix slices would cost tens of GB and as much memory
traffic); its backward pass contracts with each group and concatenates the small [S_i, V] results.

``tap`` sits on the (pre-norm) input itself. ``norm_tap`` sits after the input RMSNorm of the attention heads:
the norm is computed once on the shared residual stream, while the 3H private q/k/v copies exist only as
the normalised tensor; the backward pass applies the norm's Jacobian analytically,

    N(x) = a x + (1 - a) w * x r,  r = (mean(x^2) + eps)^(-1/2)         (a = 0: plain RMSNorm)
    g . J delta = sum_d delta_d g_d (a + (1 - a) r w_d) - (1 - a) (r^3 / D) (x . delta) (sum_d g_d w_d x_d)

so no per-copy float32 normalisation is computed or stored.
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import partial
from typing import Optional

import jax
import jax.numpy as jnp


def _zeros_like(tree):
    return jax.tree.map(jnp.zeros_like, tree)


def _contract(deltas: tuple, g: jax.Array) -> jax.Array:
    """sum_{b,t,d} delta[s, b, t, d] g[v, b, t, d] for the stacked groups -> [S, V] float32."""
    return jnp.concatenate([jnp.einsum("sbtd,vbtd->sv", d, g.astype(d.dtype), preferred_element_type=jnp.float32)
                            for d in deltas], axis=0)


@jax.custom_vjp
def tap(x: jax.Array, coeff: jax.Array, deltas: tuple) -> jax.Array:
    """x [V, B, T, D] (one input per destination), coeff [S, V] zeros with S = sum of the groups' rows;
    returns x. Gradient w.r.t. coeff: sum_{b,t,d} delta[s, b, t, d] g[v, b, t, d]."""
    return x


def _tap_fwd(x, coeff, deltas):
    return x, deltas


def _tap_bwd(deltas, g):
    return g, _contract(deltas, g), _zeros_like(deltas)


tap.defvjp(_tap_fwd, _tap_bwd)


@partial(jax.custom_vjp, nondiff_argnums=(6,))
def norm_tap(normed: jax.Array, x: jax.Array, weight: jax.Array, mix: jax.Array, coeff: jax.Array,
             deltas: tuple, eps: float) -> jax.Array:
    """normed [V, B, T, D]: the RMSNorm of x [B, T, D] broadcast to V destinations; returns it. Gradient
    w.r.t. coeff [S, V]: the score of a tap on each destination's *pre-norm* input (module docstring)."""
    return normed


def _norm_tap_fwd(normed, x, weight, mix, coeff, deltas, eps):
    return normed, (x, weight, mix, deltas)


def _norm_tap_bwd(eps, residuals, g):
    x, weight, mix, deltas = residuals
    x32, w32, a = x.astype(jnp.float32), weight.astype(jnp.float32), mix.astype(jnp.float32)
    r = jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + eps)             # [B, T, 1]
    scale = a + (1 - a) * r * w32                                                       # [B, T, D]
    main = _contract(deltas, g.astype(jnp.float32) * scale)
    # x . delta_s per token: a fused multiply-reduce (an einsum here would transpose the deltas)
    x_dot_delta = jnp.concatenate([jnp.sum(d.astype(jnp.float32) * x32, axis=-1) for d in deltas], axis=0)
    g_dot_wx = jnp.sum(g.astype(jnp.float32) * (w32 * x32), axis=-1)                  # [V, B, T]
    weight_bt = (1 - a) * r[..., 0] ** 3 / x.shape[-1]                                  # [B, T]
    dcoeff = main - jnp.einsum("sbt,vbt->sv", x_dot_delta * weight_bt, g_dot_wx)
    return g, jnp.zeros_like(x), jnp.zeros_like(weight), jnp.zeros_like(mix), dcoeff, _zeros_like(deltas)


norm_tap.defvjp(_norm_tap_fwd, _norm_tap_bwd)


@dataclass
class TappedInput:
    """What a tap reader hands the attention heads instead of an input array: the shared residual stream and
    the tap to put on its 3H normalised copies, ordered (q/k/v, head) (see nodes.normed_inputs)."""
    resid: jax.Array                 # [B, T, D]
    coeff: jax.Array                 # [S, 3H] zeros
    deltas: tuple                    # source groups [S_i, B, T, D], S = sum S_i

    def normed_copies(self, normed: jax.Array, weight: jax.Array, mix: Optional[jax.Array], eps: float,
                      part: int, heads: int) -> jax.Array:
        """normed [B, T, D] -> the ``heads`` copies [heads, B, T, D] of q (part 0), k (1) or v (2), carrying
        their taps. One tap per part: the backward pass never assembles a [3H, B, T, D] cotangent."""
        broadcast = jnp.broadcast_to(normed[None], (heads,) + normed.shape)
        mix = jnp.zeros((), jnp.float32) if mix is None else jnp.asarray(mix, jnp.float32)
        coeff = self.coeff[:, part * heads:(part + 1) * heads]
        return norm_tap(broadcast, self.resid, weight, mix, coeff, self.deltas, eps)
