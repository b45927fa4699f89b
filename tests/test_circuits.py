"""jax_controlllm.circuits checked against an independent float64 numpy implementation (in this file):
EAP and EAP-IG scores by central finite differences on every edge, edge patching (faithfulness) and zero
ablation (Hit@k) by explicit patched forward passes, on tiny random plain / GQA / Control LLM models."""
from __future__ import annotations

import numpy as np
import pytest

from jax_controlllm.circuits import (
    attribute,
    circuit_from_edges,
    circuit_model,
    evaluate_circuit,
    faithfulness,
    full_circuit,
    hit_at_k,
    prune_dead_nodes,
    top_n_circuit,
)
from jax_controlllm.circuits.graph import Graph
from jax_controlllm.config import ExpansionConfig, ModelConfig

# ----------------------------------------------------------------------------------------------
# The independent reference implementation
# ----------------------------------------------------------------------------------------------



def _rms(x, w, eps, mix=None):
    out = w * x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + eps)
    return out if mix is None else mix * x + (1 - mix) * out


def _rope(x, inv_freq):
    t = x.shape[-2]
    ang = np.arange(t)[:, None] * inv_freq[None, :]
    cos, sin = np.cos(np.concatenate([ang, ang], -1)), np.sin(np.concatenate([ang, ang], -1))
    half = x.shape[-1] // 2
    rot = np.concatenate([-x[..., half:], x[..., :half]], -1)
    return x * cos + rot * sin


