"""Gradients of every merge method and of the divergence against float64 finite differences, at
initialisation (both branches equal: slerp's angle is 0), just off it and at perturbed weights; moe's
divergence against an independent computation from the branch outputs and the routing (spec §4, §5)."""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jax_controlllm.config import MERGE_METHODS, ExpansionConfig, ModelConfig
from jax_controlllm.model.control import merge_branches, slerp
from jax_controlllm.model.params import init_params, unstack_blocks

H, B, S = 8, 2, 3


@functools.cache
def _initial_merge_params(method: str) -> dict:
    """The initial merge parameters of a one-layer controlled model (they do not depend on the loss settings)."""
    exp = ExpansionConfig("concat", 1, merge_method=method, layers=[0], freeze_interpolation_factor=False,
                          num_ori_layers=1)
    config = ModelConfig(vocab_size=8, hidden_size=H, intermediate_size=8, num_hidden_layers=1,
                         num_attention_heads=1, num_key_value_heads=1, expansion=exp)
    block = unstack_blocks(config, init_params(config, jax.random.key(3)))[0]
    return jax.tree.map(np.asarray, {k: v for k, v in block.items() if k not in ("pretrained_layer", "expanded_layer")})


def _merge_params(method: str, **exp_kw) -> tuple[ExpansionConfig, dict]:
    exp = ExpansionConfig("concat", 1, merge_method=method, layers=[0], freeze_interpolation_factor=False,
                          num_ori_layers=1, **exp_kw)
    return exp, jax.tree.map(lambda x: np.asarray(x, np.float64), _initial_merge_params(method))


def _inputs(offset: float, seed: int = 0):
    """(h, p, e, token_mask) with e = p + offset * noise (offset 0: the expanded branch is an exact copy)."""
    rng = np.random.default_rng(seed)
    h, p = rng.normal(size=(2, B, S, H))
    e = p + offset * rng.normal(size=(B, S, H))
    mask = np.ones((B, S))
    mask[1, -1] = 0
    return h, p, e, mask


def _objective(exp, mask, readout):
    """A scalar of everything a controlled layer feeds forward: the merged output (read out by a fixed
    random projection) plus its divergence."""
    def f(params, h, p, e):
        out, aux = merge_branches(params, exp, h, p, e, mask)
        return jnp.sum(out * readout) + aux["divergence"]
    return f


def _check_against_finite_differences(f, args, grads, directions=4, eps=1e-6):
    """For every leaf of args: the gradient's projection on random directions against central differences of f
    in float64 along them; gradients must be finite."""
    flat, treedef = jax.tree.flatten(args)
    rng = np.random.default_rng(0)
    for i, grad in enumerate(jax.tree.leaves(grads)):
        grad = np.asarray(grad)
        assert np.isfinite(grad).all()
        for _ in range(directions):
            v = rng.normal(size=flat[i].shape)
            values = []
            for sign in (1, -1):
                moved = list(flat)
                moved[i] = flat[i] + sign * eps * v
                values.append(float(f(*jax.tree.unflatten(treedef, moved))))
            numeric = (values[0] - values[1]) / (2 * eps)
            assert np.sum(grad * v) == pytest.approx(numeric, rel=1e-5, abs=1e-6 * max(1.0, np.abs(grad).sum()))


CASES = [(m, off) for m in MERGE_METHODS for off in (0.0, 0.3)] + [("slerp", 1e-5), ("slerp", 1e-3)]


@pytest.mark.parametrize("method,offset", CASES)
@pytest.mark.parametrize("loss_type,alpha", [("mse", 1.0), ("cosine", -1.0)])
def test_merge_gradients_match_float64_finite_differences(method, offset, loss_type, alpha):
    with jax.enable_x64(True):
        exp, params = _merge_params(method, interpolation_loss_type=loss_type,
                                    interpolation_loss_alpha=alpha)
        if offset:  # perturbed weights: gates away from their initial values
            params = jax.tree.map(lambda x: x + 0.3 * np.random.default_rng(1).normal(size=x.shape), params)
        h, p, e, mask = _inputs(offset)
        readout = np.random.default_rng(2).normal(size=(B, S, H))
        f = _objective(exp, mask, readout)
        args = (params, h, p, e)
        _check_against_finite_differences(f, args, jax.grad(f, argnums=(0, 1, 2, 3))(*args))


@pytest.mark.parametrize("offset", [0.0, 1e-6, 1e-3, 0.3])
def test_slerp_in_float32_matches_float64_at_and_near_zero_angle(offset):
    """Training runs slerp in float32: equal branches (initialisation) give lerp exactly, and the gradients
    stay finite and close to the float64 ones (which the finite-difference test above pins down)."""
    _, p, e, _ = _inputs(offset)
    readout = np.random.default_rng(2).normal(size=(B, S, H))

    def f(p, e, f):
        return jnp.sum(slerp(p, e, jax.nn.sigmoid(f)) * readout)

    ours = jax.grad(f, argnums=(0, 1, 2))(np.float32(p), np.float32(e), np.float32(0.3))
    with jax.enable_x64(True):
        exact = jax.grad(f, argnums=(0, 1, 2))(p, e, np.float64(0.3))
    for a, b in zip(ours, exact):
        assert np.isfinite(np.asarray(a)).all()
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-2, atol=1e-2 * np.abs(b).max())
    if offset == 0:
        np.testing.assert_array_equal(np.asarray(slerp(np.float32(p), np.float32(p), 0.4)), np.float32(p))


@pytest.mark.parametrize("loss_type", ["mse", "cosine"])
@pytest.mark.parametrize("alpha", [1.0, 0.5, -1.0])
@pytest.mark.parametrize("divergence_mask", ["tokens", "reference"])
def test_moe_divergence_counts_unrouted_tokens_as_zero(loss_type, alpha, divergence_mask):
    """Independent of merge_branches: route by argmax of the softmax gate, divergence only on routed tokens,
    mean over all counted tokens."""
    with jax.enable_x64(True):
        exp, params = _merge_params("moe", interpolation_loss_type=loss_type,
                                    interpolation_loss_alpha=alpha, divergence_mask=divergence_mask)
        h, p, e, mask = _inputs(0.5, seed=4)
        gate = params["gating"]["gate_network_0"]
        logits = h @ gate["kernel"] + gate["bias"]
        probs = np.exp(logits) / np.exp(logits).sum(-1, keepdims=True)
        routed = probs[..., 1] > probs[..., 0]
        assert routed.any() and not routed.all()  # the case exercises both routes
        if loss_type == "mse":
            d = ((e - p) ** 2).mean(-1)
        else:
            cos = (p * e).sum(-1) / np.linalg.norm(p, axis=-1) / np.linalg.norm(e, axis=-1)
            x = np.maximum(1 - cos, 0)
            d = np.where(x < 1, 0.5 * x * x, x - 0.5)
        weight = probs[..., 1] if alpha == -1 else alpha
        counted = mask if divergence_mask == "tokens" else np.ones_like(mask)
        expected = (weight * d * routed * counted).sum() / counted.sum()
        out, aux = merge_branches(params, exp, h, p, e, mask)
        assert float(aux["divergence"]) == pytest.approx(expected, rel=1e-12)
        np.testing.assert_array_equal(np.asarray(out), np.where(routed[..., None], e, p))
