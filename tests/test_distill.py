"""Distillation from the frozen base on untargeted tokens (``train.distill_weight``): the base forward read from an
expanded model's pretrained branches, the KL term against an independent float64 computation, its gradient
against finite differences, and its place in the training step."""
import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jax_controlllm.config import ConfigError, ExpansionConfig, ModelConfig, TrainConfig, load_config
from jax_controlllm.losses import IGNORE, controlllm_loss, untargeted_positions
from jax_controlllm.model import forward, init_params
from jax_controlllm.model.expand import expand
from jax_controlllm.model.params import trainable_mask
from jax_controlllm.model.stack import final_hidden, logits_from_hidden
from jax_controlllm.train.state import combine, partition
from jax_controlllm.train.step import loss_and_grads

B, S, V = 2, 12, 64


def _tiny(**kw) -> ModelConfig:
    base = dict(vocab_size=V, hidden_size=32, intermediate_size=64, num_hidden_layers=4, num_attention_heads=4,
                num_key_value_heads=2, max_position_embeddings=64, rms_norm_eps=1e-5)
    return ModelConfig(**{**base, **kw})


def _expanded(method: str = "dlerp", noise: float = 0.05):
    """(base config, base params, expanded config, expanded params with the trainable leaves moved off init)."""
    config = _tiny()
    params = init_params(config, jax.random.key(0))
    exp = ExpansionConfig("concat", 2, merge_method=method, layers=[1, 3])
    config2, params2 = expand(config, params, exp, jax.random.key(1))
    mask = trainable_mask(config2)
    rng = np.random.default_rng(0)
    params2 = jax.tree.map(lambda x, m: x + noise * rng.normal(size=x.shape).astype(x.dtype) if m else x,
                           params2, mask)
    return config, params, config2, params2


def _batch():
    """Two packed rows: in each, a document with LM targets and one without (labels IGNORE), plus padding."""
    rng = np.random.default_rng(1)
    ids = rng.integers(1, V, size=(B, S))
    labels = ids.copy()
    labels[0, 6:10] = IGNORE           # row 0: tokens 6..9 are alignment text (a second segment)
    labels[1, :5] = IGNORE             # row 1: tokens 0..4 are alignment text
    segments = np.array([[1] * 6 + [2] * 4 + [0] * 2, [1] * 5 + [2] * 7])
    labels[segments == 0] = IGNORE
    return {"input_ids": ids, "labels": labels, "segment_ids": segments}


@pytest.mark.parametrize("method", ["dlerp", "lerp", "prog"])
def test_pretrained_only_forward_is_the_base_model(method):
    config, params, config2, params2 = _expanded(method)
    ids = _batch()["input_ids"]
    base = np.asarray(forward(config, params, ids))
    trained = np.asarray(forward(config2, params2, ids))
    assert np.abs(trained - base).max() > 1e-3          # the expanded model has moved off the base
    h = final_hidden(config2, params2, ids, pretrained_only=True)
    np.testing.assert_allclose(np.asarray(logits_from_hidden(config2, params2, h)), base, atol=2e-6, rtol=0)


def test_untargeted_positions_are_the_alignment_tokens_of_each_document():
    batch = _batch()
    token_mask = (batch["segment_ids"] > 0).astype(np.float32)
    where = np.asarray(untargeted_positions(jnp.asarray(batch["labels"]), jnp.asarray(token_mask),
                                            jnp.asarray(batch["segment_ids"])))
    expected = np.zeros((B, S - 1))
    expected[0, 6:9] = 1        # predicting tokens 7..9 from 6..8 (not across the segment boundary at 5 -> 6)
    expected[1, 0:4] = 1        # predicting tokens 1..4 (token 5 starts the next document)
    np.testing.assert_array_equal(where, expected)