class NaiveModel:
    def __init__(self, tensors, n_heads, n_kv, eps, theta, kinds, merge=None, mixes=None, tied=False):
        self.t = {k: np.asarray(v, np.float64) for k, v in tensors.items()}
        self.h, self.kv, self.eps, self.kinds, self.merge = n_heads, n_kv, eps, kinds, merge
        self.mixes = mixes or {}
        d = self.t["model.embed_tokens.weight"].shape[1]
        q = self.t[self._prefix(0, 0) + ".self_attn.q_proj.weight"]
        self.dh = q.shape[0] // n_heads
        self.inv_freq = 1.0 / theta ** (np.arange(0, self.dh, 2) / self.dh)
        self.unembed = self.t["model.embed_tokens.weight"] if tied else self.t["lm_head.weight"]
        self.d = d

    def _prefix(self, layer, branch):
        if self.kinds[layer] == "llama":
            return f"model.layers.{layer}"
        return f"model.layers.{layer}." + ("pretrained_layer" if branch == 0 else "expanded_layer")

    def embed(self, ids):
        return self.t["model.embed_tokens.weight"][np.asarray(ids)]

    def _head(self, prefix, head, xq, xk, xv, mix):
        t, dh, g = self.t, self.dh, head // (self.h // self.kv)
        ln = t[prefix + ".input_layernorm.weight"]
        wq = t[prefix + ".self_attn.q_proj.weight"][head * dh:(head + 1) * dh]
        wk = t[prefix + ".self_attn.k_proj.weight"][g * dh:(g + 1) * dh]
        wv = t[prefix + ".self_attn.v_proj.weight"][g * dh:(g + 1) * dh]
        wo = t[prefix + ".self_attn.o_proj.weight"][:, head * dh:(head + 1) * dh]
        q = _rope(_rms(xq, ln, self.eps, mix) @ wq.T, self.inv_freq)
        k = _rope(_rms(xk, ln, self.eps, mix) @ wk.T, self.inv_freq)
        v = _rms(xv, ln, self.eps, mix) @ wv.T
        s = q @ np.swapaxes(k, -1, -2) / np.sqrt(dh)
        n = s.shape[-1]
        s = np.where(np.tril(np.ones((n, n), bool)), s, -np.inf)
        p = np.exp(s - s.max(-1, keepdims=True))
        p /= p.sum(-1, keepdims=True)
        return (p @ v) @ wo.T

    def _mlp(self, prefix, x, mix):
        t = self.t
        n = _rms(x, t[prefix + ".post_attention_layernorm.weight"], self.eps, mix)
        gate, up = n @ t[prefix + ".mlp.gate_proj.weight"].T, n @ t[prefix + ".mlp.up_proj.weight"].T
        return (gate / (1 + np.exp(-gate)) * up) @ t[prefix + ".mlp.down_proj.weight"].T

    def run(self, embeds, read=None, gates=None):
        """Forward pass. ``read(dst_name, resid_default, sources)`` may replace any destination's input (sources:
        {name: folded output so far}, raw heads under name + '/raw'). ``gates`` fixes the merge weights
        {layer: w}. Returns (final residual [B,T,D], sources dict, gates used)."""
        read = read or (lambda name, x, sources: x)
        resid = np.asarray(embeds, np.float64)
        sources, used_gates = {"input": resid}, {}
        for layer, kind in enumerate(self.kinds):
            branches = []
            for branch in range(2 if kind == "controlled" else 1):
                tag, prefix = f"{layer}{'e' if branch else ''}", self._prefix(layer, branch)
                mix = self.mixes.get(layer) if branch == 1 else None
                heads = []
                for head in range(self.h):
                    xs = [read(f"a{tag}.h{head}<{c}>", resid, sources) for c in "qkv"]
                    heads.append(self._head(prefix, head, *xs, mix))
                mid = resid + sum(heads)
                raw = {f"a{tag}.h{i}": heads[i] for i in range(self.h)}
                m = self._mlp(prefix, read(f"m{tag}", mid, {**sources, **{k + "/raw": v for k, v in raw.items()}}),
                              mix)
                branches.append((tag, heads, m))
            if kind == "llama":
                (tag, heads, m), = branches
                folds = [1.0]
            else:
                p = resid + sum(branches[0][1]) + branches[0][2]
                e = resid + sum(branches[1][1]) + branches[1][2]
                w = gates[layer] if gates is not None else self._gate(layer, p, e)
                used_gates[layer] = w
                folds = [1 - w, w]
            for (tag, heads, m), f in zip(branches, folds):
                for i, head in enumerate(heads):
                    sources[f"a{tag}.h{i}"] = f * head
                    sources[f"a{tag}.h{i}/raw"] = head
                sources[f"m{tag}"] = f * m
                resid = resid + f * (sum(heads) + m)
        return read("logits", resid, sources), sources, used_gates

    def _gate(self, layer, p, e):
        t = self.t
        if self.merge == "lerp":
            return 1 / (1 + np.exp(-t[f"model.layers.{layer}.interpolation_factor"].reshape(())))
        w = t[f"model.layers.{layer}.interp_weight.fc.weight"].reshape(-1)
        b = t[f"model.layers.{layer}.interp_weight.fc.bias"].reshape(())
        return (1 / (1 + np.exp(-(np.concatenate([p, e], -1) @ w + b))))[..., None]

    def logits_at(self, resid, last):
        x = resid[np.arange(len(last)), last]
        return _rms(x, self.t["model.norm.weight"], self.eps) @ self.unembed.T

    def logit_diff(self, resid, last, clean_label, corrupted_label):
        z = self.logits_at(resid, last)
        idx = np.arange(len(last))
        return z[idx, clean_label] - z[idx, corrupted_label]


# ----------------------------------------------------------------------------------------------
# Tiny random models (Hugging Face tensors) and prompts
# ----------------------------------------------------------------------------------------------

D, F, V, T = 16, 32, 40, 7


def _layer_tensors(rs, prefix, h, kv, dh):
    def w(out, inp, scale=1.0):
        return (scale * rs.normal(size=(out, inp)) / np.sqrt(inp)).astype(np.float32)
    return {f"{prefix}.input_layernorm.weight": (1 + 0.2 * rs.normal(size=D)).astype(np.float32),
            f"{prefix}.post_attention_layernorm.weight": (1 + 0.2 * rs.normal(size=D)).astype(np.float32),
            f"{prefix}.self_attn.q_proj.weight": w(h * dh, D, 1.5),
            f"{prefix}.self_attn.k_proj.weight": w(kv * dh, D, 1.5),
            f"{prefix}.self_attn.v_proj.weight": w(kv * dh, D), f"{prefix}.self_attn.o_proj.weight": w(D, h * dh),
            f"{prefix}.mlp.gate_proj.weight": w(F, D), f"{prefix}.mlp.up_proj.weight": w(F, D),
            f"{prefix}.mlp.down_proj.weight": w(D, F)}


