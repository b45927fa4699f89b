"""Every merge method, with concat and hybrid expansion, and stack, trains: 20 optimizer steps of the real
loss-and-gradient function (SGD) from initialisation (both branches equal) on a tiny model, finite throughout."""
import jax
import numpy as np
import pytest

from jax_controlllm.config import MERGE_METHODS, ExpansionConfig, ModelConfig
from jax_controlllm.model.expand import expand
from jax_controlllm.model.params import init_params, trainable_mask
from jax_controlllm.train import SyntheticTokens, partition
from jax_controlllm.train.step import loss_and_grads

# Two layers keep each case's compile short: concat controls layer 1; hybrid stacks a copy after layer 0
# and controls layer 1 (the release's alternation, stack first); stack inserts copies after both.
BASE = ModelConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2,
                   num_key_value_heads=1, max_position_embeddings=64, rms_norm_eps=1e-5, remat="none",
                   scan_layers=False)
LAYERS = {"concat": [1], "hybrid": [0, 1], "stack": [0, 1]}
CASES = [(t, m) for t in ("concat", "hybrid") for m in MERGE_METHODS] + [("stack", "lerp")]


@pytest.fixture(scope="module")
def base_params():
    return init_params(BASE, jax.random.key(0))


@pytest.mark.parametrize("expand_type,method", CASES)
def test_every_merge_method_trains_from_initialisation(base_params, expand_type, method):
    exp = ExpansionConfig(expand_type, len(LAYERS[expand_type]), merge_method=method, layers=LAYERS[expand_type],
                          freeze_interpolation_factor=False)
    config, params = expand(BASE, base_params, exp, jax.random.key(1))
    trainable, frozen = partition(params, trainable_mask(config))
    step = jax.jit(lambda trainable, batch: loss_and_grads(config, trainable, frozen, batch, 1, 1.0))
    data = SyntheticTokens(BASE.vocab_size, 2, 16, seed=0, min_doc_len=4, max_doc_len=12)
    for _ in range(20):  # plain SGD on the host: an optimizer inside the jit would double the compile time
        metrics, grads = step(trainable, next(data))
        grads = [np.asarray(g) for g in jax.tree.leaves(grads)]
        loss = float(metrics["ce"] + metrics["divergence"])
        assert np.isfinite(loss) and all(np.isfinite(g).all() for g in grads), loss
        assert any(np.abs(g).max() > 0 for g in grads)
        trainable = jax.tree.unflatten(jax.tree.structure(trainable),
                                       [np.asarray(t) - 0.1 * g for t, g in zip(jax.tree.leaves(trainable), grads)])
    if expand_type != "stack":  # the divergence grew from exactly 0 (proj, prog: from their own M p)
        assert float(metrics["divergence"]) > 0