def _kl_float64(base_logits, logits, where):
    def log_softmax(x):
        x = x - x.max(-1, keepdims=True)
        return x - np.log(np.exp(x).sum(-1, keepdims=True))
    lb, lm = log_softmax(base_logits.astype(np.float64)), log_softmax(logits.astype(np.float64))
    kl = (np.exp(lb) * (lb - lm)).sum(-1)
    return (kl[:, :-1] * where).sum() / where.sum()


def test_distill_is_the_kl_from_the_base_on_untargeted_tokens():
    config, params, config2, params2 = _expanded()
    batch = _batch()
    out = controlllm_loss(config2, params2, batch, distill=True)
    base = np.asarray(forward(config, params, batch["input_ids"], segment_ids=batch["segment_ids"]))
    trained = np.asarray(forward(config2, params2, batch["input_ids"], segment_ids=batch["segment_ids"]))
    where = np.zeros((B, S - 1))
    where[0, 6:9] = where[1, 0:4] = 1
    assert float(out["distill_tokens"]) == where.sum()
    np.testing.assert_allclose(float(out["distill"]), _kl_float64(base, trained, where), rtol=1e-4)
    assert float(out["distill"]) > 1e-4
    # without the flag the loss is unchanged and has no distill entry
    plain = controlllm_loss(config2, params2, batch)
    assert "distill" not in plain and float(plain["total"]) == float(out["total"])


def test_distill_and_its_gradient_are_zero_at_initialisation():
    config = _tiny()
    params = init_params(config, jax.random.key(0))
    config2, params2 = expand(config, params, ExpansionConfig("concat", 2, merge_method="dlerp", layers=[1, 3]),
                              jax.random.key(1))
    mask = trainable_mask(config2)
    trainable, frozen = partition(params2, mask)

    def kd(t):
        return controlllm_loss(config2, combine(t, frozen), _batch(), distill=True)["distill"]

    value, grads = jax.value_and_grad(kd)(trainable)
    assert abs(float(value)) < 1e-6
    assert max(float(jnp.abs(g).max()) for g in jax.tree.leaves(grads)) < 1e-6


@pytest.mark.parametrize("loss_chunk", [0, 4, 11])
def test_distill_gradient_matches_an_independent_computation(loss_chunk):
    """jax.grad of the loss's distill term against jax.grad of KL written out from the two models' logits (the base
    as a plain model, the trained one through ``forward``), the head in one chunk, in chunks that need padding
    (11 positions in chunks of 4) and in exact chunks. (Central differences in float32 are too noisy here: the KL
    is near its minimum, its directional derivatives ~1e-4.)"""
    config, params, config2, params2 = _expanded("dlerp", noise=0.1)
    config2 = dataclasses.replace(config2, loss_chunk=loss_chunk)
    trainable, frozen = partition(params2, trainable_mask(config2))
    batch = _batch()
    base = jax.nn.log_softmax(forward(config, params, batch["input_ids"], segment_ids=batch["segment_ids"]))
    where = np.zeros((B, S - 1))
    where[0, 6:9] = where[1, 0:4] = 1

    def kd(t):
        return controlllm_loss(config2, combine(t, frozen), batch, distill=True)["distill"]

    def independent(t):
        logp = jax.nn.log_softmax(forward(config2, combine(t, frozen), batch["input_ids"],
                                          segment_ids=batch["segment_ids"]))
        kl = jnp.sum(jnp.exp(base) * (base - logp), axis=-1)[:, :-1]
        return jnp.sum(kl * where) / where.sum()

    grads, expected = jax.grad(kd)(trainable), jax.grad(independent)(trainable)
    for g, e in zip(jax.tree.leaves(grads), jax.tree.leaves(expected)):
        np.testing.assert_allclose(np.asarray(g), np.asarray(e), rtol=1e-4, atol=1e-7)