def make_model(heads=4, kv=2, layers=2, controlled=(), merge="lerp", norm_alpha=0.0, seed=0):
    """(ModelConfig, HF tensors, NaiveModel). Blocks listed in ``controlled`` are Control LLM concat blocks
    with independent random pretrained/expanded branches."""
    rs = np.random.RandomState(seed)
    dh = D // heads
    expansion = None
    if controlled:
        expansion = ExpansionConfig(expand_type="concat", num_exp_layers=len(controlled), layers=list(controlled),
                                    merge_method=merge, interpolation_norm_alpha=norm_alpha, num_ori_layers=layers)
    config = ModelConfig(vocab_size=V, hidden_size=D, intermediate_size=F, num_hidden_layers=layers,
                         num_attention_heads=heads, num_key_value_heads=kv, max_position_embeddings=64,
                         rms_norm_eps=1e-5, rope_theta=10000.0, expansion=expansion)
    tensors = {"model.embed_tokens.weight": rs.normal(size=(V, D)).astype(np.float32),
               "model.norm.weight": (1 + 0.2 * rs.normal(size=D)).astype(np.float32),
               "lm_head.weight": (2 * rs.normal(size=(V, D)) / np.sqrt(D)).astype(np.float32)}
    kinds, mixes = [], {}
    for layer in range(layers):
        if layer not in controlled:
            tensors.update(_layer_tensors(rs, f"model.layers.{layer}", heads, kv, dh))
            kinds.append("llama")
            continue
        kinds.append("controlled")
        for branch in ("pretrained_layer", "expanded_layer"):
            tensors.update(_layer_tensors(rs, f"model.layers.{layer}.{branch}", heads, kv, dh))
        if merge == "lerp":
            tensors[f"model.layers.{layer}.interpolation_factor"] = np.array([0.4], np.float32)
        else:
            fc = (rs.normal(size=(1, 2 * D)) / 4).astype(np.float32)
            tensors[f"model.layers.{layer}.interp_weight.fc.weight"] = fc
            tensors[f"model.layers.{layer}.interp_weight.fc.bias"] = np.array([0.3], np.float32)
        if norm_alpha == -1:
            for norm in ("input_layernorm", "post_attention_layernorm"):
                key = f"model.layers.{layer}.expanded_layer.{norm}.interpolation_factor"
                tensors[key] = np.array([0.5], np.float32)
            mixes[layer] = 2 / (1 + np.exp(-0.5)) - 1
        elif norm_alpha > 0:
            mixes[layer] = norm_alpha
    naive = NaiveModel(tensors, heads, kv, 1e-5, 10000.0, kinds, merge if controlled else None, mixes)
    return config, tensors, naive


def make_prompts(n=5, seed=1):
    """Right-padded clean/corrupted pairs of equal (mixed) lengths with distinct label pairs."""
    rs = np.random.RandomState(seed)
    lengths = rs.randint(3, T + 1, size=n)
    lengths[0] = T
    clean, corrupted = np.zeros((n, T), np.int64), np.zeros((n, T), np.int64)
    for i, length in enumerate(lengths):
        clean[i, :length] = rs.randint(3, V, size=length)
        corrupted[i, :length] = clean[i, :length]
        corrupted[i, 1:3] = rs.randint(3, V, size=2)       # a different "subject"
    clean_label = rs.randint(3, V, size=n)
    corrupted_label = (clean_label + 1 + rs.randint(0, V - 4, size=n)) % (V - 3) + 3
    return clean, corrupted, clean_label, corrupted_label, lengths


