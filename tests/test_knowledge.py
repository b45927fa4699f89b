"""Synthetic knowledge corpora: reproducibility, frequencies, documents, probes, JSONL files, prompt pairs."""
from __future__ import annotations

import collections
import json

import numpy as np
import pytest

from jax_controlllm.knowledge import (
    ATTRIBUTES,
    BOS_ID,
    QUERIES,
    CorpusConfig,
    EntityConfig,
    build_knowledge_dataset,
    build_word_tokenizer,
    documents,
    generate_entities,
    load_entities,
    long_tail_frequencies,
    make_prompt_pairs,
    queries,
    read_jsonl,
    words,
)


def test_entities_are_seeded_and_reproducible():
    a = generate_entities(EntityConfig(n_new=20, n_revised=5, seed=3))
    b = generate_entities(EntityConfig(n_new=20, n_revised=5, seed=3))
    c = generate_entities(EntityConfig(n_new=20, n_revised=5, seed=4))
    assert a == b and [e.attributes for e in a] == [e.attributes for e in b]
    assert [e.name for e in a] != [e.name for e in c]
    assert documents(a, seed=1) == documents(b, seed=1) != documents(a, seed=2)


def test_entity_kinds_names_and_attributes():
    entities = generate_entities(EntityConfig(n_new=30, n_revised=8, max_frequency=6, seed=0))
    new = [e for e in entities if e.kind == "new"]
    revised = [e for e in entities if e.kind == "revised"]
    assert len(new) == 30 and len(revised) == 8
    assert len({e.name for e in entities}) == 38
    assert all(e.name in words.KNOWN_PEOPLE for e in revised)
    assert not any(e.name in words.KNOWN_PEOPLE for e in new)
    for e in entities:
        assert set(e.attributes) == set(ATTRIBUTES) and 1 <= e.frequency <= 6
        assert e.attributes["city"] in words.CITIES and e.attributes["company"] in words.COMPANIES


def test_frequencies_are_long_tailed():
    f = long_tail_frequencies(5000, 10, 1.2, np.random.default_rng(0))
    counts = np.bincount(f, minlength=11)[1:]
    assert f.min() >= 1 and f.max() <= 10
    assert np.all(np.diff(counts) < 0)                          # strictly fewer entities at each higher frequency
    assert counts[0] / counts[-1] == pytest.approx(10 ** 1.2, rel=0.3)


def test_documents_mention_every_fact_frequency_times():
    entities = generate_entities(EntityConfig(n_new=12, n_revised=3, seed=5))
    docs = documents(entities, seed=0)
    assert len(docs) == sum(e.frequency for e in entities)
    for e in entities:
        about = [d for d in docs if e.name + " " in d or e.name + "." in d]
        assert len(about) == e.frequency
        for d in about:
            assert all(value in d for value in e.attributes.values())


def test_held_out_phrasing_keeps_queries_out_of_the_corpus():
    entities = generate_entities(EntityConfig(n_new=15, n_revised=0, max_frequency=5, seed=2))
    query_texts = [q.prompt for q in queries(entities)]
    held_out = " ".join(documents(entities, seed=0, held_out_phrasing=True))
    seen = " ".join(documents(entities, seed=0))
    assert not any(q in held_out for q in query_texts)
    assert any(q in seen for q in query_texts)


def test_queries_and_jsonl_files(tmp_path):
    paths = build_knowledge_dataset(tmp_path, CorpusConfig(EntityConfig(n_new=5, n_revised=2, seed=1)))
    corpus, probes = read_jsonl(paths["corpus"]), read_jsonl(paths["probes"])
    assert all(set(row) == {"text"} and row["text"] for row in corpus)
    assert len(probes) == 7 * len(ATTRIBUTES)
    for row in probes:
        assert {"prompt", "answer"} <= set(row)
        assert row["answer"].startswith(" ") and not row["answer"].startswith("  ")
        assert not row["prompt"].endswith(" ")
    city = [row for row in probes if row["attribute"] == "city"][0]
    assert city["prompt"] == QUERIES["city"].format(name=city["entity"]) and city["answer"].strip() in words.CITIES
    entities = load_entities(paths["entities"])
    assert [e.name for e in entities] == sorted({r["entity"] for r in probes}, key=[e.name for e in entities].index)
    assert json.loads(paths["probes"].read_text().splitlines()[0])["prompt"].endswith("was born on")
    assert not list(tmp_path.glob("*.tmp"))