@pytest.mark.parametrize("tied", [False, True])
def test_distill_gradient_reaches_a_differentiated_head(tied):
    """The fused head's d/dW when the LM head itself is differentiated (the distill term as a function of every
    parameter, the base's side held fixed), against jax.grad of the KL written out from the logits."""
    config = _tiny(tie_word_embeddings=tied, loss_chunk=5)
    params = init_params(config, jax.random.key(0))
    config2, params2 = expand(config, params, ExpansionConfig("concat", 2, merge_method="dlerp", layers=[1, 3]),
                              jax.random.key(1))
    rng = np.random.default_rng(2)
    params2 = jax.tree.map(lambda x: x + 0.05 * rng.normal(size=x.shape).astype(x.dtype), params2)
    batch = _batch()
    where = jnp.asarray(untargeted_positions(batch["labels"], batch["segment_ids"] > 0, batch["segment_ids"]))
    head = "embed_tokens" if tied else "lm_head"
    base_h = jax.lax.stop_gradient(final_hidden(config2, params2, batch["input_ids"],
                                                segment_ids=batch["segment_ids"], pretrained_only=True))

    def kd(p):
        return controlllm_loss(config2, p, batch, distill=True)["distill"]

    def independent(p):
        base = jax.nn.log_softmax(jax.lax.stop_gradient(logits_from_hidden(config2, p, base_h)))[:, :-1]
        h = final_hidden(config2, p, batch["input_ids"], segment_ids=batch["segment_ids"])
        logp = jax.nn.log_softmax(logits_from_hidden(config2, p, h))[:, :-1]
        return jnp.sum(jnp.sum(jnp.exp(base) * (base - logp), axis=-1) * where) / where.sum()

    grads, expected = jax.grad(kd)(params2), jax.grad(independent)(params2)
    assert float(jnp.abs(grads[head][next(iter(grads[head]))]).max()) > 1e-5
    for g, e in zip(jax.tree.leaves(grads), jax.tree.leaves(expected)):
        np.testing.assert_allclose(np.asarray(g), np.asarray(e), rtol=1e-4, atol=1e-7)


@pytest.mark.parametrize("accum", [1, 2])
def test_training_step_adds_the_weighted_distill_term(accum):
    _, _, config2, params2 = _expanded()
    mask = trainable_mask(config2)
    trainable, frozen = partition(params2, mask)
    batch = {k: jnp.asarray(np.concatenate([v, v])) for k, v in _batch().items()}   # 4 rows: accum 2 splits it
    one = jnp.float32(1.0)
    plain, plain_grads = loss_and_grads(config2, trainable, frozen, batch, accum, one)
    weighted, grads = loss_and_grads(config2, trainable, frozen, batch, accum, one, distill_weight=2.0)
    assert "distill" not in plain
    direct = controlllm_loss(config2, params2, batch, distill=True)   # the whole batch at once: accumulation
    np.testing.assert_allclose(float(weighted["distill"]), float(direct["distill"]), rtol=1e-5)  # changes nothing
    np.testing.assert_allclose(float(weighted["ce"]), float(plain["ce"]), rtol=1e-6)
    # the gradient is that of CE + divergence + 2 * distill
    _, kd_grads = loss_and_grads(config2, trainable, frozen, batch, accum, one, distill_weight=1.0)
    for p, w, k in zip(jax.tree.leaves(plain_grads), jax.tree.leaves(grads), jax.tree.leaves(kd_grads)):
        np.testing.assert_allclose(np.asarray(w - p), 2 * np.asarray(k - p), atol=2e-6)


@pytest.mark.parametrize("overrides,message", [
    (["train.distill_weight=-0.5"], "must be a finite number >= 0, got -0.5"),
    (["train.distill_weight=1", "train.mode=full"], "train.mode full has none"),
    (["train.distill_weight=1", "expansion.expand_type=hybrid"], "needs expansion.expand_type: concat"),
    (["train.distill_weight=1", "expansion.freeze_ori_layers=false"], "needs expansion.freeze_ori_layers: true"),
])
def test_bad_distill_settings_are_one_config_error(overrides, message):
    with pytest.raises(ConfigError, match="train.distill_weight") as err:
        load_config("configs/default.yaml", overrides)
    assert message in str(err.value)


def test_distill_weight_defaults_to_off():
    assert TrainConfig().distill_weight == 0.0