def _intra(graph: Graph, src: int, dst: int) -> bool:
    """Edge from a head into its own branch's MLP (read unscaled)."""
    return graph.destinations[dst].startswith("m") and graph.sources[src].startswith("a") and \
        graph.sources[src].split(".")[0][1:] == graph.destinations[dst][1:]


def finite_difference_scores(naive, graph, prompts, item_weight, alphas=None, eps=1e-5):
    """S[u, v] = d/de L(x_v + e delta_u) by central differences, averaged over the IG points (or the clean
    run), with L = -sum_i w_i LD_i. Merge gates are held at the clean run's values in every run."""
    clean, corrupted, cl, kl, lengths = prompts
    last = lengths - 1
    e_clean, e_corr = naive.embed(clean), naive.embed(corrupted)
    _, s_clean, gates = naive.run(e_clean)
    _, s_corr, _ = naive.run(e_corr, gates=gates)
    delta = {k: s_corr[k] - s_clean[k] for k in s_clean}
    points = [e_clean] if alphas is None else [e_corr + a * (e_clean - e_corr) for a in alphas]
    scores = np.zeros((graph.n_sources, graph.n_destinations))
    for e in points:
        for u, v in zip(*np.nonzero(graph.valid)):
            d_u = delta[graph.sources[u] + ("/raw" if _intra(graph, u, v) else "")]
            target = graph.destinations[v]

            def loss(step):
                read = lambda name, x, sources: x + step * d_u if name == target else x
                resid, _, _ = naive.run(e, read, gates)
                return -np.sum(item_weight * naive.logit_diff(resid, last, cl, kl))

            scores[u, v] += (loss(eps) - loss(-eps)) / (2 * eps)
    return scores / len(points)


def rel_diff(a, b):
    return np.abs(a - b).max() / np.abs(b).max()


# ----------------------------------------------------------------------------------------------
# Attribution
# ----------------------------------------------------------------------------------------------

# One chunk shape for every call below (compute_batch_size=CHUNK): the jitted steps compile once per model.
CHUNK = 8

MODELS = {
    "gqa": dict(heads=4, kv=2),
    "mha_3_layers": dict(heads=2, kv=2, layers=3),
    "lerp": dict(heads=2, kv=1, controlled=(1,), merge="lerp"),
    "dlerp_relaxed": dict(heads=2, kv=1, controlled=(0,), merge="dlerp", norm_alpha=0.3),
    "lerp_learned_norm": dict(heads=2, kv=2, controlled=(1,), merge="lerp", norm_alpha=-1),
}


SLOW = pytest.mark.slow


@pytest.mark.parametrize("name", ["gqa", "lerp", "dlerp_relaxed", pytest.param("mha_3_layers", marks=SLOW),
                                  pytest.param("lerp_learned_norm", marks=SLOW)])
def test_eap_matches_finite_differences(name):
    config, tensors, naive = make_model(**MODELS[name])
    prompts = make_prompts()
    scores = attribute(config, tensors, *prompts, method="EAP", batch_size=2, compute_batch_size=CHUNK)
    weight = np.array([1 / (5 * 2)] * 4 + [1 / 5])          # batches {0,1}, {2,3}, {4}
    expected = finite_difference_scores(naive, scores.graph, prompts, weight)
    assert rel_diff(scores.matrix, expected) < 1e-5
    assert np.all(scores.matrix[~scores.valid] == 0)


@pytest.mark.parametrize("name", ["gqa", pytest.param("dlerp_relaxed", marks=SLOW)])
def test_eap_ig_matches_finite_differences(name):
    config, tensors, naive = make_model(**MODELS[name])
    prompts = make_prompts()
    scores = attribute(config, tensors, *prompts, method="EAP-IG", ig_steps=3, normalization="per_item",
                       compute_batch_size=CHUNK)
    expected = finite_difference_scores(naive, scores.graph, prompts, np.full(5, 1 / 5), alphas=[1 / 3, 2 / 3, 1])
    assert rel_diff(scores.matrix, expected) < 1e-5
    eap = attribute(config, tensors, *prompts, method="EAP", normalization="per_item", compute_batch_size=CHUNK)
    assert rel_diff(scores.matrix, eap.matrix) > 1e-2     # the interpolation points matter


