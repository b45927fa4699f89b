"""The circuit graph of every model the trainer makes runs through the model's own layers: the full circuit
reproduces ``model.forward`` and no circuit the corrupted run, for all seven merge methods, concat / stack /
hybrid expansions, attention and MLP biases and each RoPE type; EAP scores (taps) agree with the derivative
of the edge-patched metric (a second code path) on edges of every kind."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jax_controlllm.circuits import attribute, circuit_model, faithfulness, full_circuit, hit_at_k
from jax_controlllm.circuits.attribute import plain_run
from jax_controlllm.circuits.batching import prepare
from jax_controlllm.circuits.circuit import circuit_from_edges
from jax_controlllm.circuits.evaluate import mean_reference, patched_logit_difference
from jax_controlllm.circuits.nodes import last_position, logit_difference
from jax_controlllm.config import ExpansionConfig, ModelConfig
from jax_controlllm.model import forward, init_params
from jax_controlllm.model.expand import expand

V, T, N = 48, 6, 4
LLAMA3_ROPE = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 4}


def concat(merge, **kw):
    return dict(expansion=dict(expand_type="concat", num_exp_layers=1, layers=[0], merge_method=merge, **kw))


MODELS = {
    "biases_llama3_rope": dict(attention_bias=True, mlp_bias=True, rope_scaling=LLAMA3_ROPE),
    "linear_rope_tied": dict(rope_scaling={"rope_type": "linear", "factor": 2.0}, tie_word_embeddings=True),
    **{merge: concat(merge) for merge in ("lerp", "dlerp", "dlerpin", "moe", "proj")},
    "slerp_relaxed": concat("slerp", interpolation_norm_alpha=0.3),
    "prog_biases_learned_norm": dict(attention_bias=True, mlp_bias=True, **concat("prog", interpolation_norm_alpha=-1)),
    "stack": dict(expansion=dict(expand_type="stack", num_exp_layers=1, layers=[0])),
    "hybrid_dlerp": dict(expansion=dict(expand_type="hybrid", num_exp_layers=2, layers=[0, 1], merge_method="dlerp")),
}
# merges whose coefficients do not depend on the run: the held corrupted run is the model's own
RUN_INDEPENDENT = {"biases_llama3_rope", "linear_rope_tied", "lerp", "proj", "stack"}


def make_model(name: str, seed: int = 0):
    """(config, params): a 2-layer model, expanded as named, every weight randomised (so the expanded branch
    differs from the pretrained one and merge gates are far from their initial values)."""
    spec = dict(MODELS[name])
    expansion = spec.pop("expansion", None)
    base = ModelConfig(vocab_size=V, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                       num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64, **spec)
    params = init_params(base, jax.random.PRNGKey(seed))
    config = base
    if expansion is not None:
        config, params = expand(base, params, ExpansionConfig(**expansion), jax.random.PRNGKey(seed + 1))
    leaves, treedef = jax.tree.flatten(params)
    keys = jax.random.split(jax.random.PRNGKey(seed + 2), len(leaves))
    noisy = [x + 0.3 * jax.random.normal(k, x.shape, x.dtype) for x, k in zip(leaves, keys)]
    return config, jax.tree.unflatten(treedef, noisy)


def make_prompts(seed: int = 1):
    rs = np.random.RandomState(seed)
    lengths = np.array([T, 4, 5, T])
    clean = np.zeros((N, T), np.int32)
    for i, length in enumerate(lengths):
        clean[i, :length] = rs.randint(3, V, size=length)
    corrupted = clean.copy()
    corrupted[:, 1:3] = rs.randint(3, V, size=(N, 2))
    labels = rs.randint(3, V, size=(N, 2))
    labels[:, 1] = np.where(labels[:, 1] == labels[:, 0], labels[:, 0] % (V - 3) + 3, labels[:, 1])
    return clean, corrupted, labels[:, 0], labels[:, 1], lengths


def model_logit_difference(config, params, ids, labels, lengths):
    logits = np.asarray(forward(config, params, ids))[np.arange(N), lengths - 1]
    return logits[np.arange(N), labels[:, 0]] - logits[np.arange(N), labels[:, 1]], logits


@pytest.mark.parametrize("name", list(MODELS))
def test_full_circuit_is_the_model_and_empty_circuit_the_corrupted_run(name):
    config, params = make_model(name)
    clean, corrupted, cl, kl, lengths = prompts = make_prompts()
    labels = np.stack([cl, kl], 1)
    model = circuit_model(config, params)
    graph = model.graph
    valid = jnp.asarray(graph.valid, jnp.float32)
    last = jnp.asarray(lengths - 1)
    full, ld_clean, ld_corrupted = patched_logit_difference(model.config, model.weights, clean, corrupted, valid,
                                                            labels, last)
    expected_clean, logits = model_logit_difference(config, params, clean, labels, lengths)
    np.testing.assert_allclose(full, expected_clean, atol=2e-4)
    np.testing.assert_allclose(ld_clean, expected_clean, atol=2e-4)
    empty, _, _ = patched_logit_difference(model.config, model.weights, clean, corrupted, valid * 0, labels, last)
    np.testing.assert_allclose(empty, ld_corrupted, atol=2e-4)
    if name in RUN_INDEPENDENT:
        np.testing.assert_allclose(ld_corrupted, model_logit_difference(config, params, corrupted, labels, lengths)[0],
                                   atol=2e-4)
    assert faithfulness(config, model, full_circuit(graph), *prompts) == pytest.approx(1.0, abs=1e-3)
    _, ranks = hit_at_k(config, model, full_circuit(graph), clean, cl, lengths, k=3)
    np.testing.assert_array_equal(ranks, (logits > logits[np.arange(N), cl][:, None]).sum(1))


def test_held_coefficients_change_the_corrupted_run_only_where_they_depend_on_it():
    """dlerp's gate reads the branch outputs: with the clean run's gate the corrupted run differs from the
    model's own corrupted run (the definition in docs/circuits.md), the clean run does not."""
    config, params = make_model("dlerp")
    clean, corrupted, cl, kl, lengths = make_prompts()
    model = circuit_model(config, params)
    held = plain_run(model.config, model.weights, jnp.asarray(clean)).merges
    own = plain_run(model.config, model.weights, jnp.asarray(corrupted))
    with_held = plain_run(model.config, model.weights, jnp.asarray(corrupted), held)
    labels, last = jnp.asarray(np.stack([cl, kl], 1)), jnp.asarray(lengths - 1)
    ld = [logit_difference(model.config, model.weights, last_position(r.resid, last), labels) for r in (own, with_held)]
    np.testing.assert_allclose(ld[0], model_logit_difference(config, params, corrupted, np.asarray(labels), lengths)[0],
                               atol=2e-4)
    assert np.abs(np.asarray(ld[0]) - np.asarray(ld[1])).max() > 1e-3


