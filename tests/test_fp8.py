"""FP8 matmuls for frozen weights (model.frozen_matmul: fp8, model/fp8.py): quantisation, both GEMMs against
an independent NumPy computation (ml_dtypes' FP8 rounding, float64 products), the frozen tree transform, and
a tiny Control LLM trainer whose loss and gradients stay close to the compute-dtype step."""
import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
from test_train_helpers import paths, tiny_run_config

from jax_controlllm.config import ConfigError
from jax_controlllm.model.fp8 import fp8_backward_matmul, fp8_matmul, pow2_scale, quantize, quantize_frozen_kernels
from jax_controlllm.train import build_trainer
from jax_controlllm.train.data import SyntheticTokens
from jax_controlllm.train.step import frozen_for_forward, loss_and_grads

E4M3, E5M2 = ml_dtypes.float8_e4m3fn, ml_dtypes.float8_e5m2


def np_round_trip(x: np.ndarray, dtype) -> np.ndarray:
    """Independent of model/fp8.py: a power-of-two scale putting amax in the format's top binade, ml_dtypes'
    rounding, back to float64."""
    top = float(ml_dtypes.finfo(dtype).max)
    amax = np.abs(x).max()
    scale = 2.0 ** np.ceil(np.log2(amax / top)) if amax > 0 else 2.0 ** np.ceil(np.log2(1 / top))
    return np.clip(x / scale, -top, top).astype(dtype).astype(np.float64) * scale


def rel(a, b) -> float:
    return float(np.linalg.norm(np.asarray(a, np.float64) - b) / np.linalg.norm(b))


@pytest.mark.parametrize("dtype", [E4M3, E5M2])
def test_scales_are_powers_of_two_that_fit_amax_in_the_top_binade(dtype):
    x = jax.random.normal(jax.random.PRNGKey(0), (64, 48)) * 37.0
    scale = float(pow2_scale(x, dtype))
    top = float(ml_dtypes.finfo(dtype).max)
    assert np.log2(scale) == np.round(np.log2(scale))
    assert top / 2 < float(jnp.max(jnp.abs(x))) / scale <= top
    q = np.asarray(quantize(x, dtype, scale))
    assert q.dtype == dtype and np.isfinite(q.astype(np.float32)).all()
    np.testing.assert_array_equal(q.astype(np.float64) * scale, np_round_trip(np.asarray(x, np.float64), dtype))
    # all zeros: a finite scale, zeros out
    assert np.isfinite(float(pow2_scale(jnp.zeros((4, 4)), dtype)))
    np.testing.assert_array_equal(np.asarray(quantize(jnp.zeros((4, 4)), dtype, pow2_scale(jnp.zeros((4, 4)), dtype)
                                                      )).astype(np.float32), 0)


def test_per_layer_scales_of_a_stacked_kernel():
    k = jax.random.normal(jax.random.PRNGKey(1), (3, 16, 8)) * jnp.array([0.01, 1.0, 100.0])[:, None, None]
    scales = pow2_scale(k, E4M3, (1, 2))
    assert scales.shape == (3,)
    for i in range(3):
        assert float(scales[i]) == float(pow2_scale(k[i], E4M3))


def _operands(seed=0, dtype=jnp.float32):
    kx, kw, kg = jax.random.split(jax.random.PRNGKey(seed), 3)
    x = jax.random.normal(kx, (2, 5, 32), dtype)
    w = jax.random.normal(kw, (32, 24)) * 0.1
    dy = jax.random.normal(kg, (2, 5, 24), dtype) * 1e-3   # gradients are small: the scale must follow them
    s_w = pow2_scale(w, E4M3)
    return x, w, quantize(w, E4M3, s_w), s_w, dy