def test_baseline_metrics_match_naive():
    config, tensors, naive = make_model(**MODELS["lerp"])
    clean, corrupted, cl, kl, lengths = prompts = make_prompts()
    scores = attribute(config, tensors, *prompts, method="EAP", compute_batch_size=CHUNK)
    for ids, got in ((clean, scores.metric_clean_per_item), (corrupted, scores.metric_corrupted_per_item)):
        resid, _, _ = naive.run(naive.embed(ids))           # lerp: the held gate is the corrupted run's own
        np.testing.assert_allclose(got, naive.logit_diff(resid, lengths - 1, cl, kl), atol=2e-5)


def test_scores_save_and_load(tmp_path):
    config, tensors, _ = make_model(**MODELS["gqa"])
    scores = attribute(config, tensors, *make_prompts(), method="EAP", compute_batch_size=CHUNK)
    scores.save(tmp_path / "scores.npz")
    loaded = type(scores).load(tmp_path / "scores.npz")
    np.testing.assert_array_equal(loaded.matrix, scores.matrix)
    assert loaded.graph == scores.graph and loaded.method == "EAP" and loaded.metric_clean == scores.metric_clean
    edges = scores.edges()
    assert len(edges) == scores.graph.n_edges and list(edges)[0] == "input->a0.h0<q>"


def test_ig_with_one_step_is_eap():
    config, tensors, _ = make_model(**MODELS["gqa"])
    prompts = make_prompts()
    eap = attribute(config, tensors, *prompts, method="EAP", compute_batch_size=CHUNK)
    ig1 = attribute(config, tensors, *prompts, method="EAP-IG", ig_steps=1, compute_batch_size=CHUNK)
    assert rel_diff(ig1.matrix, eap.matrix) < 1e-5


def test_normalisation_weights_and_chunking():
    """Scores are linear in the per-item weights: dkc = sum_i S_i / (N |batch(i)|); chunking changes nothing."""
    config, tensors, _ = make_model(**MODELS["gqa"])
    clean, corrupted, cl, kl, lengths = make_prompts(n=5)
    singles = [attribute(config, tensors, clean[i:i + 1], corrupted[i:i + 1], cl[i:i + 1], kl[i:i + 1],
                         lengths[i:i + 1], method="EAP", normalization="per_item", compute_batch_size=CHUNK).matrix
               for i in range(5)]
    dkc = attribute(config, tensors, clean, corrupted, cl, kl, lengths, method="EAP", batch_size=3,
                    compute_batch_size=CHUNK)
    expected = sum(s / (5 * size) for s, size in zip(singles, [3, 3, 3, 2, 2]))
    assert rel_diff(dkc.matrix, expected) < 1e-5
    per_item = attribute(config, tensors, clean, corrupted, cl, kl, lengths, method="EAP", normalization="per_item",
                         compute_batch_size=2)
    assert rel_diff(per_item.matrix, sum(singles) / 5) < 1e-5
    one_batch = attribute(config, tensors, clean, corrupted, cl, kl, lengths, method="EAP", batch_size=5,
                          compute_batch_size=CHUNK)
    assert rel_diff(one_batch.matrix * 5, per_item.matrix) < 1e-5


def test_extra_padding_changes_nothing():
    config, tensors, _ = make_model(**MODELS["gqa"])
    clean, corrupted, cl, kl, lengths = make_prompts()
    base = attribute(config, tensors, clean, corrupted, cl, kl, lengths, method="EAP", compute_batch_size=CHUNK)
    pad = lambda x: np.concatenate([x, np.full((len(x), 9), 7)], 1)
    padded = attribute(config, tensors, pad(clean), pad(corrupted), cl, kl, lengths, method="EAP",
                       compute_batch_size=CHUNK)
    assert rel_diff(padded.matrix, base.matrix) < 1e-5


