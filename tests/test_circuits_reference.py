"""The knowledge-circuits reference case (shared/reference/circuits/tiny_llama_mha), produced with the paper's
own code: our EAP scores, names, valid mask, baseline metrics and top-n edge sets must reproduce it."""
from __future__ import annotations

import json

import numpy as np
import pytest
from reference import reference_dir

from jax_controlllm.circuits import attribute, circuit_model, evaluate_circuit, full_circuit, hit_at_k, top_n_circuit
from jax_controlllm.config import model_config_from_hf

CASE = reference_dir("circuits", "tiny_llama_mha")
pytestmark = pytest.mark.skipif(not CASE.is_dir(), reason=f"reference case not found at {CASE}")


@pytest.fixture(scope="module")
def case():
    from safetensors.numpy import load_file
    config = model_config_from_hf(json.loads((CASE / "config.json").read_text()))
    tensors = load_file(str(CASE / "model.safetensors"))
    prompts = json.loads((CASE / "prompts.json").read_text())
    assert prompts["batch_size"] == 16 and prompts["n_items"] == 24
    s = prompts["sets"]["equal"]
    args = (np.array(s["clean_padded"]), np.array(s["corrupted_padded"]), np.array(s["clean_label"]),
            np.array(s["corrupted_label"]), np.array(s["lengths"]))
    expected = dict(np.load(CASE / "expected.npz"))
    return config, circuit_model(config, tensors), args, expected


@pytest.fixture(scope="module")
def eap(case):
    config, model, args, _ = case
    return attribute(config, model, *args, method="EAP", batch_size=16)


def _rel(a, b):
    return np.abs(a - b).max() / np.abs(b).max()


def test_graph_names_and_edges(eap, case):
    expected = case[3]
    assert list(eap.sources) == list(expected["src_names"])
    assert list(eap.destinations) == list(expected["dst_names"])
    np.testing.assert_array_equal(eap.valid, expected["valid_mask"])
    assert eap.graph.n_edges == 262


def test_eap_scores(eap, case):
    expected = case[3]
    # the README: a float32 re-implementation matches the float64 reference to about 1e-5 of max |score|
    assert _rel(eap.matrix, expected["eap_scores"]) < 1e-5
    np.testing.assert_array_equal(eap.matrix[~expected["valid_mask"]], 0)
    # the 6 edges that only matter at the (shared) last token score exactly 0
    zero = [eap.graph.edge_name(s, d) for s, d in np.argwhere(eap.valid & (eap.matrix == 0))]
    assert sorted(zero) == sorted([f"input->a2.h{h}<q>" for h in range(4)] + ["input->m2", "input->logits"])


def test_baseline_metrics(eap, case):
    expected = case[3]
    np.testing.assert_allclose(eap.metric_clean_per_item, expected["metric_clean_per_item"], atol=1e-5)
    np.testing.assert_allclose(eap.metric_corrupted_per_item, expected["metric_corrupted_per_item"], atol=1e-5)
    assert eap.metric_clean == pytest.approx(float(expected["metric_clean"]), abs=1e-6)
    assert eap.metric_corrupted == pytest.approx(float(expected["metric_corrupted"]), abs=1e-6)


@pytest.mark.parametrize("n", [50, 100, 200])
def test_top_n_edge_sets(eap, case, n):
    """Same top-n edges, before and after pruning, as the reference scores give."""
    class Reference:
        graph, matrix = eap.graph, case[3]["eap_scores"]

    for prune in (False, True):
        ours, theirs = top_n_circuit(eap, n, prune=prune), top_n_circuit(Reference, n, prune=prune)
        assert ours.edges == theirs.edges
        assert ours.nodes == theirs.nodes
    assert top_n_circuit(eap, n, prune=False).n_edges == n


def test_batch_size_trap(case):
    """One batch of 24 weights items differently from the reference's batches of 16 + 8."""
    config, model, args, expected = case
    one_batch = attribute(config, model, *args, method="EAP", batch_size=24, compute_batch_size=16)
    assert _rel(one_batch.matrix, expected["eap_scores"]) > 0.1
    per_item = attribute(config, model, *args, method="EAP", normalization="per_item", compute_batch_size=16)
    np.testing.assert_allclose(per_item.matrix, one_batch.matrix * 24, rtol=1e-4,
                               atol=1e-6 * np.abs(per_item.matrix).max())


def test_eap_ig_with_one_step_is_eap(case):
    config, model, args, expected = case
    ig1 = attribute(config, model, *args, method="EAP-IG", ig_steps=1)
    assert _rel(ig1.matrix, expected["eap_scores"]) < 1e-5       # k = 1 of 1 is the clean point: EAP


@pytest.mark.slow
def test_eap_ig_circuits_evaluation(case):
    config, model, args, expected = case
    ig = attribute(config, model, *args, method="EAP-IG", ig_steps=5)
    assert ig.ig_steps == 5 and _rel(ig.matrix, expected["eap_scores"]) > 1e-2
    full = evaluate_circuit(config, model, full_circuit(ig.graph), *args)
    assert full.faithfulness == pytest.approx(1.0, abs=1e-5)
    assert full.metric_clean == pytest.approx(float(expected["metric_clean"]), abs=1e-6)
    assert full.metric_corrupted == pytest.approx(float(expected["metric_corrupted"]), abs=1e-6)
    faith = [evaluate_circuit(config, model, top_n_circuit(ig, n), *args).faithfulness for n in (100, 200)]
    assert 0 < faith[0] < faith[1] < 1.0001
    hits, ranks = hit_at_k(config, model, full_circuit(ig.graph), args[0], args[2], args[4])
    assert hits == hit_at_k(config, model, None, args[0], args[2], args[4])[0] == 1.0
    assert ranks.max() <= 9