EDGES = ["input->a0.h1<q>", "a0.h0->m0", "m0->a1.h2<k>", "a0.h3->a1.h0<v>", "m0->logits", "input->logits",
         "a1.h1->logits", "input->m1"]
EXPANDED_EDGES = ["a0e.h1->m0e", "m0e->a1.h0<q>", "a0e.h2->logits", "input->a0e.h0<v>"]


@pytest.mark.parametrize("name", ["prog_biases_learned_norm"] + [
    pytest.param(name, marks=pytest.mark.slow) for name in ("biases_llama3_rope", "slerp_relaxed", "moe", "dlerpin",
                                                             "hybrid_dlerp")])
def test_eap_scores_are_the_derivative_of_edge_patching(name):
    """S[u, v] = -sum_i w_i d LD_i / d eps with edge u->v carrying clean + eps (corrupted - clean): taps and
    patching are two code paths through the same forward."""
    config, params = make_model(name)
    clean, corrupted, cl, kl, lengths = prompts = make_prompts()
    model = circuit_model(config, params)
    graph = model.graph
    scores = attribute(config, model, *prompts, method="EAP", normalization="per_item", batch_size=N)
    names = EDGES + (EXPANDED_EDGES if "a0e.h0" in graph.sources else [])
    labels, last = np.stack([cl, kl], 1), jnp.asarray(lengths - 1)
    eps = 1e-2
    for edge in names:
        src, dst = edge.split("->")
        u, v = graph.source_index(src), graph.destination_index(dst)
        keep = graph.valid.astype(np.float32)
        values = []
        for step in (eps, -eps):
            keep[u, v] = 1 - step
            ld = patched_logit_difference(model.config, model.weights, clean, corrupted, jnp.asarray(keep), labels,
                                          last)[0]
            values.append(-np.mean(np.asarray(ld, np.float64)))
        expected = (values[0] - values[1]) / (2 * eps)
        scale = np.abs(scores.matrix).max()
        assert abs(scores.matrix[u, v] - expected) < 2e-3 * scale, (edge, scores.matrix[u, v], expected)


@pytest.mark.parametrize("name", ["biases_llama3_rope", "dlerp", "hybrid_dlerp"])
def test_mean_ablation_reference_is_the_mean_over_prompts_reaching_each_position(name):
    config, params = make_model(name)
    clean, _, cl, _, lengths = make_prompts()
    model = circuit_model(config, params)
    prompts = prepare(clean, None, cl, None, lengths, V)
    mean = mean_reference(model.config, model.weights, prompts, batch_size=3)     # two chunks, one partial
    sources = np.asarray(plain_run(model.config, model.weights, jnp.asarray(clean)).sources)   # [S, N, T, D]
    reach = (np.arange(T)[None] < lengths[:, None]).astype(np.float64)                         # [N, T]
    expected = (sources * reach[None, :, :, None]).sum(1) / reach.sum(0)[None, :, None]
    got = np.concatenate([np.asarray(g) for g in mean.reads[-1]], axis=0)[:, 0, :T]
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", ["linear_rope_tied", "dlerp", "stack"])
def test_mean_ablation_of_identical_prompts_is_the_model_whatever_the_circuit(name):
    """Every prompt the same: the mean of a node's outputs is its own output, so ablating any edge to the mean
    changes nothing, while zero-ablating half the edges does."""
    config, params = make_model(name)
    clean, _, cl, _, _ = make_prompts()
    same, labels, lengths = np.repeat(clean[:1], N, 0), np.full(N, cl[0]), np.full(N, T)
    model = circuit_model(config, params)
    half = circuit_from_edges(model.graph, np.random.RandomState(0).rand(*model.graph.valid.shape) < 0.5, prune=False)
    _, model_ranks = hit_at_k(config, model, None, same, labels, lengths, k=3)
    _, mean_ranks = hit_at_k(config, model, half, same, labels, lengths, k=3, ablation="mean")
    np.testing.assert_array_equal(mean_ranks, model_ranks)
    _, zero_ranks = hit_at_k(config, model, half, same, labels, lengths, k=3)
    assert not np.array_equal(zero_ranks, model_ranks)
    logits = np.asarray(forward(config, params, same))[:, -1]
    np.testing.assert_array_equal(model_ranks, (logits > logits[:, cl[0]][:, None]).sum(1))
    with pytest.raises(ValueError, match="ablation 'median' is not one of zero, mean"):
        hit_at_k(config, model, half, same, labels, lengths, ablation="median")
