"""Replay text (knowledge/replay.py): the base model's own continuations of neutral openers, mixed into the
knowledge corpus by prepare_knowledge (knowledge.replay_documents / replay_weight)."""
from __future__ import annotations

import dataclasses
import json

import jax
import pytest

from jax_controlllm import knowledge as kn
from jax_controlllm.config import ConfigError, ModelConfig, SourceConfig, load_config
from jax_controlllm.convert.hf import save_hf
from jax_controlllm.experiment import prepare_knowledge
from jax_controlllm.knowledge.replay import OPENERS, TOPIC_OPENERS, openers_for, replay_documents
from jax_controlllm.model import init_params
from jax_controlllm.retention.general import FACTS
from jax_controlllm.tokenizer import load_tokenizer


@pytest.fixture(scope="module")
def word_model(tmp_path_factory):
    """A tiny random Llama whose word tokenizer knows every opener, saved as an HF directory."""
    tokenizer = kn.build_word_tokenizer(list(openers_for(kn.ATTRIBUTES)))
    config = ModelConfig(vocab_size=tokenizer.get_vocab_size(), hidden_size=32, intermediate_size=64,
                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                         max_position_embeddings=128, bos_token_id=kn.BOS_ID, pad_token_id=0, eos_token_id=2)
    params = init_params(config, jax.random.PRNGKey(0))
    base = tmp_path_factory.mktemp("replay") / "base"
    save_hf(config, params, base)
    kn.save_word_tokenizer(tokenizer, base)
    return config, params, load_tokenizer(base), base


def test_openers_ask_for_none_of_the_retention_facts():
    prompts = {p.lower() for p, _ in FACTS}
    every = OPENERS + tuple(o for topic in TOPIC_OPENERS.values() for o in topic)
    assert not any(o.lower().startswith(p) or p in o.lower() for o in every for p in prompts)
    assert len(set(every)) == len(every)


def test_topic_openers_come_first_for_the_corpus_attributes():
    assert set(TOPIC_OPENERS) == set(kn.ATTRIBUTES)                 # every attribute the generator knows
    assert openers_for() == OPENERS
    mixed = openers_for(("company", "city"))
    assert mixed == TOPIC_OPENERS["company"] + TOPIC_OPENERS["city"] + OPENERS


def test_replay_documents_continue_each_opener_and_are_seeded(word_model):
    config, params, tokenizer, _ = word_model
    n = len(OPENERS) + 2                                        # the openers cycle
    docs = replay_documents(config, params, tokenizer, n, max_new_tokens=6, seed=0)
    assert len(docs) == n
    for i, doc in enumerate(docs):
        opener = OPENERS[i % len(OPENERS)].rstrip(".,:")
        assert doc.startswith(opener[:10]) and len(doc) > len(opener)
    assert replay_documents(config, params, tokenizer, n, max_new_tokens=6, seed=0) == docs
    assert replay_documents(config, params, tokenizer, n, max_new_tokens=6, seed=1) != docs
    assert replay_documents(config, params, tokenizer, 0) == []


def test_prepare_knowledge_mixes_replay_into_the_training_sources(word_model, tmp_path):
    *_, base = word_model
    knowledge = dict(n_new=3, attributes=["city"], max_frequency=2, seed=0, replay_documents=5, replay_weight=0.25)
    run = load_config(data={"base": {"path": str(base)}, "model": {}, "knowledge": knowledge,
                            "train": {"steps": 1, "mode": "full"}})
    trained, paths = prepare_knowledge(run, tmp_path)
    rows = [json.loads(line) for line in open(paths["replay"])]
    assert len(rows) == 5 and all(r["text"] for r in rows)
    first = open(paths["replay"]).read()
    sources = trained.data.sources
    assert sources == (SourceConfig(path=paths["corpus"]), SourceConfig(path=paths["replay"], weight=0.25))
    assert run.data.sources == ()                               # the loaded config is not changed
    prepare_knowledge(run, tmp_path)                            # a resume reads the same file, not a new draw
    assert open(paths["replay"]).read() == first
    anchor_only = dataclasses.replace(run, knowledge=dataclasses.replace(run.knowledge, replay_lm_loss=False))
    anchored, _ = prepare_knowledge(anchor_only, tmp_path)
    assert anchored.data.sources[1] == SourceConfig(path=paths["replay"], weight=0.25, lm_loss=False)


