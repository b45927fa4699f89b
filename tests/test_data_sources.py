"""Every source format reads to the same batches; mixtures, shuffling and holdout behave as documented."""
import json
from collections import Counter

import numpy as np
import pytest

from jax_controlllm.data import DataConfig, DataError, make_data_iterator, make_eval_iterator
from jax_controlllm.data.stream import eval_stream, train_stream
from jax_controlllm.data.testing import build_tiny_tokenizer

DOCS = [f"document {i}: " + " ".join(["hello world", "the quick brown fox", "answer"][i % 3] for _ in range(i % 5))
        for i in range(40)]


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    from jax_controlllm.tokenizer import load_tokenizer
    return load_tokenizer(build_tiny_tokenizer(tmp_path_factory.mktemp("tok")))


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """The same documents as JSONL (split over two files), Parquet, plain text and save_to_disk."""
    import datasets
    import pyarrow as pa
    import pyarrow.parquet as pq
    root = tmp_path_factory.mktemp("corpus")
    for part, docs in (("a", DOCS[:25]), ("b", DOCS[25:])):
        lines = [json.dumps({"id": i, "text": d}) + "\n" for i, d in enumerate(docs)]
        (root / f"{part}.jsonl").write_text("".join(lines))
        (root / f"{part}.txt").write_text("".join(d + "\n" for d in docs))
    pq.write_table(pa.table({"text": DOCS[:10], "id": list(range(10))}), root / "a.parquet", row_group_size=4)
    pq.write_table(pa.table({"text": DOCS[10:], "id": list(range(10, 40))}), root / "b.parquet", row_group_size=7)
    datasets.Dataset.from_dict({"text": DOCS}).save_to_disk(str(root / "hf"))
    return root


def batches(config: dict, tokenizer, n=4, split="train", **kwargs):
    it = make_data_iterator(DataConfig.from_dict(config), tokenizer, kwargs.pop("batch", 4), kwargs.pop("seq", 24),
                            seed=kwargs.pop("seed", 3), split=split, **kwargs)
    return [next(it) for _ in range(n)]


def assert_same(a, b):
    assert len(a) == len(b)
    for x, y in zip(a, b):
        for key in ("input_ids", "labels", "segment_ids", "positions"):
            np.testing.assert_array_equal(x[key], y[key], err_msg=key)


def test_jsonl_parquet_text_and_save_to_disk_give_the_same_batches(corpus, tokenizer):
    reference = batches({"sources": [str(corpus / "*.jsonl")]}, tokenizer, n=12)   # > one epoch of 40 docs
    assert_same(batches({"sources": [str(corpus / "*.parquet")]}, tokenizer, n=12), reference)
    assert_same(batches({"sources": [str(corpus / "*.txt")]}, tokenizer, n=12), reference)
    assert_same(batches({"sources": [{"path": str(corpus / "hf")}]}, tokenizer, n=12), reference)
    assert not np.array_equal(batches({"sources": [str(corpus / "*.jsonl")]}, tokenizer, n=1, seed=4)[0]["input_ids"],
                              reference[0]["input_ids"])


def test_tfds_array_record_dataset_reads_through_the_pipeline(corpus, tokenizer, tmp_path):
    import tensorflow_datasets as tfds

    from jax_controlllm.data.prepare import prepare_tfds
    summary = prepare_tfds([str(corpus / "*.jsonl")], "toy_corpus", str(tmp_path), eval_fraction=0.1)
    assert summary["splits"] == {"train": {"written": 36, "skipped": 0}, "validation": {"written": 4, "skipped": 0}}
    assert sorted(p.name for p in (tmp_path / "toy_corpus" / "1.0.0").glob("*.array_record*")) == [
        "toy_corpus-train.array_record-00000-of-00001", "toy_corpus-validation.array_record-00000-of-00001"]
    source = tfds.data_source("toy_corpus", split="train", data_dir=str(tmp_path), download=False)
    assert len(source) == 36 and source[0]["text"].decode() == DOCS[0]
    tfds_config = {"sources": [{"name": "toy_corpus", "data_dir": str(tmp_path)}], "eval_split": "validation"}
    local_config = {"sources": [str(corpus / "*.jsonl")], "holdout_fraction": 0.1}
    assert_same(batches(tfds_config, tokenizer, n=10), batches(local_config, tokenizer, n=10))
    assert_same(batches(tfds_config, tokenizer, n=1, split="eval", batch=8, seq=64),
                batches(local_config, tokenizer, n=1, split="eval", batch=8, seq=64))


def test_missing_tfds_dataset_says_how_to_prepare_it(tmp_path, tokenizer):
    with pytest.raises(DataError, match=r"not prepared.*python -m launch.data prepare"):
        make_data_iterator(DataConfig.from_dict({"sources": [{"name": "absent_corpus", "data_dir": str(tmp_path)}]}),
                           tokenizer, 2, 16, 0)


