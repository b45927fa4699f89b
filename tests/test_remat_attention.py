"""Memory/speed options must not change the mathematics: remat policies give the gradients of no remat,
and (on a GPU) the cuDNN attention path agrees with the masked-softmax path, packed documents included."""
import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jax_controlllm.config import ExpansionConfig, ModelConfig
from jax_controlllm.losses import controlllm_loss
from jax_controlllm.model import init_params
from jax_controlllm.model.expand import expand
from jax_controlllm.model.params import trainable_mask
from jax_controlllm.train.state import combine, partition

on_gpu = jax.devices()[0].platform == "gpu"


def controlled_model(**model_kw):
    base = ModelConfig(**{**dict(vocab_size=256, hidden_size=128, intermediate_size=256, num_hidden_layers=4,
                                 num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512),
                          **model_kw})
    params = init_params(base, jax.random.PRNGKey(0))
    exp = ExpansionConfig(expand_type="concat", num_exp_layers=2, merge_method="dlerp")
    return expand(base, params, exp, jax.random.PRNGKey(1))


def batch(packed: bool, b: int = 2, s: int = 128):
    rng = np.random.default_rng(0)
    ids = rng.integers(0, 256, size=(b, s)).astype(np.int32)
    if packed:  # row 0: three documents, row 1: one document
        seg = np.ones((b, s), np.int32)
        seg[0, 40:90], seg[0, 90:] = 2, 3
        pos = np.concatenate([np.arange(40), np.arange(50), np.arange(s - 90)])[None].repeat(b, 0)
        pos[1] = np.arange(s)
    else:
        seg = np.ones((b, s), np.int32)
        pos = np.arange(s)[None].repeat(b, 0)
    return {"input_ids": ids, "labels": ids, "segment_ids": seg, "positions": pos.astype(np.int32)}


def loss_and_grads(config, params, data):
    mask = trainable_mask(config)
    trainable, frozen = partition(params, mask)

    def loss(t):
        return controlllm_loss(config, combine(t, frozen), data)["total"]
    return jax.jit(jax.value_and_grad(loss))(trainable)


def assert_trees_close(a, b, rtol, atol_frac):
    """Elementwise close, with an absolute floor relative to the largest gradient anywhere (leaves whose
    gradient is ~1e-11 are rounding noise, not signal)."""
    scale = max(float(np.abs(np.asarray(y, np.float32)).max()) for y in jax.tree.leaves(b))
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        np.testing.assert_allclose(np.asarray(x, np.float32), np.asarray(y, np.float32), rtol=rtol,
                                   atol=atol_frac * scale)


@pytest.mark.parametrize("policy", ["selective", "full", "save_dots_no_batch"])
def test_remat_policies_give_the_gradients_of_no_remat(policy):
    config, params = controlled_model()
    data = batch(packed=True)
    with jax.default_matmul_precision("float32"):  # GPUs default to TF32 matmuls for float32
        ref_loss, ref = loss_and_grads(config, params, data)
        loss, grads = loss_and_grads(dataclasses.replace(config, remat=policy), params, data)
    assert abs(float(loss) - float(ref_loss)) <= 1e-6 * abs(float(ref_loss))
    assert_trees_close(grads, ref, rtol=1e-5, atol_frac=1e-6)


def test_selective_remat_saves_only_matmul_outputs():
    """The residuals kept for the backward pass under "selective" are named matmul outputs (and inputs and
    weights), never the float32 norm inputs: this is what lets the 8B step fit micro-batch 2 on an H100."""
    import contextlib
    import io
    import re

    from jax.ad_checkpoint import print_saved_residuals

    def saved_residuals(fn, *args):  # (aval-like, source) pairs from JAX's public printout
        out = io.StringIO()
        with contextlib.redirect_stdout(out):
            print_saved_residuals(fn, *args)
        for line in out.getvalue().splitlines():
            m = re.match(r"(\w+)\[([\d,]*)\] (.*)", line)
            if m:
                shape = tuple(int(d) for d in m.group(2).split(",") if d)
                yield jax.ShapeDtypeStruct(shape, jnp.dtype(m.group(1).replace("bf16", "bfloat16")
                                                            .replace("f32", "float32").replace("i32", "int32")
                                                            .replace("bool", "bool_"))), m.group(3)

    config, params = controlled_model(compute_dtype="bfloat16", frozen_dtype="bfloat16")
    data = batch(packed=False)
    mask = trainable_mask(config)
    trainable, frozen = partition(params, mask)

    def residual_bytes(cfg):
        def loss(t):
            return controlllm_loss(cfg, combine(t, frozen), data)["total"]
        saved = saved_residuals(loss, trainable)
        acts = [aval for aval, src in saved if "argument" not in src and len(aval.shape) >= 2
                and aval.shape[-2:] != (1, 1)]
        return sum(int(np.prod(a.shape)) * a.dtype.itemsize for a in acts), acts

    none_bytes, _ = residual_bytes(config)
    sel_bytes, sel_acts = residual_bytes(dataclasses.replace(config, remat="selective"))
    assert 0 < sel_bytes < 0.6 * none_bytes, (sel_bytes, none_bytes)
    hidden_f32 = [a for a in sel_acts if a.dtype == jnp.float32 and a.shape[-1] == config.hidden_size
                  and a.shape[-2] == 128]
    assert len(hidden_f32) <= 1  # at most the final norm's input, outside the scanned layers


@pytest.mark.gpu
@pytest.mark.skipif(not on_gpu, reason="needs a CUDA device (cuDNN attention)")
@pytest.mark.parametrize("packed", [False, True], ids=["one_document_per_row", "packed_documents"])
@pytest.mark.parametrize("remat", ["none", "selective"])
def test_cudnn_attention_matches_masked_softmax(packed, remat):
    config, params = controlled_model(compute_dtype="bfloat16", frozen_dtype="bfloat16")
    data = batch(packed)
    ref_loss, ref = loss_and_grads(dataclasses.replace(config, attention_impl="xla"), params, data)
    loss, grads = loss_and_grads(dataclasses.replace(config, attention_impl="cudnn", remat=remat), params, data)
    # bf16 compute: two kernels accumulate in different orders, so agree to bf16 precision, not bit for bit
    assert abs(float(loss) - float(ref_loss)) <= 2e-2 * abs(float(ref_loss))
    # leaves whose gradient is ~1e-6 of the largest are rounding noise in both paths: compare the rest
    largest = max(float(np.linalg.norm(np.asarray(y, np.float32))) for y in jax.tree.leaves(ref))
    for x, y in zip(jax.tree.leaves(grads), jax.tree.leaves(ref)):
        x, y = np.asarray(x, np.float32).ravel(), np.asarray(y, np.float32).ravel()
        if np.linalg.norm(y) < 1e-4 * largest:
            continue
        cos = float(x @ y / max(np.linalg.norm(x) * np.linalg.norm(y), 1e-30))
        assert cos > 0.99, cos