def test_replay_topics_start_the_replay_text_with_the_corpus_topics(word_model, tmp_path):
    *_, base = word_model
    knowledge = dict(n_new=3, attributes=["city"], max_frequency=2, seed=0, replay_documents=10, replay_topics=True)
    run = load_config(data={"base": {"path": str(base)}, "model": {}, "knowledge": knowledge,
                            "train": {"steps": 1, "mode": "full"}})
    _, paths = prepare_knowledge(run, tmp_path)
    rows = [json.loads(line)["text"] for line in open(paths["replay"])]
    expected = TOPIC_OPENERS["city"] + OPENERS[:2]
    assert [r[:12] for r in rows] == [o[:12] for o in expected]


@pytest.mark.parametrize("bad", [{"replay_documents": -1}, {"replay_weight": 0.0}])
def test_bad_replay_settings_are_config_errors(tmp_path, bad):
    with pytest.raises(ConfigError, match="knowledge: replay_documents must be >= 0 and replay_weight > 0"):
        prepare_knowledge(load_config(data={"knowledge": {"n_new": 2, **bad}}), tmp_path)   # refused at load


def test_replay_needs_a_base_model(tmp_path):
    run = load_config(data={"knowledge": {"n_new": 2, "replay_documents": 2}})
    with pytest.raises(ConfigError, match="knowledge.replay_documents: replay text is written by the base model"):
        prepare_knowledge(run, tmp_path)


def test_a_run_directory_keeps_the_corpus_it_was_trained_on(word_model, tmp_path):
    """RUN/knowledge/spec.json records what the files were written from; a resume asking for another corpus or
    other replay text is refused in one line before anything is rewritten. Source weights may change."""
    *_, base = word_model
    knowledge = dict(n_new=3, attributes=["city"], max_frequency=2, seed=0, replay_documents=4)
    run = load_config(data={"base": {"path": str(base)}, "model": {}, "knowledge": knowledge,
                            "train": {"steps": 1, "mode": "full"}})
    _, paths = prepare_knowledge(run, tmp_path)
    files = {name: open(path).read() for name, path in paths.items()}
    assert json.loads((tmp_path / "knowledge" / "spec.json").read_text())["seed"] == 0
    reweighted = dataclasses.replace(run.knowledge, replay_weight=2.0, replay_lm_loss=False)
    prepare_knowledge(dataclasses.replace(run, knowledge=reweighted), tmp_path)        # weights only: fine
    for change, key in (({"seed": 1}, "knowledge.seed"), ({"replay_topics": True}, "knowledge.replay_topics"),
                        ({"attributes": ("city", "company")}, "knowledge.attributes")):
        other = dataclasses.replace(run, knowledge=dataclasses.replace(run.knowledge, **change))
        with pytest.raises(ConfigError) as err:
            prepare_knowledge(other, tmp_path)
        message = str(err.value)
        assert key in message and "another --out" in message and "\n" not in message
        assert {name: open(path).read() for name, path in paths.items()} == files      # nothing rewritten


def test_distillation_trains_on_the_alignment_text(word_model, tmp_path):
    """train.distill_weight end to end: the default job's path (corpus + alignment-only replay text) logs the KL
    from the base, 0 before the first update (the expanded model is the base) and positive after; the step's loss
    is CE + divergence + distill."""
    from test_train_helpers import read_metrics

    from launch.train import main

    *_, base = word_model
    config = {"base": {"path": str(base)},
              "expansion": {"expand_type": "concat", "layers": [1], "num_exp_layers": 1, "merge_method": "dlerp"},
              "knowledge": {"n_new": 3, "attributes": ["city"], "max_frequency": 2, "replay_documents": 4,
                            "replay_lm_loss": False},
              "train": {"mode": "controlllm", "steps": 3, "batch_size": 2, "seq_len": 32, "lr": 1e-2,
                        "min_lr": 1e-3, "warmup_steps": 0, "log_every": 1, "distill_weight": 1.0},
              "mesh": {"shape": "1"}}
    path = tmp_path / "run.yaml"
    path.write_text(json.dumps(config))
    assert main(["--config", str(path), "--out", str(tmp_path / "run"), "--no-progress"]) == 0
    rows = [r for r in read_metrics(tmp_path / "run") if "distill" in r]
    assert [r["step"] for r in rows] == [1, 2, 3]
    assert rows[0]["distill"] == pytest.approx(0.0, abs=1e-6) and rows[-1]["distill"] > 1e-6
    for r in rows:
        assert r["loss"] == pytest.approx(r["ce"] + r["divergence"] + r["distill"], rel=1e-5)