def test_mixture_follows_weights_and_every_epoch_covers_each_record_once(corpus):
    config = DataConfig.from_dict({"sources": [{"path": str(corpus / "a.jsonl"), "weight": 3},
                                               {"path": str(corpus / "b.txt"), "weight": 1}]})
    stream = train_stream(config, seed=0)
    records = [stream.records[k] for k in range(4000)]
    share = Counter(r.source for r in records)
    assert abs(share[0] / 4000 - 0.75) < 0.01
    # source a (25 records) seen in 3 epochs: each epoch is a permutation, reshuffled between epochs
    seen_a = [r.fields["id"] for r in records if r.source == 0][:75]
    epochs = [seen_a[i:i + 25] for i in range(0, 75, 25)]
    assert all(sorted(e) == list(range(25)) for e in epochs)
    assert epochs[0] != epochs[1] and epochs[0] != list(range(25))


def test_a_source_without_lm_loss_is_read_the_same_with_no_targets(corpus, tokenizer):
    """lm_loss: false keeps the tokens, segments and positions (the model sees the text: Control LLM's divergence
    counts it) and removes every next-token target of that source only."""
    mixed = [{"path": str(corpus / "a.jsonl")}, {"path": str(corpus / "b.txt")}]
    plain = batches({"sources": mixed}, tokenizer, n=6)
    mixed[1]["lm_loss"] = False
    anchored = batches({"sources": mixed}, tokenizer, n=6)
    only_b = batches({"sources": [{"path": str(corpus / "b.txt"), "lm_loss": False}]}, tokenizer, n=2)
    for x, y in zip(plain, anchored):
        for key in ("input_ids", "segment_ids", "positions"):
            np.testing.assert_array_equal(x[key], y[key], err_msg=key)
    trained_plain = sum(int((b["labels"] != -100).sum()) for b in plain)
    trained_anchored = sum(int((b["labels"] != -100).sum()) for b in anchored)
    assert 0 < trained_anchored < trained_plain
    assert all((b["labels"] == -100).all() and (b["segment_ids"] > 0).any() for b in only_b)


def test_holdout_is_disjoint_from_train_and_covers_everything(corpus):
    config = DataConfig.from_dict({"sources": [str(corpus / "*.jsonl")], "holdout_fraction": 0.25, "shuffle": False})
    train = train_stream(config, seed=0)
    evals = eval_stream(config)
    train_texts = {train.records[k].fields["text"] for k in range(30)}
    eval_texts = [evals.records[k].fields["text"] for k in range(len(evals))]
    assert len(eval_texts) == 10 and eval_texts == DOCS[3::4]
    assert not train_texts & set(eval_texts) and train_texts | set(eval_texts) == set(DOCS)


def test_eval_iterator_is_one_padded_pass_identical_on_every_process(corpus, tokenizer):
    config = DataConfig.from_dict({"sources": [str(corpus / "*.jsonl")], "holdout_fraction": 0.1})
    single = list(make_eval_iterator(config, tokenizer, global_batch_size=4, seq_len=16))
    halves = [list(make_eval_iterator(config, tokenizer, 4, 16, process_index=p, process_count=2)) for p in (0, 1)]
    assert len(single) == len(halves[0]) == len(halves[1]) >= 2
    for b, (h0, h1) in zip(single, zip(*halves)):
        np.testing.assert_array_equal(b["input_ids"], np.concatenate([h0["input_ids"], h1["input_ids"]]))
    last = single[-1]["segment_ids"]
    assert (last == 0).all(axis=1).any(), "the last batch is padded with empty rows"
    eval_it = make_eval_iterator(config, tokenizer, 4, 16)
    first = list(eval_it)
    eval_it.reset()
    assert_same(list(eval_it), first)


def test_separate_eval_sources(corpus, tokenizer):
    config = DataConfig.from_dict({"sources": [str(corpus / "a.jsonl")], "eval_sources": [str(corpus / "b.txt")]})
    rows = list(make_eval_iterator(config, tokenizer, 2, 256))
    text = tokenizer.decode(np.concatenate([b["input_ids"][b["segment_ids"] > 0] for b in rows]).tolist())
    assert DOCS[25] in text and DOCS[0] not in text


@pytest.mark.parametrize("cached", [True, False])
def test_each_epoch_is_a_permutation_for_small_and_huge_sources(monkeypatch, cached):
    from jax_controlllm.data.stream import EpochShuffled
    if not cached:   # pretend the source is too big for a cached permutation: grain's index shuffle
        monkeypatch.setattr(EpochShuffled, "MAX_CACHED_PERMUTATION", 10)
    shuffled = EpochShuffled(list(range(37)), seed=5)
    epochs = [[shuffled[k] for k in range(e * 37, (e + 1) * 37)] for e in range(3)]
    assert all(sorted(e) == list(range(37)) for e in epochs)
    assert epochs[0] != epochs[1] != epochs[2] and epochs[0] != list(range(37))
    assert [shuffled[k] for k in (80, 3, 40)] == [epochs[2][6], epochs[0][3], epochs[1][3]]   # random access
