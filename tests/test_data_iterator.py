"""The iterator: batch shapes, exact resume from saved state, per-process slices, process-count changes."""
import json

import numpy as np
import pytest

from jax_controlllm.data import DataConfig, DataError, make_data_iterator
from jax_controlllm.data.testing import build_tiny_tokenizer

KEYS = ("input_ids", "labels", "segment_ids", "positions")


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    from jax_controlllm.tokenizer import load_tokenizer
    return load_tokenizer(build_tiny_tokenizer(tmp_path_factory.mktemp("tok")))


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    root = tmp_path_factory.mktemp("corpus")
    rng = np.random.default_rng(0)
    words = ["hello", "world", "the", "quick", "brown", "fox", "answer", "capital", "Paris"]
    with open(root / "docs.jsonl", "w") as f:      # lengths 1..60 words: many documents split across rows
        for i in range(60):
            f.write(json.dumps({"text": " ".join(rng.choice(words, size=int(rng.integers(1, 60))))}) + "\n")
    with open(root / "chat.jsonl", "w") as f:
        for i in range(30):
            f.write(json.dumps({"messages": [{"role": "user", "content": f"What is {i} plus {i}?"},
                                             {"role": "assistant", "content": f"{i} plus {i} is {2 * i}."}]}) + "\n")
    return root


def pretrain(corpus, **extra):
    return DataConfig.from_dict({"sources": [str(corpus / "docs.jsonl")], **extra})


def take(iterator, n):
    return [next(iterator) for _ in range(n)]


def assert_same(a, b):
    assert len(a) == len(b)
    for x, y in zip(a, b):
        for key in KEYS:
            np.testing.assert_array_equal(x[key], y[key], err_msg=key)


def test_batches_are_int32_local_slices(corpus, tokenizer):
    it = make_data_iterator(pretrain(corpus), tokenizer, global_batch_size=6, seq_len=32, seed=0,
                            process_index=1, process_count=3)
    batch = next(it)
    assert set(batch) == set(KEYS)
    assert all(v.shape == (2, 32) and v.dtype == np.int32 for v in batch.values())


@pytest.mark.parametrize("mode", ["pretrain", "sft"])
def test_restored_iterator_continues_with_identical_batches(corpus, tokenizer, mode):
    config = pretrain(corpus) if mode == "pretrain" else \
        DataConfig.from_dict({"sources": [str(corpus / "chat.jsonl")], "mode": "sft"})
    first = make_data_iterator(config, tokenizer, 4, 48, seed=7)
    take(first, 9)                                         # > one epoch: resumes mid-epoch two
    state = json.loads(json.dumps(first.get_state()))     # through JSON, as a checkpoint stores it
    expected = take(first, 5)
    fresh = make_data_iterator(config, tokenizer, 4, 48, seed=7)
    fresh.set_state(state)
    assert_same(take(fresh, 5), expected)
    assert fresh.stats == first.stats
    if mode == "pretrain":
        assert state["offset"] > 0 or first.stats["split_documents"] > 0   # resumed inside a document


def test_process_slices_make_up_the_global_batch(corpus, tokenizer):
    whole = take(make_data_iterator(pretrain(corpus), tokenizer, 4, 32, seed=1), 6)
    parts = [take(make_data_iterator(pretrain(corpus), tokenizer, 4, 32, seed=1, process_index=p,
                                     process_count=2), 6) for p in (0, 1)]
    for b, p0, p1 in zip(whole, *parts):
        for key in KEYS:
            np.testing.assert_array_equal(b[key], np.concatenate([p0[key], p1[key]]))


def test_resume_after_changing_process_count_and_batch_size(corpus, tokenizer):
    """shard_by rows: the state is a cursor into the global row stream, valid for any process layout."""
    reference = take(make_data_iterator(pretrain(corpus), tokenizer, 4, 32, seed=2), 8)
    two = [make_data_iterator(pretrain(corpus), tokenizer, 4, 32, seed=2, process_index=p, process_count=2)
           for p in (0, 1)]
    for it in two:
        take(it, 3)
    assert two[0].get_state() == two[1].get_state()      # every process holds the same state
    one = make_data_iterator(pretrain(corpus), tokenizer, 4, 32, seed=2)
    one.set_state(two[1].get_state())
    assert_same(take(one, 5), reference[3:])
    eight = make_data_iterator(pretrain(corpus), tokenizer, 8, 32, seed=2)   # global batch 4 -> 8
    eight.set_state(two[0].get_state())
    np.testing.assert_array_equal(next(eight)["input_ids"],
                                  np.concatenate([reference[3]["input_ids"], reference[4]["input_ids"]]))


