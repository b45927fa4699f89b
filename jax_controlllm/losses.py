"""Training loss: masked next-token cross-entropy + Control LLM divergence (spec §4).

    total = CE + mean over controlled layers of (mean over tokens of lambda * d)

CE convention (Hugging Face label shift): logits at position t are scored against labels[t + 1]; the last
position has no target; label -100 is skipped; in packed rows a target in another document (segment) than
position t is skipped too, so the model is never trained to guess the next document's first token.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from jax_controlllm.config import ModelConfig
from jax_controlllm.model.stack import final_hidden, head_kernel

IGNORE = -100


def next_token_targets(labels: jax.Array, segment_ids=None):
    """(targets [B, S-1] with ignored entries set to 0, valid mask [B, S-1] float32)."""
    targets = labels[:, 1:]
    valid = targets != IGNORE
    if segment_ids is not None:
        valid = valid & (segment_ids[:, 1:] == segment_ids[:, :-1]) & (segment_ids[:, 1:] > 0)
    return jnp.where(valid, targets, 0), valid.astype(jnp.float32)


def _head_logits(x, kernel):
    return jnp.einsum("bsh,hv->bsv", x, kernel, preferred_element_type=jnp.float32)


def _chunk_nll(kernel, h_chunk, targets, valid):
    """(the chunk's NLL sum over valid targets, a function giving d/dlogits of that sum: (softmax - onehot) *
    valid)."""
    logits = _head_logits(h_chunk, kernel)
    lse = jax.nn.logsumexp(logits, axis=-1)
    nll = jnp.sum((lse - jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]) * valid)

    def dlogits():
        onehot = jax.nn.one_hot(targets, logits.shape[-1], dtype=jnp.float32)
        return (jnp.exp(logits - lse[..., None]) - onehot) * valid[..., None]
    return nll, dlogits


def _chunk_kl(kernel, h_chunk, base_chunk, where):
    """(the chunk's sum over ``where`` of KL(base || model), both distributions from the one head in float32, the
    base's read from ``base_chunk`` and held fixed; a function giving d/dlogits of that sum: (softmax(model) -
    p_base) * where)."""
    model = jax.nn.log_softmax(_head_logits(h_chunk, kernel), axis=-1)
    base = jax.nn.log_softmax(_head_logits(base_chunk, kernel), axis=-1)
    p = jnp.exp(base)
    kl = jnp.sum(jnp.sum(p * (base - model), axis=-1) * where)
    return kl, lambda: (jnp.exp(model) - p) * where[..., None]


def _fused_head_loss(chunk_loss):
    """``f(h, kernel, a, b)``: the sum over chunks (``h [n, B, c, H]``, ``a`` and ``b`` [n, B, c, ...]) of
    ``chunk_loss(kernel, h_chunk, a_chunk, b_chunk)``, with a fused backward: under differentiation the forward
    pass computes each chunk's logits once and turns them straight into d/dh (and d/dW only when the head itself
    is differentiated, e.g. full tuning), so the backward pass neither keeps nor recomputes any [B, c, V] logits:
    one 128k-vocabulary matmul per chunk fewer than remat. d/dlogits is rounded once to the compute dtype (as
    mixed-precision autocast does: a float32 cotangent would promote the 128k-vocabulary matmuls to float32, TF32
    on GPUs). ``a`` and ``b`` get no gradient. Without differentiation (evaluation) only the plain forward runs."""
    def loss_only(h, kernel, a, b):
        def body(total, xs):
            return total + chunk_loss(kernel, *xs)[0], None
        return jax.lax.scan(body, jnp.float32(0), (h, a, b))[0]

    def forward_with_grads(h, kernel, a, b):
        # symbolic_zeros=True: each argument says whether it is being differentiated (``perturbed``)
        kernel_grad = kernel.perturbed
        h, kernel, a, b = h.value, kernel.value, a.value, b.value

        def body(carry, xs):
            total, dk = carry
            loss, dlogits_of = chunk_loss(kernel, *xs)
            h_chunk = xs[0]
            dlogits = dlogits_of().astype(h_chunk.dtype)
            dh = jnp.einsum("bsv,hv->bsh", dlogits, kernel, preferred_element_type=jnp.float32).astype(h_chunk.dtype)
            if kernel_grad:
                dk = dk + jnp.einsum("bsh,bsv->hv", h_chunk, dlogits, preferred_element_type=jnp.float32)
            return (total + loss, dk), dh

        dk0 = jnp.zeros(kernel.shape if kernel_grad else (), jnp.float32)
        (total, dk), dh = jax.lax.scan(body, (jnp.float32(0), dk0), (h, a, b))
        return total, (dh, dk if kernel_grad else None, jnp.zeros((), kernel.dtype))

    def backward(res, g):
        dh, dk, kernel_dtype = res
        if isinstance(g, jax.custom_derivatives.SymbolicZero):
            g = jnp.float32(0)
        dh = (dh.astype(jnp.float32) * g).astype(dh.dtype)
        return dh, None if dk is None else (dk * g).astype(kernel_dtype.dtype), None, None

    fused = jax.custom_vjp(loss_only)
    fused.defvjp(forward_with_grads, backward, symbolic_zeros=True)
    return fused


# fused_head_nll(h, kernel, targets, valid): the NLL sum; fused_head_kl(h, kernel, base_h, where): the KL sum.
fused_head_nll = _fused_head_loss(_chunk_nll)
fused_head_kl = _fused_head_loss(_chunk_kl)


def _in_chunks(config: ModelConfig, *xs):
    """Each [B, S, ...] array as [n, B, c, ...]: ``config.loss_chunk`` positions per chunk (0: one chunk), the
    sequence zero-padded to a whole number of chunks (padded positions carry a zero mask)."""
    b, s = xs[0].shape[:2]
    chunk = config.loss_chunk if config.loss_chunk and config.loss_chunk < s else s
    pad, n = -s % chunk, -(-s // chunk)

    def split(x):
        x = jnp.pad(x, ((0, 0), (0, pad)) + ((0, 0),) * (x.ndim - 2)) if pad else x
        return jnp.moveaxis(x.reshape(b, n, chunk, *x.shape[2:]), 1, 0)

    return [split(x) for x in xs]


def cross_entropy_sum(config: ModelConfig, params: dict, h: jax.Array, labels, segment_ids=None):
    """(sum of token NLLs, number of scored tokens). The LM head runs in sequence chunks of
    ``config.loss_chunk`` positions (0: one chunk) with a fused backward (``fused_head_nll``), so
    full-vocabulary logits of more than one chunk never sit in memory."""
    targets, valid = next_token_targets(labels, segment_ids)
    kernel = head_kernel(config, params).astype(h.dtype)
    h_chunks, target_chunks, valid_chunks = _in_chunks(config, h[:, :-1], targets, valid)
    total = fused_head_nll(h_chunks, kernel, target_chunks, valid_chunks)
    return total, jnp.sum(valid)


def untargeted_positions(labels, token_mask, segment_ids=None) -> jax.Array:
    """[B, S-1] float32: positions t whose next token is real text of the same document without a language-
    modelling target (alignment text, prompts): where the distillation term compares next-token distributions."""
    real = (token_mask[:, :-1] > 0) & (token_mask[:, 1:] > 0)
    if segment_ids is not None:
        real = real & (segment_ids[:, 1:] == segment_ids[:, :-1])
    return (real & (labels[:, 1:] == IGNORE)).astype(jnp.float32)


def distillation_sum(config: ModelConfig, params: dict, h: jax.Array, batch: dict, where: jax.Array):
    """(sum over positions ``where`` of KL(base || model) of the next-token distributions, number of positions).
    The base is the frozen pretrained model inside the expanded one (every controlled layer's pretrained branch
    alone), run here without gradient; ``h``: the trained model's final hidden state of the same batch. The head
    runs in ``config.loss_chunk`` chunks with a fused backward (``fused_head_kl``)."""
    base_h = final_hidden(config, params, batch["input_ids"], batch.get("attention_mask"), batch.get("positions"),
                          batch.get("segment_ids"), pretrained_only=True)
    kernel = head_kernel(config, params).astype(h.dtype)
    chunks = _in_chunks(config, h[:, :-1], jax.lax.stop_gradient(base_h[:, :-1]).astype(h.dtype), where)
    return fused_head_kl(chunks[0], kernel, chunks[1], chunks[2]), jnp.sum(where)


@functools.partial(jax.jit, static_argnums=0, static_argnames=("distill",))
def controlllm_loss(config: ModelConfig, params: dict, batch: dict, lora_rng=None, distill: bool = False) -> dict:
    """CE + divergence for a batch dict with input_ids and optionally labels (default: input_ids),
    attention_mask, segment_ids, positions. Returns ce, divergence, divergence_per_layer (by block index),
    merge_weight_per_layer, total, and tokens (number of scored tokens). ``lora_rng``: LoRA dropout key.
    ``distill``: also ``distill``, the mean KL(base || model) over the untargeted positions (``train.
    distill_weight``; not in ``total``), and ``distill_tokens``, their number."""
    input_ids = jnp.asarray(batch["input_ids"])
    labels = jnp.asarray(batch.get("labels", input_ids))
    segment_ids = batch.get("segment_ids")
    h, aux, ctx = final_hidden(config, params, input_ids, batch.get("attention_mask"), batch.get("positions"),
                               segment_ids, return_aux=True, lora_rng=lora_rng)
    nll, tokens = cross_entropy_sum(config, params, h, labels, segment_ids)
    ce = nll / jnp.maximum(tokens, 1.0)
    if aux:
        per_layer = jnp.stack([a["divergence"] for a in aux])
        merge_weights = jnp.stack([a["merge_weight"] for a in aux])
        div = jnp.mean(per_layer)
    else:
        per_layer = merge_weights = jnp.zeros((0,), jnp.float32)
        div = jnp.float32(0)
    out = {"ce": ce, "divergence": div, "divergence_per_layer": per_layer,
           "merge_weight_per_layer": merge_weights, "total": ce + div, "tokens": tokens}
    if distill:
        kl_sum, count = distillation_sum(config, params, h, batch,
                                         untargeted_positions(labels, ctx.token_mask, segment_ids))
        out |= {"distill": kl_sum / jnp.maximum(count, 1.0), "distill_tokens": count}
    return out
