"""FP8 matmuls for the frozen weights (``model.frozen_matmul: fp8 | fp8_backward``).

Frozen weights never change, so their quantisation is static: each frozen block kernel W becomes
e4m3 values and one per-tensor scale s_W (per layer in a scanned stack), W ~ s_W q_W. A projection of x then
runs as FP8 GEMMs:

    forward          y  = (s_x q_x) @ (s_W q_W)         q_x: x in e4m3, s_x from amax(|x|) of this call
    input gradient   dx = (s_g q_g) @ (s_W q_W)^T       q_g: dy in e5m2 (the wider range gradients need)

``fp8`` runs both in FP8. ``fp8_backward`` keeps the forward exact (x @ W in the compute dtype) and runs only the
input gradient in FP8: the model trained is then the same function as without it, and only its gradients are
approximate. That matters for Control LLM: with an FP8 forward the frozen branch's quantisation error is part of
the divergence the expanded branch is pulled towards, and the model is trained against outputs it does not
produce when evaluated or exported in the compute dtype (measured on SmolLM2 in the README: "FP8 on a real run").
No weight gradient exists (the weights are frozen), so no other matmul changes. Scales are powers of two, so
they are exact in every format and ``q.astype(bf16) * s`` is the dequantised value bit for bit; the scale puts
amax(|x|) in the top binade of the format (no overflow, one binade of headroom lost at most).

Each GEMM is a dot of the FP8 operands themselves with the scales applied to its output, the form XLA
lowers to one cuBLASLt FP8 call on Hopper; elsewhere (CPU) it runs as written, with the same numbers up to
accumulation order, which is how the tests check it. Trainable weights (the expanded branches, LoRA
adapters), the embeddings and the LM head keep the compute dtype.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

FORWARD_DTYPE = jnp.float8_e4m3fn     # activations and weights
GRADIENT_DTYPE = jnp.float8_e5m2      # output gradients in the backward pass
LAYERS_KEY = "layers"                 # the params subtree whose kernels are block projections


def pow2_scale(x: jax.Array, dtype, axes=None) -> jax.Array:
    """The smallest power of two s with amax(|x|) / s <= the format's largest value (float32, reduced over
    ``axes``; all of x when None). An all-zero x gets the scale of amax = 1, which quantises it to zeros."""
    amax = jnp.max(jnp.abs(x.astype(jnp.float32)), axis=axes)
    amax = jnp.where(amax > 0, amax, 1.0)   # guard the input of log2, not only its output
    return jnp.exp2(jnp.ceil(jnp.log2(amax / float(jnp.finfo(dtype).max))))


def quantize(x: jax.Array, dtype, scale: jax.Array) -> jax.Array:
    """x / scale rounded to the FP8 ``dtype`` (saturating at the format's largest value)."""
    top = float(jnp.finfo(dtype).max)
    return jnp.clip(x.astype(jnp.float32) / scale, -top, top).astype(dtype)


def _fp8_dot(a_q, a_scale, b_q, b_scale, contract_b: int, dtype) -> jax.Array:
    """(a_scale a_q) @ b_q contracted over a's last axis and b's axis ``contract_b``, as one GEMM of FP8
    operands with ``dtype`` output, scaled after: the form XLA lowers to cuBLASLt's FP8 matmul on Hopper
    (``__cublas$lt$matmul$f8``; a dequantise-then-dot form is run as a bf16 GEMM instead: measured on the
    H200, bench/README.md). Power-of-two scales make the output scaling exact."""
    dims = (((a_q.ndim - 1,), (contract_b,)), ((), ()))
    y = jax.lax.dot_general(a_q, b_q, dims, preferred_element_type=dtype)
    return y * (a_scale * b_scale).astype(dtype)


@jax.custom_vjp
def fp8_matmul(x: jax.Array, kernel_q: jax.Array, kernel_scale: jax.Array) -> jax.Array:
    """x [..., in] (compute dtype) @ the frozen kernel given as e4m3 values [in, out] and its scale (scalar),
    both GEMMs (forward, input gradient) in FP8. Returns [..., out] in x's dtype."""
    return _forward(x, kernel_q, kernel_scale)[0]


def _forward(x, kernel_q, kernel_scale):
    x_scale = pow2_scale(x, FORWARD_DTYPE)
    y = _fp8_dot(quantize(x, FORWARD_DTYPE, x_scale), x_scale, kernel_q, kernel_scale, 0, x.dtype)
    return y, (kernel_q, kernel_scale)


def _backward(residuals, dy):
    kernel_q, kernel_scale = residuals
    dy_scale = pow2_scale(dy, GRADIENT_DTYPE)
    dx = _fp8_dot(quantize(dy, GRADIENT_DTYPE, dy_scale), dy_scale, kernel_q, kernel_scale, 1, dy.dtype)
    return dx, jnp.zeros_like(kernel_q), jnp.zeros_like(kernel_scale)   # frozen: no weight gradient


fp8_matmul.defvjp(_forward, _backward)


@jax.custom_vjp
def fp8_backward_matmul(x: jax.Array, kernel: jax.Array, kernel_q: jax.Array, kernel_scale: jax.Array
                        ) -> jax.Array:
    """x @ kernel exactly (in x's dtype); its input gradient through the kernel's e4m3 values and scale in FP8."""
    return jnp.einsum("...i,io->...o", x, kernel.astype(x.dtype))


def _exact_forward(x, kernel, kernel_q, kernel_scale):
    return fp8_backward_matmul(x, kernel, kernel_q, kernel_scale), (kernel, kernel_q, kernel_scale)


def _fp8_input_gradient(residuals, dy):
    kernel, kernel_q, kernel_scale = residuals
    dx = _backward((kernel_q, kernel_scale), dy)[0]
    return dx, jnp.zeros_like(kernel), jnp.zeros_like(kernel_q), jnp.zeros_like(kernel_scale)


fp8_backward_matmul.defvjp(_exact_forward, _fp8_input_gradient)


def quantize_frozen_kernels(frozen: dict, forward: bool = True) -> dict:
    """The frozen parameter tree with every block projection kernel (under ``layers``) quantised to e4m3, with a
    ``kernel_scale`` beside it: one scale per kernel, per layer for a scanned stack [L, in, out]. ``forward``
    (``fp8``): the e4m3 values replace ``kernel`` and ``layers.dense`` runs ``fp8_matmul``; otherwise
    (``fp8_backward``) they sit beside it as ``kernel_grad_fp8`` and ``dense`` runs ``fp8_backward_matmul``.
    Leaves elsewhere are returned as they are."""
    def walk(node: dict, in_layers: bool) -> dict:
        kernel = node.get("kernel")
        if in_layers and kernel is not None and getattr(kernel, "ndim", 0) >= 2:
            axes = (kernel.ndim - 2, kernel.ndim - 1)
            scale = pow2_scale(kernel, FORWARD_DTYPE, axes)
            values = quantize(kernel, FORWARD_DTYPE, scale[..., None, None])
            if forward:
                return {**node, "kernel": values, "kernel_scale": scale}
            return {**node, "kernel_grad_fp8": values, "kernel_scale": scale}
        return {key: walk(value, in_layers or key == LAYERS_KEY) if isinstance(value, dict) else value
                for key, value in node.items()}
    return walk(frozen, False)
