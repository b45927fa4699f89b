"""expansion.layers: auto (jax_controlllm.circuits.layer_choice): the per-layer share of a circuit, the choice of
layers, the base model's first-token answers, and the resolution once per run (a resume reuses it)."""
from __future__ import annotations

import jax
import numpy as np
import pytest
import yaml

from jax_controlllm.circuits.attribute import Scores
from jax_controlllm.circuits.graph import Graph
from jax_controlllm.circuits.layer_choice import (
    choose_layers,
    first_token_predictions,
    layer_shares,
    named_answer,
    resolve_auto_layers,
    top_layers,
)
from jax_controlllm.config import ConfigError, ModelConfig, load_config
from jax_controlllm.knowledge import (
    BOS_ID,
    EntityConfig,
    build_word_tokenizer,
    generate_entities,
    make_prompt_pairs,
    queries,
)
from jax_controlllm.model import forward, init_params


def _scores(graph: Graph, edges: dict) -> Scores:
    matrix = np.zeros(graph.valid.shape, np.float32)
    for name, value in edges.items():
        src, dst = name.split("->")
        matrix[graph.source_index(src), graph.destination_index(dst)] = value
    return Scores(graph, matrix, "EAP-IG", 5, "dkc", 1, np.zeros(1), np.zeros(1))


def test_layer_shares_count_each_edge_half_to_each_end():
    graph = Graph(2, ("llama",) * 3)
    edges = {"input->m0": 1.0, "m0->m2": -2.0, "m2->logits": 1.0, "input->a1.h0<q>": 3.0, "a1.h0->logits": 0.25}
    shares = layer_shares(_scores(graph, edges), top_n=len(edges))
    # by hand: each edge gives |s|/2 to the layer of each end; input and logits belong to no layer
    expected = np.array([0.5 + 1.0, 1.5 + 0.125, 1.0 + 0.5])
    np.testing.assert_allclose(shares, expected / expected.sum(), rtol=1e-6)
    # the top 2 edges (|3|, |-2|) lead nowhere (their heads' outputs are unread): pruned to an empty circuit
    assert not layer_shares(_scores(graph, edges), top_n=2).any()


def test_top_layers_are_the_largest_shares_ascending_ties_to_the_upper_layer():
    assert top_layers([0.1, 0.4, 0.1, 0.4], 2) == [1, 3]
    assert top_layers([0.2, 0.1, 0.2, 0.5], 2) == [2, 3]
    with pytest.raises(ConfigError, match="expansion.num_exp_layers"):
        top_layers([0.5, 0.5], 3)


def _tiny(tokenizer, layers=3):
    config = ModelConfig(vocab_size=tokenizer.get_vocab_size(), hidden_size=32, intermediate_size=64,
                         num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
                         max_position_embeddings=64, bos_token_id=BOS_ID, pad_token_id=0)
    return config, init_params(config, jax.random.PRNGKey(0))


def test_first_token_predictions_match_unpadded_forwards_and_named_answers_are_words():
    entities = generate_entities(EntityConfig(n_new=12, n_revised=0, attributes=("city",), seed=3))
    tokenizer = build_word_tokenizer([q.prompt + q.answer + "." for q in queries(entities)])
    config, params = _tiny(tokenizer)
    prompts = [tokenizer.encode(q.prompt).ids for q in queries(entities)[:2]]
    predicted = first_token_predictions(config, params, prompts)
    for ids, token in zip(prompts, predicted):
        assert token == int(np.asarray(forward(config, params, np.array([ids])))[0, -1].argmax())
    city = entities[0].attributes["city"]
    assert named_answer(tokenizer, tokenizer.token_to_id(city)) == city
    assert named_answer(tokenizer, tokenizer.token_to_id("the")) is None       # not a named answer
    assert named_answer(tokenizer, tokenizer.token_to_id(".")) is None


def test_choose_layers_on_a_tiny_model_gives_n_layers_and_shares():
    entities = generate_entities(EntityConfig(n_new=16, n_revised=0, attributes=("city",), seed=1))
    tokenizer = build_word_tokenizer([q.prompt + q.answer for q in queries(entities)])
    config, params = _tiny(tokenizer)
    def pairs_for(name):
        if name == "company":            # as make_prompt_pairs does when the base names too few answers
            raise ValueError("no clean/corrupted pairs for attribute 'company'")
        return make_prompt_pairs(entities, name, tokenizer, pad_id=0)

    choice = choose_layers(config, params, tokenizer, ["city", "company"], 2, top_n=40, ig_steps=2,
                           pairs_for=pairs_for)
    assert len(choice.layers) == 2 and choice.layers == sorted(choice.layers)
    assert all(0 <= i < 3 for i in choice.layers)
    assert sum(choice.shares) == pytest.approx(1.0, abs=1e-4)
    assert choice.layers == top_layers(choice.shares, 2)
    assert choice.pairs["city"] > 0 and choice.pairs["company"] == 0


def test_choose_layers_skips_relations_without_pairs_and_refuses_when_none_has_any():
    def pairs_for(name):
        raise ValueError(f"no clean/corrupted pairs for attribute {name!r}")
    graph_config = ModelConfig(vocab_size=8, hidden_size=8, intermediate_size=8, num_hidden_layers=2,
                               num_attention_heads=2, num_key_value_heads=1)
    with pytest.raises(ConfigError, match="expansion.layers: auto found no relation of city, company"):
        choose_layers(graph_config, None, None, ["city", "company"], 1, pairs_for=pairs_for)


def test_auto_is_accepted_by_the_config_and_refused_where_layers_are_built():
    run = load_config("configs/default.yaml", ["expansion.layers=auto"])
    assert run.expansion.layers == "auto"
    with pytest.raises(ConfigError, match="expansion.layers: expected a list of layer indices or auto"):
        load_config("configs/default.yaml", ["expansion.layers=everything"])
    from jax_controlllm.config import selected_layers
    with pytest.raises(ConfigError, match="expansion.layers: auto"):
        selected_layers(run.expansion, 30)


def test_resolve_auto_layers_reuses_the_run_directorys_choice(tmp_path):
    run = load_config("configs/tiny.yaml", ["expansion.layers=auto"])
    with pytest.raises(ConfigError, match="expansion.layers: auto needs a pretrained base"):
        resolve_auto_layers(run, tmp_path)                 # nothing recorded, and tiny has no base to analyse
    (tmp_path / "config.yaml").write_text(yaml.safe_dump({"expansion": {"layers": [1, 3]}}))
    resolved = resolve_auto_layers(run, tmp_path)
    assert resolved.expansion.layers == (1, 3) and run.expansion.layers == "auto"
    (tmp_path / "config.yaml").write_text(yaml.safe_dump({"expansion": {"layers": [1, 2, 3]}}))
    with pytest.raises(ConfigError, match="expansion.num_exp_layers"):
        resolve_auto_layers(run, tmp_path)
    plain = load_config("configs/tiny.yaml")
    assert resolve_auto_layers(plain, tmp_path) is plain