def test_forward_and_input_gradient_match_an_independent_fp8_computation():
    x, w, w_q, s_w, dy = _operands()
    y, vjp = jax.vjp(lambda x: fp8_matmul(x, w_q, s_w), x)
    (dx,) = vjp(dy)
    w8 = np_round_trip(np.asarray(w, np.float64), E4M3)
    want_y = np_round_trip(np.asarray(x, np.float64), E4M3) @ w8
    want_dx = np_round_trip(np.asarray(dy, np.float64), E5M2) @ w8.T
    assert rel(y, want_y) < 1e-6 and rel(dx, want_dx) < 1e-6          # float32 accumulation only
    # and FP8 is an approximation of the exact product, not something else
    exact_y = np.asarray(x, np.float64) @ np.asarray(w, np.float64)
    exact_dx = np.asarray(dy, np.float64) @ np.asarray(w, np.float64).T
    assert 1e-3 < rel(y, exact_y) < 0.08 and 1e-3 < rel(dx, exact_dx) < 0.15


def test_bf16_operands_and_zero_inputs_give_finite_results_and_gradients():
    x, _, w_q, s_w, dy = _operands(1, jnp.bfloat16)
    y, vjp = jax.vjp(lambda x: fp8_matmul(x, w_q, s_w), x)
    assert y.dtype == jnp.bfloat16 and vjp(dy)[0].dtype == jnp.bfloat16
    zeros = jnp.zeros_like(x)
    y0, vjp0 = jax.vjp(lambda x: fp8_matmul(x, w_q, s_w), zeros)
    (dx0,) = vjp0(jnp.zeros_like(dy))
    assert not np.asarray(y0, np.float32).any() and not np.asarray(dx0, np.float32).any()
    g = jax.grad(lambda x: jnp.sum(fp8_matmul(x, w_q, s_w).astype(jnp.float32) ** 2))(zeros)
    assert np.isfinite(np.asarray(g, np.float32)).all()


def test_only_block_kernels_are_quantised(tiny_model):
    from jax_controlllm.config import ExpansionConfig
    _, params = tiny_model(expansion=ExpansionConfig(expand_type="concat", num_exp_layers=2, merge_method="dlerp"))
    out = quantize_frozen_kernels(params)
    for path, leaf in zip(paths(params), jax.tree.leaves(params)):
        node = out
        for key in path[:-1]:
            node = node[key]
        if path[0] == "layers" and path[-1] == "kernel":
            assert node["kernel"].dtype == jnp.float8_e4m3fn
            assert node["kernel_scale"].shape == leaf.shape[:-2]          # one scale per layer of the stack
        else:
            assert node[path[-1]] is leaf, path                           # embeddings, norms, head: untouched


def _trainer(*overrides):
    run = tiny_run_config("model.frozen_dtype=bfloat16", "model.compute_dtype=bfloat16", "train.grad_accum=1",
                          "train.lr=3e-3", *overrides)
    return build_trainer(run, jax.sharding.Mesh(np.array(jax.devices()[:1]), ("fsdp",)))


def _batch(trainer):
    return jax.device_put(next(SyntheticTokens(256, 8, 32, 0, min_doc_len=4, max_doc_len=24)),
                          trainer.shardings.batch)


def _loss_and_flat_grads(trainer, batch) -> tuple[float, float, np.ndarray]:
    """(ce, divergence, every gradient leaf raveled) of one step's loss at the trainer's initial state."""
    metrics, grads = jax.jit(lambda t, f, b: loss_and_grads(trainer.model_config, t, f, b, 1, 1.0))(
        trainer.state.trainable, trainer.frozen, batch)
    flat = np.concatenate([np.ravel(np.asarray(g, np.float32)) for g in jax.tree.leaves(grads)])
    assert np.isfinite(flat).all()
    return float(metrics["ce"]), float(metrics["divergence"]), flat


def _cosine(a: np.ndarray, b: np.ndarray) -> float:
    return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))


def test_an_fp8_step_stays_close_to_the_bf16_step_and_trains():
    plain, fp8 = _trainer(), _trainer("model.frozen_matmul=fp8")
    batch = _batch(plain)
    (ce_b, _, g_b), (ce_f, _, g_f) = _loss_and_flat_grads(plain, batch), _loss_and_flat_grads(fp8, batch)
    assert ce_f != ce_b and abs(ce_f - ce_b) < 0.02 * ce_b
    assert 0.98 < _cosine(g_b, g_f) < 1.0
    state, losses = fp8.state, []
    for _ in range(8):
        state, metrics = fp8.step_fn(state, fp8.frozen, batch)
        losses.append(float(metrics["loss"]))
    assert np.isfinite(losses).all() and losses[-1] < losses[0] - 0.1, losses
    # the stored frozen weights stay as they were: quantised inside the step only
    assert {x.dtype for x in jax.tree.leaves(fp8.frozen)} == {x.dtype for x in jax.tree.leaves(plain.frozen)}
    assert jnp.dtype(jnp.float8_e4m3fn) not in {x.dtype for x in jax.tree.leaves(fp8.frozen)}