@pytest.mark.slow
def test_bfloat16_is_close_to_float32():
    config, tensors, _ = make_model(**MODELS["gqa"])
    prompts = make_prompts()
    f32 = attribute(config, tensors, *prompts, compute_batch_size=CHUNK)
    bf16 = attribute(config, tensors, *prompts, dtype="bfloat16", compute_batch_size=CHUNK)
    assert rel_diff(bf16.matrix, f32.matrix) < 0.1
    top = lambda s: set(np.argsort(-np.abs(s.matrix).ravel())[:10])
    assert len(top(f32) & top(bf16)) >= 7


def test_bad_inputs_are_refused_clearly():
    config, tensors, _ = make_model(**MODELS["gqa"])
    clean, corrupted, cl, kl, lengths = make_prompts()
    with pytest.raises(ValueError, match="equal token lengths"):
        attribute(config, tensors, clean, corrupted[:, :-1], cl, kl, lengths)
    with pytest.raises(ValueError, match="label ids must lie"):
        attribute(config, tensors, clean, corrupted, cl + V, kl, lengths)
    with pytest.raises(ValueError, match="lengths"):
        attribute(config, tensors, clean, corrupted, cl, kl, lengths + T)
    with pytest.raises(ValueError, match="method"):
        attribute(config, tensors, clean, corrupted, cl, kl, lengths, method="IG")
    with pytest.raises(ValueError, match="normalization"):
        attribute(config, tensors, clean, corrupted, cl, kl, lengths, normalization="mean")


# ----------------------------------------------------------------------------------------------
# Patching: faithfulness and Hit@k
# ----------------------------------------------------------------------------------------------

def _drop_edges(graph, *edges):
    mask = graph.valid.copy()
    for src, dst in edges:
        mask[graph.source_index(src), graph.destination_index(dst)] = False
    return circuit_from_edges(graph, mask, prune=False)


@pytest.mark.parametrize("name", ["gqa", pytest.param("dlerp_relaxed", marks=SLOW)])
def test_full_and_empty_circuits(name):
    config, tensors, naive = make_model(**MODELS[name])
    clean, corrupted, cl, kl, lengths = prompts = make_prompts()
    graph = circuit_model(config, tensors).graph
    assert faithfulness(config, tensors, full_circuit(graph), *prompts) == pytest.approx(1.0, abs=1e-5)
    empty = circuit_from_edges(graph, np.zeros_like(graph.valid))
    assert empty.is_empty and faithfulness(config, tensors, empty, *prompts) == 0.0
    full_hits, full_ranks = hit_at_k(config, tensors, full_circuit(graph), clean, cl, lengths, k=3)
    model_hits, model_ranks = hit_at_k(config, tensors, None, clean, cl, lengths, k=3)
    assert full_hits == model_hits and np.array_equal(full_ranks, model_ranks)
    logits = naive.logits_at(naive.run(naive.embed(clean))[0], lengths - 1)
    expected_ranks = (logits > logits[np.arange(5), cl][:, None]).sum(1)
    np.testing.assert_array_equal(model_ranks, expected_ranks)


@pytest.mark.parametrize("name,edge", [("gqa", ("a0.h1", "a1.h2<k>")), ("gqa", ("input", "m1")),
                                       ("lerp", ("a1.h0", "m1")), ("lerp", ("a1e.h1", "m1e")),
                                       ("lerp", ("m0", "a1e.h0<v>")), ("dlerp_relaxed", ("m0e", "logits"))])
