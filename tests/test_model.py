"""Logits parity with transformers.LlamaForCausalLM (torch, CPU, fp32) on long, right-padded prompts."""
import jax
import numpy as np
import pytest
from hf_models import VARIANTS, hf_logits, make_hf_llama

from jax_controlllm.config import ModelConfig
from jax_controlllm.convert import load_hf
from jax_controlllm.model import block_groups, forward, init_params
from jax_controlllm.model.layers import rope_inv_freq

torch = pytest.importorskip("torch")
SEQ = 512


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_logits_match_transformers(tmp_path, variant):
    model = make_hf_llama(tmp_path, **VARIANTS[variant])
    config, params = load_hf(tmp_path, dtype="float32")
    rng = np.random.default_rng(1)
    ids = rng.integers(3, 256, size=(2, SEQ))
    mask = np.ones_like(ids)
    mask[1, SEQ - 100:] = 0          # right padding on the second row
    ids[1, SEQ - 100:] = 0
    ours = np.asarray(forward(config, params, ids, attention_mask=mask))
    ref = hf_logits(model, ids, mask)
    real = mask.astype(bool)
    assert np.abs(ours[real] - ref[real]).max() <= 1e-4
    # an unpadded row must agree everywhere, long positions included (RoPE bugs hide in short prompts)
    assert np.abs(ours[0] - ref[0]).max() <= 1e-4


def test_llama3_inv_freq_matches_transformers():
    from transformers import LlamaConfig
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    scaling = VARIANTS["llama31_rope"]["rope_scaling"]
    hf = LlamaConfig(hidden_size=64, num_attention_heads=4, rope_theta=500000.0, rope_scaling=dict(scaling),
                     max_position_embeddings=2048)
    ref, _ = ROPE_INIT_FUNCTIONS["llama3"](hf, "cpu")
    ours = rope_inv_freq(ModelConfig(hidden_size=64, num_attention_heads=4, rope_theta=500000.0,
                                     rope_scaling=dict(scaling)))
    np.testing.assert_allclose(ours, ref.numpy(), rtol=1e-6)


def test_segment_ids_keep_documents_apart(tiny_config):
    config = tiny_config()
    params = init_params(config, jax.random.PRNGKey(0))
    rng = np.random.default_rng(0)
    a, b = rng.integers(0, 128, 10), rng.integers(0, 128, 6)
    packed = np.concatenate([a, b])[None]
    seg = np.array([[1] * 10 + [2] * 6])
    pos = np.array([list(range(10)) + list(range(6))])
    out = np.asarray(forward(config, params, packed, positions=pos, segment_ids=seg))
    alone_a = np.asarray(forward(config, params, a[None]))
    alone_b = np.asarray(forward(config, params, b[None]))
    np.testing.assert_allclose(out[0, :10], alone_a[0], atol=1e-5)
    np.testing.assert_allclose(out[0, 10:], alone_b[0], atol=1e-5)


def test_scan_and_unrolled_agree_and_scan_is_one_group(tiny_config):
    config = tiny_config(num_hidden_layers=6)
    assert [(s.repeats, len(s.pattern)) for s in block_groups(config)] == [(6, 1)]
    params = init_params(config, jax.random.PRNGKey(1))
    ids = np.arange(20)[None] % 128
    a = np.asarray(forward(config, params, ids))
    import dataclasses
    unrolled = dataclasses.replace(config, scan_layers=False)
    from jax_controlllm.model import stack_blocks, unstack_blocks
    p2 = {**params, "layers": stack_blocks(unrolled, unstack_blocks(config, params))}
    b = np.asarray(forward(unrolled, p2, ids))
    np.testing.assert_allclose(a, b, atol=1e-6)


def test_hlo_size_does_not_grow_with_depth(tiny_config):
    """Scan over layers: a 16-layer model lowers to about the same program as a 2-layer one."""
    sizes = []
    for layers in (2, 16):
        config = tiny_config(num_hidden_layers=layers)
        params = jax.eval_shape(lambda: init_params(config, jax.random.PRNGKey(0)))
        x = jax.ShapeDtypeStruct((1, 8), np.int32)
        text = jax.jit(lambda p, x: forward(config, p, x)).lower(params, x).as_text()
        sizes.append(len(text))
    assert sizes[1] < 1.2 * sizes[0]


def test_bf16_compute_close_to_fp32(tiny_config):
    config = tiny_config()
    params = init_params(config, jax.random.PRNGKey(2))
    ids = np.arange(32)[None] % 128
    f32 = np.asarray(forward(config, params, ids))
    import dataclasses
    bf = dataclasses.replace(config, compute_dtype="bfloat16", frozen_dtype="bfloat16")
    out = np.asarray(forward(bf, jax.tree.map(lambda x: x.astype("bfloat16"), params), ids))
    assert out.dtype == np.float32
    assert np.abs(out - f32).max() < 0.05 * np.abs(f32).max() + 1e-2


def test_relayout_regroups_blocks_when_layers_become_trainable(tiny_config):
    """Partial tuning changes the scan's block groups; the same weights must come out under the new layout."""
    import dataclasses

    from jax_controlllm.convert import to_hf_tensors
    from jax_controlllm.model.params import relayout
    config = tiny_config(num_hidden_layers=6)
    params = jax.tree.map(np.asarray, init_params(config, jax.random.PRNGKey(3)))
    partial = dataclasses.replace(config, trainable_layers=[4])
    assert len(block_groups(partial)) > len(block_groups(config))
    moved = relayout(config, partial, params)
    before, after = to_hf_tensors(config, params), to_hf_tensors(partial, moved)
    assert set(before) == set(after)
    for name in before:
        np.testing.assert_array_equal(before[name], after[name])
    ids = np.arange(12)[None] % 128
    np.testing.assert_allclose(np.asarray(forward(partial, moved, ids)), np.asarray(forward(config, params, ids)),
                               atol=1e-6)
