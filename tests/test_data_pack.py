"""pack_documents: row layout, the label contract, and that packing never lets documents see each other."""
import jax
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from jax_controlllm.data import IGNORE_INDEX, pack_documents


def test_layout_of_a_packed_row():
    rows = pack_documents([[5, 6, 7], [8, 9], [10, 11, 12, 13, 14, 15]], seq_len=8, pad_id=0)
    np.testing.assert_array_equal(rows["input_ids"], [[5, 6, 7, 8, 9, 10, 11, 12], [13, 14, 15, 0, 0, 0, 0, 0]])
    np.testing.assert_array_equal(rows["segment_ids"], [[1, 1, 1, 2, 2, 3, 3, 3], [1, 1, 1, 0, 0, 0, 0, 0]])
    np.testing.assert_array_equal(rows["positions"], [[0, 1, 2, 0, 1, 0, 1, 2], [0, 1, 2, 0, 0, 0, 0, 0]])
    # unshifted labels; -100 on padding and on the first token of every document after the row's first
    np.testing.assert_array_equal(rows["labels"], [[5, 6, 7, -100, 9, -100, 11, 12],
                                                   [13, 14, 15, -100, -100, -100, -100, -100]])
    assert all(v.dtype == np.int32 for v in rows.values())


def test_whole_documents_truncate_and_never_straddle_rows():
    docs = [[1] * 3, [2] * 4, [3] * 9, [4] * 2]
    rows = pack_documents(docs, seq_len=6, pad_id=0, split_documents=False)
    np.testing.assert_array_equal(rows["input_ids"], [[1, 1, 1, 0, 0, 0], [2, 2, 2, 2, 0, 0],
                                                      [3, 3, 3, 3, 3, 3], [4, 4, 0, 0, 0, 0]])
    assert rows["segment_ids"].max() == 1


def test_packing_off_puts_one_document_piece_per_row():
    rows = pack_documents([[1, 2], [3, 4, 5, 6, 7]], seq_len=4, pad_id=9, packing=False)
    np.testing.assert_array_equal(rows["input_ids"], [[1, 2, 9, 9], [3, 4, 5, 6], [7, 9, 9, 9]])
    np.testing.assert_array_equal(rows["positions"][2], [0, 0, 0, 0])


def test_trained_flags_become_labels():
    rows = pack_documents([[1, 2, 3, 4]], seq_len=6, pad_id=0, trained=[[False, False, True, True]])
    np.testing.assert_array_equal(rows["labels"], [[-100, -100, 3, 4, -100, -100]])


@settings(max_examples=60, deadline=None)
@given(st.lists(st.lists(st.integers(1, 50), min_size=0, max_size=30), min_size=1, max_size=12),
       st.integers(2, 16), st.booleans())
def test_packing_invariants(docs, seq_len, split_documents):
    rows = pack_documents(docs, seq_len, pad_id=0, split_documents=split_documents)
    ids, labels, seg, pos = rows["input_ids"], rows["labels"], rows["segment_ids"], rows["positions"]
    expect = [d if split_documents else d[:seq_len] for d in docs if d]
    assert np.concatenate([ids[seg > 0]]).tolist() == [t for d in expect for t in d]   # nothing lost, in order
    for r in range(len(ids)):
        real = seg[r] > 0
        assert (labels[r][~real] == IGNORE_INDEX).all() and (ids[r][~real] == 0).all()
        n = int(real.sum())
        assert real[:n].all(), "padding only at the end"
        starts = np.flatnonzero(np.diff(np.concatenate([[0], seg[r][:n]])) != 0)
        np.testing.assert_array_equal(seg[r][starts], np.arange(1, len(starts) + 1))
        assert (pos[r][starts] == 0).all() and (labels[r][starts[1:]] == IGNORE_INDEX).all()
        # within a document, positions count up by one
        same = seg[r][1:n] == seg[r][:n - 1]
        assert (pos[r][1:n][same] == pos[r][:n - 1][same] + 1).all()


@pytest.fixture(scope="module")
def sharp_model(tiny_model):
    config, params = tiny_model(vocab_size=97, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                max_position_embeddings=64)
    # scale the std-0.02 init up so that attention is far from uniform and a leak would show
    return config, jax.tree.map(lambda x: x * 25.0 if x.ndim >= 2 else x, params)


def test_packed_logits_equal_each_document_alone(sharp_model):
    from jax_controlllm.model import forward
    config, params = sharp_model
    rng = np.random.default_rng(0)
    docs = [rng.integers(1, config.vocab_size, size=n).tolist() for n in (7, 12, 3, 9)]
    seq = 40
    rows = pack_documents(docs, seq_len=seq, pad_id=0)
    assert rows["input_ids"].shape[0] == 1 and rows["segment_ids"].max() == len(docs)
    # one batch, one compile: [packed row, the same row without segment ids/positions, each document alone]
    ids = np.zeros((2 + len(docs), seq), np.int32)
    seg = np.zeros_like(ids)
    pos = np.broadcast_to(np.arange(seq, dtype=np.int32), ids.shape).copy()
    ids[0], seg[0], pos[0] = rows["input_ids"][0], rows["segment_ids"][0], rows["positions"][0]
    ids[1], seg[1] = rows["input_ids"][0], 1
    for i, doc in enumerate(docs):
        ids[2 + i, :len(doc)], seg[2 + i, :len(doc)] = doc, 1
    logits = np.asarray(jax.jit(lambda p, i, s, q: forward(config, p, i, positions=q, segment_ids=s))(
        params, ids, seg, pos))
    t = 0
    for i, doc in enumerate(docs):
        np.testing.assert_allclose(logits[0, t:t + len(doc)], logits[2 + i, :len(doc)], atol=1e-5, rtol=0)
        t += len(doc)
    # negative control: one segment with running positions, and the later documents do change
    assert np.abs(logits[1, 7:t] - logits[0, 7:t]).max() > 1e-2