def test_patching_one_edge_matches_naive(name, edge):
    """Edge u->v outside the circuit: v reads a_u(corrupted) instead of a_u(clean); nothing else changes."""
    config, tensors, naive = make_model(**MODELS[name])
    clean, corrupted, cl, kl, lengths = prompts = make_prompts()
    graph = circuit_model(config, tensors).graph
    result = evaluate_circuit(config, tensors, _drop_edges(graph, edge), *prompts)
    src, dst = edge
    key = src + "/raw" if _intra(graph, graph.source_index(src), graph.destination_index(dst)) else src
    _, clean_sources, gates = naive.run(naive.embed(clean))
    corrupted_out = naive.run(naive.embed(corrupted), gates=gates)[1][key]     # merge gates held at the clean run's
    clean_out = clean_sources[key]
    read = lambda name, x, sources: x - clean_out + corrupted_out if name == dst else x
    expected = naive.logit_diff(naive.run(naive.embed(clean), read, gates)[0], lengths - 1, cl, kl)
    np.testing.assert_allclose(result.circuit_per_item, expected, atol=3e-5)
    assert abs(result.metric_circuit - result.metric_clean) > 1e-4     # the patch did something


def test_patching_all_input_edges_gives_the_corrupted_run():
    config, tensors, _ = make_model(**MODELS["lerp"])
    prompts = make_prompts()
    graph = circuit_model(config, tensors).graph
    mask = graph.valid.copy()
    mask[0] = False
    result = evaluate_circuit(config, tensors, circuit_from_edges(graph, mask, prune=False), *prompts)
    np.testing.assert_allclose(result.circuit_per_item, result.corrupted_per_item, atol=2e-5)
    assert abs(result.faithfulness) < 1e-4      # float32 summation order only


def test_hit_at_k_zero_ablates_edges_outside_the_circuit():
    config, tensors, naive = make_model(**MODELS["gqa"])
    clean, corrupted, cl, kl, lengths = make_prompts()
    graph = circuit_model(config, tensors).graph
    circuit = _drop_edges(graph, ("m0", "a1.h3<q>"), ("a1.h0", "logits"))
    _, ranks = hit_at_k(config, tensors, circuit, clean, cl, lengths, k=5)
    out = naive.run(naive.embed(clean))[1]
    zero = {"a1.h3<q>": out["m0"], "logits": out["a1.h0"]}
    read = lambda name, x, sources: x - zero[name] if name in zero else x
    logits = naive.logits_at(naive.run(naive.embed(clean), read)[0], lengths - 1)
    expected = (logits > logits[np.arange(5), cl][:, None]).sum(1)
    np.testing.assert_array_equal(ranks, expected)


# ----------------------------------------------------------------------------------------------
# Selection and pruning
# ----------------------------------------------------------------------------------------------

class _FakeScores:
    def __init__(self, graph, matrix):
        self.graph, self.matrix = graph, matrix


def test_top_n_breaks_ties_in_edge_order_and_prunes():
    graph = Graph(2, ("llama", "llama"))
    scores = np.where(graph.valid, 1.0, 0.0).astype(np.float32)     # all tied: the first n in edge order
    circuit = top_n_circuit(_FakeScores(graph, scores), 6, prune=False)
    first = [graph.edge_name(*np.argwhere(graph.edge_order == i)[0]) for i in range(6)]
    assert sorted(circuit.edges) == sorted(first)
    assert first[:3] == ["input->a0.h0<q>", "input->a0.h0<k>", "input->a0.h0<v>"]
    # nothing reaches the logits: everything is pruned
    assert top_n_circuit(_FakeScores(graph, scores), 6).n_edges == 0


def test_pruning_passes():
    graph = Graph(1, ("llama", "llama"))
    edges = np.zeros_like(graph.valid)
    e = lambda s, d: (graph.source_index(s), graph.destination_index(d))
    for s, d in [("input", "a0.h0<q>"), ("a0.h0", "m0"), ("m0", "logits"),   # a live path
                 ("input", "a1.h0<v>"),                                       # a1.h0 feeds nothing: dropped
                 ("a0.h0", "m1")]:                                            # m1 feeds nothing: dropped
        edges[e(s, d)] = True
    kept, nodes = prune_dead_nodes(graph, edges)
    assert {graph.edge_name(*x) for x in np.argwhere(kept)} == {"input->a0.h0<q>", "a0.h0->m0", "m0->logits"}
    assert [n for n, k in zip(graph.node_names, nodes) if k] == ["input", "a0.h0", "m0", "logits"]
    # a node with outgoing but no incoming edges is dropped by the forward pass (with its outgoing edges)
    edges = np.zeros_like(graph.valid)
    edges[e("m0", "logits")] = edges[e("input", "logits")] = True
    kept, nodes = prune_dead_nodes(graph, edges)
    assert {graph.edge_name(*x) for x in np.argwhere(kept)} == {"input->logits"}