def test_a_bad_frozen_matmul_is_one_line_naming_the_key():
    with pytest.raises(ConfigError) as err:
        tiny_run_config("model.frozen_matmul=fp4")
    assert "model.frozen_matmul" in str(err.value) and "fp4" in str(err.value) and "\n" not in str(err.value)


@pytest.mark.parametrize("mode", [("train.mode=lora", "expansion=null"),
                                  ("train.mode=partial", "expansion=null", "train.trainable_layers=[3]")],
                         ids=["lora", "partial"])
def test_fp8_reaches_the_frozen_kernels_of_lora_and_partial_tuning(mode):
    plain, fp8 = _trainer(*mode), _trainer(*mode, "model.frozen_matmul=fp8")
    assert any(p[-1] == "kernel_scale" for p in paths(frozen_for_forward(fp8.model_config, fp8.frozen)))
    batch = _batch(plain)
    ce_b, ce_f = _loss_and_flat_grads(plain, batch)[0], _loss_and_flat_grads(fp8, batch)[0]
    assert ce_f != ce_b and abs(ce_f - ce_b) < 0.02 * ce_b


def test_fp8_backward_keeps_the_forward_exact_and_quantises_the_input_gradient():
    x, w, w_q, s_w, dy = _operands(2)
    y, vjp = jax.vjp(lambda x: fp8_backward_matmul(x, w, w_q, s_w), x)
    np.testing.assert_array_equal(y, jnp.einsum("...i,io->...o", x, w))
    (dx,) = vjp(dy)
    (dx_fp8,) = jax.vjp(lambda x: fp8_matmul(x, w_q, s_w), x)[1](dy)
    np.testing.assert_array_equal(dx, dx_fp8)


def test_an_fp8_backward_step_has_the_exact_loss_and_close_gradients():
    plain, fp8 = _trainer(), _trainer("model.frozen_matmul=fp8_backward")
    assert {p[-1] for p in paths(frozen_for_forward(fp8.model_config, fp8.frozen))} >= \
        {"kernel", "kernel_grad_fp8", "kernel_scale"}
    batch = _batch(plain)
    (ce_b, div_b, g_b), (ce_f, div_f, g_f) = _loss_and_flat_grads(plain, batch), _loss_and_flat_grads(fp8, batch)
    assert (ce_f, div_f) == (ce_b, div_b)                           # the same function
    assert not np.array_equal(g_b, g_f) and 0.98 < _cosine(g_b, g_f) < 1.0


def test_fp8_trains_the_same_on_a_sharded_mesh_as_on_one_device(tmp_path):
    """fsdp x tensor (2x2): the per-tensor scales are reductions over sharded kernels and activations, the FP8
    dots are partitioned by XLA; the losses match one device up to float rounding."""
    from test_train_helpers import TINY, check, run_cli, train_losses
    common = ["--config", str(TINY), "--set", "model.frozen_matmul=fp8", "--set", "train.steps=4",
              "--set", "train.save_every=0", "--set", "train.eval_every=0"]
    cache = tmp_path / "cache"
    check(run_cli([*common, "--cpu-devices", "4", "--mesh", "2x2", "--out", str(tmp_path / "mesh")], cache))
    check(run_cli([*common, "--mesh", "1", "--out", str(tmp_path / "one")], cache))
    mesh, one = train_losses(tmp_path / "mesh"), train_losses(tmp_path / "one")
    assert sorted(mesh) == list(range(1, 5))
    np.testing.assert_allclose([one[s] for s in range(1, 5)], [mesh[s] for s in range(1, 5)], rtol=1e-4)
