"""End to end: a tiny random Llama trained a few steps on a generated knowledge corpus (word tokenizer),
saved as Hugging Face checkpoints, analysed by ``python -m launch.circuits``."""
from __future__ import annotations

import argparse
import json

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from jax_controlllm.circuits.circuit import circuit_from_edges, edge_count
from jax_controlllm.circuits.evolution import jaccard, layer_activation_ratio, phase_change
from jax_controlllm.circuits.graph import Graph
from jax_controlllm.config import ModelConfig
from jax_controlllm.knowledge import (
    BOS_ID,
    CorpusConfig,
    EntityConfig,
    build_knowledge_dataset,
    build_word_tokenizer,
    read_jsonl,
    save_word_tokenizer,
)


def _train_and_save(tmp_path, steps=(0, 15, 30)):
    data = build_knowledge_dataset(tmp_path / "data", CorpusConfig(EntityConfig(n_new=10, n_revised=2,
                                                                                max_frequency=3, seed=1)))
    docs = [row["text"] for row in read_jsonl(data["corpus"])]
    tokenizer = build_word_tokenizer(docs)
    config = ModelConfig(vocab_size=tokenizer.get_vocab_size(), hidden_size=32, intermediate_size=64,
                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                         max_position_embeddings=128, bos_token_id=BOS_ID, pad_token_id=0)
    from jax_controlllm.convert import save_hf
    from jax_controlllm.model import forward, init_params

    stream = np.concatenate([[BOS_ID] + tokenizer.encode(d).ids for d in docs])
    seq = 32
    batches = stream[:len(stream) // seq * seq].reshape(-1, seq)
    params = init_params(config, jax.random.PRNGKey(0))
    optimizer = optax.adam(3e-3)
    state = optimizer.init(params)

    @jax.jit
    def step(params, state, ids):
        def loss(p):
            logits = forward(config, p, ids[:, :-1])
            return optax.softmax_cross_entropy_with_integer_labels(logits, ids[:, 1:]).mean()
        value, grads = jax.value_and_grad(loss)(params)
        updates, state = optimizer.update(grads, state, params)
        return optax.apply_updates(params, updates), state, value

    dirs, losses = [], []
    for i in range(steps[-1] + 1):
        if i in steps:
            out = tmp_path / f"step_{i:03d}"
            save_hf(config, params, out)
            save_word_tokenizer(tokenizer, out)
            dirs.append(out)
        if i < steps[-1]:
            params, state, value = step(params, state, jnp.asarray(batches[i % len(batches)][None]))
            losses.append(float(value))
    assert losses[-1] < losses[0]
    return data, dirs


@pytest.mark.slow
def test_launch_circuits_end_to_end(tmp_path, capsys):
    from launch.circuits import main
    data, dirs = _train_and_save(tmp_path)
    out = tmp_path / "circuits"
    code = main([str(d) for d in dirs] + ["--entities", str(data["entities"]), "--out", str(out), "--top-n", "40",
                                          "--curve", "0.05,20%,60", "--ig-steps", "2", "--max-pairs", "12",
                                          "--batch-size", "8"])
    assert code == 0
    result = json.loads((out / "evolution.json").read_text())
    cps = result["checkpoints"]
    assert [c["name"] for c in cps] == [d.name for d in dirs]
    assert result["edge_jaccard"][-1] == 1.0 and result["node_jaccard"][-1] == 1.0
    assert 0 <= result["phase_change"] < len(cps)
    for c in cps:
        assert len(c["layer_activation_ratio"]) == 3 and len(c["lens_probability"]) == 2
        assert c["n_edges"] <= 40 and np.isfinite(c["faithfulness"])
        assert c["circuit_fraction"] == c["n_edges"] / c["graph_edges"] and c["n_pairs"] <= 12
        graph_edges = c["graph_edges"]
        assert [p["requested"] for p in c["size_curve"]] == sorted({round(0.05 * graph_edges), 40, 60,
                                                                    round(0.2 * graph_edges)})
        at_40 = next(p for p in c["size_curve"] if p["requested"] == 40)
        assert (at_40["faithfulness"], at_40["hit_at_k"]) == (c["faithfulness"], c["hit_at_k"])
        assert sum(kind["n"] for kind in c["acquisition"].values()) >= c["n_pairs"]
        assert c["attribution_prompts_per_s"] > 0
        assert set(h["class"] for h in c["head_classes"].values()) <= {"mover", "relation", "mixture"}
        assert all(name.startswith("a") for name in c["head_classes"])
    for name in ("layer_activation", "logit_lens", "metrics", "head_classes", "size_curve", "acquisition"):
        png = out / f"{name}.png"
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    pairs = json.loads((out / "pairs.json").read_text())
    assert all(a != b for a, b in zip(pairs["clean_label"], pairs["corrupted_label"]))
    assert result["complete"] is True and result["inputs"]["max_pairs"] == 12

    # --resume: a finished study is taken from its file whole; other settings are refused by name
    args = [str(d) for d in dirs] + ["--entities", str(data["entities"]), "--out", str(out), "--top-n", "40",
                                     "--curve", "0.05,20%,60", "--ig-steps", "2", "--max-pairs", "12",
                                     "--batch-size", "8", "--resume"]
    capsys.readouterr()
    assert main(args) == 0
    printed = capsys.readouterr().out
    assert "analysing" not in printed and printed.count("reusing the earlier analysis") == len(dirs)
    again = json.loads((out / "evolution.json").read_text())
    assert [c["faithfulness"] for c in again["checkpoints"]] == [c["faithfulness"] for c in cps]
    assert main(args[:-1] + ["--ig-steps", "3", "--resume"]) == 1
    assert "ig_steps 2 -> 3" in capsys.readouterr().err
    assert main(["corpus", "--out", str(tmp_path / "again"), "--n-new", "3", "--n-revised", "1"]) == 0


def test_circuit_sizes_are_counts_or_fractions_of_the_graph():
    from launch.circuits import circuit_size

    assert (circuit_size("5000"), circuit_size("0.1"), circuit_size("10%")) == (5000, 0.1, 0.1)
    for bad in ("0", "1.5", "150%", "many"):
        with pytest.raises(argparse.ArgumentTypeError):
            circuit_size(bad)
    graph = Graph(2, ("llama", "llama"))
    assert edge_count(graph, 0.1) == round(0.1 * graph.n_edges) and edge_count(graph, 7) == 7
    with pytest.raises(ValueError, match="fraction"):
        edge_count(graph, 1.5)


def test_cli_reports_bad_checkpoints(tmp_path, capsys):
    from launch.circuits import main
    assert main([str(tmp_path / "missing"), "--entities", "x.jsonl", "--out", str(tmp_path)]) == 1
    assert "does not exist" in capsys.readouterr().err
    (tmp_path / "empty").mkdir()
    assert main([str(tmp_path / "empty"), "--entities", "x.jsonl", "--out", str(tmp_path)]) == 1
    assert "not a Hugging Face directory" in capsys.readouterr().err


def test_evolution_summaries():
    assert jaccard({"a", "b"}, {"b", "c"}) == pytest.approx(1 / 3) and jaccard([], []) == 1.0
    assert phase_change([0.1, 0.8, 0.5, 0.75, 0.9, 1.0], 0.7) == 3
    assert phase_change([0.1, 0.2, 1.0], 0.7) == 2
    graph = Graph(1, ("llama", "llama"))
    mask = np.zeros_like(graph.valid)
    mask[0, graph.destination_index("a1.h0<q>")] = mask[0, graph.logits] = True
    ratio = layer_activation_ratio(circuit_from_edges(graph, mask, prune=False))
    valid_l1 = graph.valid[:, graph.destination_layer == 1].sum()
    assert ratio == [0.0, 1 / valid_l1, 1 / graph.n_sources]


def test_checkpoint_refs_read_orbax_exports_and_run_dirs(tmp_path):
    """The hook for our own checkpoints: an export, and a run directory's steps (oldest first)."""
    from jax_controlllm.checkpoint import save_model
    from jax_controlllm.circuits.checkpoints import checkpoint_refs
    from jax_controlllm.model import init_params

    config = ModelConfig(vocab_size=16, hidden_size=8, intermediate_size=16, num_hidden_layers=1,
                         num_attention_heads=2, max_position_embeddings=16)
    params = init_params(config, jax.random.PRNGKey(0))
    save_model(config, params, tmp_path / "export")
    for step in (20, 100):
        save_model(config, params, tmp_path / "run" / "checkpoints" / str(step))
    (ref,) = checkpoint_refs([tmp_path / "export"])
    loaded_config, loaded = ref.load()
    assert ref.name == "export" and loaded_config.hidden_size == 8
    np.testing.assert_array_equal(loaded["embed_tokens"]["embedding"], params["embed_tokens"]["embedding"])
    assert [r.name for r in checkpoint_refs([tmp_path / "run"])] == ["step_20", "step_100"]
    pair = checkpoint_refs([(config, params), ("named", config, params)])
    assert [r.name for r in pair] == ["checkpoint_0", "named"] and pair[1].load()[1] is params


@pytest.mark.slow
def test_evolution_from_a_plain_to_a_control_llm_checkpoint(tmp_path):
    """A base model and its Control LLM expansion: circuits compare by name, expanded heads get classes."""
    from test_circuits import make_model, make_prompts

    from jax_controlllm.circuits.evolution import EvolutionSettings, analyze_evolution
    from jax_controlllm.circuits.plots import plot_evolution
    from jax_controlllm.knowledge import PromptPairs

    base_config, base, _ = make_model(heads=2, kv=1, layers=2)
    exp_config, expanded, _ = make_model(heads=2, kv=1, layers=2, controlled=(1,), merge="dlerp")
    clean, corrupted, cl, kl, lengths = make_prompts()
    pairs = PromptPairs(clean, corrupted, cl, kl, lengths, np.tile([[1, 3]], (5, 1)), [], [])
    evolution = analyze_evolution([("base", base_config, base), ("expanded", exp_config, expanded)], pairs,
                                  EvolutionSettings(top_n=30, ig_steps=2, batch_size=8))
    final = evolution.checkpoints[-1]
    assert any(n.startswith("a1e.") or n == "m1e" for n in final.nodes)
    assert 0 <= evolution.edge_jaccard[0] < 1 and evolution.edge_jaccard[1] == 1
    assert len(final.layer_activation_ratio) == 3
    assert set(plot_evolution(evolution, tmp_path)) == {"layer_activation", "logit_lens", "metrics", "head_classes",
                                                        "size_curve"}


def test_a_study_saves_after_every_checkpoint_and_reuses_earlier_analyses():
    """on_checkpoint sees the evolution so far; analyses read back from evolution.json are reused only for the
    same checkpoint name and source, and a reused series summarises like a fresh one."""
    from test_circuits import make_model, make_prompts

    from jax_controlllm.circuits.checkpoints import CheckpointRef
    from jax_controlllm.circuits.evolution import CheckpointAnalysis, EvolutionSettings, analyze_evolution
    from jax_controlllm.knowledge import PromptPairs

    models = {"base": make_model(heads=2, kv=1, layers=2)[:2],
              "expanded": make_model(heads=2, kv=1, layers=2, controlled=(1,), merge="dlerp")[:2]}
    loads = []

    def ref(name, source=None):
        def load():
            loads.append(name)
            return models[name]
        return CheckpointRef(name, load, source or f"/checkpoints/{name}")

    clean, corrupted, cl, kl, lengths = make_prompts()
    pairs = PromptPairs(clean, corrupted, cl, kl, lengths, np.tile([[1, 3]], (5, 1)), [], [])
    settings = EvolutionSettings(top_n=30, curve=(10,), ig_steps=2, batch_size=8)
    partial = []
    first = analyze_evolution([ref("base"), ref("expanded")], pairs, settings,
                              on_checkpoint=lambda e: partial.append(json.loads(json.dumps(e.to_dict()))))
    assert [len(p["checkpoints"]) for p in partial] == [1, 2] and partial[0]["edge_jaccard"] == [1.0]
    assert partial[0]["checkpoints"][0]["source"] == "/checkpoints/base"

    done = [CheckpointAnalysis.from_dict(c) for c in partial[0]["checkpoints"]]
    loads.clear()
    resumed = analyze_evolution([ref("base"), ref("expanded")], pairs, settings, done=done)
    assert loads == ["expanded"]
    for a, b in zip(first.checkpoints, resumed.checkpoints):
        assert (a.edges, a.nodes, a.faithfulness) == (b.edges, b.nodes, b.faithfulness)
    assert (resumed.edge_jaccard, resumed.phase_change) == (first.edge_jaccard, first.phase_change)

    loads.clear()
    analyze_evolution([ref("base", "/elsewhere/base")], pairs, settings, done=done)
    assert loads == ["base"]                      # same name, other checkpoint: analysed again