def test_circuit_entropy_and_summary():
    graph = Graph(1, ("llama",))
    matrix = np.zeros(graph.valid.shape, np.float32)
    matrix[0, graph.logits], matrix[1, graph.logits] = 3.0, -1.0
    matrix[0, graph.destination_index("a0.h0<q>")] = 0.5
    circuit = top_n_circuit(_FakeScores(graph, matrix), 3)
    p = np.array([3.0, 1.0, 0.5]) / 4.5
    assert circuit.entropy == pytest.approx(-(p * np.log(p)).sum())
    assert circuit.to_dict()["n_edges"] == 3 and circuit.nodes == ["input", "a0.h0", "logits"]


# ----------------------------------------------------------------------------------------------
# Head classes and the logit lens
# ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", ["gqa", "dlerp_relaxed"])
def test_head_dla_adds_up_to_each_heads_direct_effect(name):
    """Summed over source positions, a head's DLA is its (folded) output at the last position . u."""
    from jax_controlllm.circuits.heads import head_dla
    config, tensors, naive = make_model(**MODELS[name])
    clean, _, cl, _, lengths = make_prompts()
    dla = head_dla(config, tensors, clean, cl, lengths, batch_size=CHUNK)
    resid, sources, _ = naive.run(naive.embed(clean))
    last = lengths - 1
    final = resid[np.arange(5), last]
    u = naive.t["model.norm.weight"] * naive.unembed[cl] / np.sqrt(np.mean(final ** 2, -1, keepdims=True) + 1e-5)
    graph = circuit_model(config, tensors).graph
    heads = [n for n, is_head in zip(graph.sources, graph.is_head) if is_head]
    expected = np.stack([np.sum(sources[h][np.arange(5), last] * u, -1) for h in heads], 1)
    np.testing.assert_allclose(dla.sum(-1), expected, atol=1e-4 * np.abs(expected).max())
    pads = np.arange(T)[None] > last[:, None]
    assert np.all(np.moveaxis(dla, 2, 1)[pads] == 0)             # causal: nothing comes from the padding


def test_classify_heads():
    from jax_controlllm.circuits.heads import classify_heads
    subject = np.array([[False, True, True, False, False]])
    relation = np.array([[False, False, False, True, True]])
    dla = np.array([[[0.0, 3.0, -2.0, 0.5, 0.0],        # 5/5.5 from the subject: mover
                     [0.1, 0.2, 0.0, 1.0, -2.0],       # 3/3.3 from the relation: relation
                     [0.0, 1.0, 0.0, 1.0, 0.0]]])      # half and half: mixture
    classes = classify_heads(dla, subject, relation)
    assert [c["class"] for c in classes] == ["mover", "relation", "mixture"]
    assert classes[0]["subject_share"] == pytest.approx(5 / 5.5)


def test_logit_lens_last_layer_is_the_model_output():
    from jax_controlllm.circuits.lens import logit_lens
    config, tensors, naive = make_model(**MODELS["lerp"])
    clean, _, cl, _, lengths = make_prompts()
    lens = logit_lens(config, tensors, clean, cl, lengths, batch_size=CHUNK)
    logits = naive.logits_at(naive.run(naive.embed(clean))[0], lengths - 1)
    probs = np.exp(logits - logits.max(1, keepdims=True))
    probs /= probs.sum(1, keepdims=True)
    np.testing.assert_allclose(lens.probability[:, -1], probs[np.arange(5), cl], rtol=1e-4)
    np.testing.assert_array_equal(lens.rank[:, -1], (logits > logits[np.arange(5), cl][:, None]).sum(1))
    assert lens.probability.shape == (5, 2) and len(lens.summary()["mean_rank"]) == 2