def test_documents_sharding_splits_documents_and_pins_the_process_layout(corpus, tokenizer):
    config = pretrain(corpus, shard_by="documents", packing=False)
    its = [make_data_iterator(config, tokenizer, 4, 512, seed=0, process_index=p, process_count=2) for p in (0, 1)]
    texts = [{tokenizer.decode(row[row != it.pad_id].tolist()) for b in take(it, 5) for row in b["input_ids"]}
             for it in its]
    assert len(texts[0]) == len(texts[1]) == 10 and not texts[0] & texts[1]   # disjoint halves of 60 docs
    state = its[0].get_state()
    same = make_data_iterator(config, tokenizer, 4, 512, seed=0, process_index=0, process_count=2)
    same.set_state(state)
    assert_same(take(same, 2), take(its[0], 2))
    other = make_data_iterator(config, tokenizer, 4, 512, seed=0, process_index=0, process_count=4)
    with pytest.raises(DataError, match="process 0 of 2.*shard_by: rows"):
        other.set_state(state)


def test_state_from_a_different_pipeline_is_refused(corpus, tokenizer):
    state = make_data_iterator(pretrain(corpus), tokenizer, 4, 32, seed=0).get_state()
    with pytest.raises(DataError, match="seq_len: saved 32, now 64"):
        make_data_iterator(pretrain(corpus), tokenizer, 4, 64, seed=0).set_state(state)
    with pytest.raises(DataError, match="seed"):
        make_data_iterator(pretrain(corpus), tokenizer, 4, 32, seed=1).set_state(state)
    with pytest.raises(DataError, match="not a data iterator state"):
        make_data_iterator(pretrain(corpus), tokenizer, 4, 32, seed=0).set_state({"position": 3})


def test_global_batch_must_divide_over_processes(corpus, tokenizer):
    with pytest.raises(DataError, match="not divisible by the 3 processes"):
        make_data_iterator(pretrain(corpus), tokenizer, 4, 32, seed=0, process_index=0, process_count=3)


def test_bos_and_document_end_follow_the_tokenizer_family(corpus, tmp_path):
    from jax_controlllm.tokenizer import load_tokenizer
    llama_like = load_tokenizer(build_tiny_tokenizer(tmp_path / "bos", add_bos=True))
    batch = next(make_data_iterator(pretrain(corpus, shuffle=False), llama_like, 1, 512, seed=0))
    ids, seg = batch["input_ids"][0], batch["segment_ids"][0]
    starts = np.flatnonzero(np.diff(np.concatenate([[0], seg])) > 0)
    ends = np.flatnonzero(np.diff(np.concatenate([seg, [0]])) != 0)
    bos, end = llama_like.convert_tokens_to_ids("<s>"), llama_like.convert_tokens_to_ids("<|endoftext|>")
    assert (ids[starts] == bos).all()
    assert (ids[ends[:-1]] == end).all()                  # the last document may continue in the next row
    assert (batch["labels"][0][starts] == -100).all()
    no_bos = next(make_data_iterator(pretrain(corpus, shuffle=False, add_bos=False, add_eos=False), llama_like, 1,
                                     512, seed=0))["input_ids"][0]
    assert bos not in no_bos and end not in no_bos


def test_prefetching_does_not_change_batches_or_state(corpus, tokenizer):
    plain = make_data_iterator(pretrain(corpus, prefetch=0), tokenizer, 4, 32, seed=5)
    ahead = make_data_iterator(pretrain(corpus, prefetch=3), tokenizer, 4, 32, seed=5)
    assert type(plain).__name__ == "DataIterator" and type(ahead).__name__ == "PrefetchingIterator"
    assert_same(take(ahead, 4), take(plain, 4))
    # the state is that of the batches handed out, not of those the thread prepared ahead
    assert ahead.get_state() == plain.get_state() and ahead.stats == plain.stats
    expected = take(plain, 3)
    fresh = make_data_iterator(pretrain(corpus, prefetch=0), tokenizer, 4, 32, seed=5)
    fresh.set_state(ahead.get_state())
    assert_same(take(fresh, 3), expected)
    ahead.close()                                          # stopping the thread loses nothing
    assert_same(take(ahead, 3), expected)


def test_prefetching_surfaces_data_errors(tmp_path, tokenizer):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"text": "fine"}\n{broken\n')
    it = make_data_iterator(DataConfig.from_dict({"sources": [str(path)], "prefetch": 2}), tokenizer, 1, 64, 0)
    with pytest.raises(DataError, match="bad.jsonl:2: malformed JSON"):
        next(it)