def test_bad_configs_are_refused():
    with pytest.raises(ValueError, match="attributes"):
        generate_entities(EntityConfig(attributes=("city", "shoe_size")))
    with pytest.raises(ValueError, match="n_revised"):
        generate_entities(EntityConfig(n_revised=1000))
    with pytest.raises(ValueError, match="at least one entity"):
        generate_entities(EntityConfig(n_new=0, n_revised=0))


def _word_tokenizer_and_entities():
    entities = generate_entities(EntityConfig(n_new=25, n_revised=6, seed=7))
    texts = documents(entities) + [q.prompt for q in queries(entities)]
    return build_word_tokenizer(texts), entities


def test_prompt_pairs_have_equal_lengths_and_different_labels():
    tokenizer, entities = _word_tokenizer_and_entities()
    pairs = make_prompt_pairs(entities, "city", tokenizer, bos_id=BOS_ID, seed=0)
    assert len(pairs) >= 20
    clean, corrupted, cl, kl, lengths = pairs.args()
    assert clean.shape == corrupted.shape and clean.shape[1] == lengths.max()
    for i in range(len(pairs)):
        n = lengths[i]
        assert clean[i, 0] == corrupted[i, 0] == BOS_ID
        assert np.all(clean[i, n:] == 0) and np.all(corrupted[i, n:] == 0)
        assert len(tokenizer.encode(pairs.corrupted[i].prompt).ids) + 1 == n       # same token length
        assert cl[i] != kl[i]
        assert cl[i] == tokenizer.encode(pairs.clean[i].answer).ids[0]
        assert kl[i] == tokenizer.encode(pairs.corrupted[i].answer).ids[0]
        assert pairs.clean[i].entity != pairs.corrupted[i].entity
        subject = clean[i][pairs.subject_mask()[i]]
        assert tokenizer.decode(subject.tolist()) == pairs.clean[i].entity
        relation = clean[i][pairs.relation_mask()[i]]
        assert tokenizer.decode(relation.tolist()) == "lives in the city of"
    again = make_prompt_pairs(entities, "city", tokenizer, bos_id=BOS_ID, seed=0)
    assert np.array_equal(again.clean_ids, pairs.clean_ids)
    assert len(make_prompt_pairs(entities, "city", tokenizer, max_pairs=5)) == 5


def test_prompt_pairs_need_enough_entities():
    tokenizer, entities = _word_tokenizer_and_entities()
    with pytest.raises(ValueError, match="no clean/corrupted pairs"):
        make_prompt_pairs(entities[:1], "city", tokenizer)


@pytest.mark.slow
def test_prompt_pairs_with_the_smollm2_tokenizer(smollm2_hf_dir):
    from transformers import AutoTokenizer
    tokenizer = AutoTokenizer.from_pretrained(smollm2_hf_dir)
    entities = generate_entities(EntityConfig(n_new=40, n_revised=10, seed=0))
    pairs = make_prompt_pairs(entities, "city", tokenizer)
    assert len(pairs) >= 10
    for i in range(len(pairs)):
        n = pairs.lengths[i]
        assert tokenizer.decode(pairs.clean_ids[i, :n]) == pairs.clean[i].prompt
        assert tokenizer.decode(pairs.corrupted_ids[i, :n]) == pairs.corrupted[i].prompt
        start, end = pairs.subject_spans[i]
        assert tokenizer.decode(pairs.clean_ids[i, start:end]).strip() == pairs.clean[i].entity
        assert pairs.clean[i].answer.startswith(tokenizer.decode([pairs.clean_label_ids[i]]))
    labels = collections.Counter(pairs.clean_label_ids.tolist())
    assert len(labels) > 3
