"""Hostile data files: random bytes, wrong types, huge lines, invalid UTF-8, damaged Parquet. Reading them gives
batches, a DataError naming the file (and line or row), or, with ``skip_bad_records``, skips that are counted;
never another exception, never a hang."""
import json
import time

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from jax_controlllm.config import ConfigError
from jax_controlllm.data import DataConfig, DataError, make_data_iterator
from jax_controlllm.data.sources import BadRecord, JsonlSource, Record
from jax_controlllm.data.testing import build_tiny_tokenizer
from jax_controlllm.tokenizer import load_tokenizer

PROPERTY = settings(max_examples=50, deadline=None, suppress_health_check=[HealthCheck.too_slow])
MAX_RECORD_BYTES = 1000


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    return load_tokenizer(build_tiny_tokenizer(tmp_path_factory.mktemp("tokenizer")))


def read_one_batch(path, tokenizer, **settings) -> None:
    """One batch, or a DataError with a message; skipped records are counted."""
    config = {"sources": [str(path)], "shuffle": False, "prefetch": 0, "max_record_bytes": MAX_RECORD_BYTES,
              **settings}
    start = time.perf_counter()
    try:
        batches = make_data_iterator(DataConfig.from_dict(config), tokenizer, global_batch_size=1, seq_len=32)
        next(batches)
    except (DataError, ConfigError) as err:
        assert str(err).strip() and str(path) in str(err) or "no files" in str(err), err
    else:
        counts = batches.stats
        assert counts["skipped_bad_records"] == 0 or settings.get("skip_bad_records"), counts
    assert time.perf_counter() - start < 20


JSON_VALUES = st.recursive(st.one_of(st.none(), st.booleans(), st.integers(), st.floats(), st.text(max_size=24)),
                           lambda inner: st.one_of(st.lists(inner, max_size=3),
                                                   st.dictionaries(st.text(max_size=6), inner, max_size=3)),
                           max_leaves=6)
RECORDS = st.dictionaries(st.sampled_from(["text", "messages", "prompt", "response", "other"]), JSON_VALUES,
                          max_size=3)
LINES = st.one_of(
    st.binary(max_size=64),                                            # random bytes
    RECORDS.map(lambda r: json.dumps(r).encode()),                     # the right fields with the wrong types
    st.just(b'{"text": "hello world"}'),
    st.just(b'{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]}'),
    st.just(b'{"text": "caf\xe9"}'),                                   # invalid UTF-8
    st.just(b'{"text": "' + b"a" * (2 * MAX_RECORD_BYTES) + b'"}'),    # a line over max_record_bytes
    st.just(b'{"text": "' + b"a" * 5000),                              # huge and unterminated
)


@PROPERTY
@given(lines=st.lists(LINES, max_size=8), skip=st.booleans(), mode=st.sampled_from(["pretrain", "sft"]))
def test_random_jsonl(tmp_path_factory, tokenizer, lines, skip, mode):
    path = tmp_path_factory.mktemp("jsonl") / "data.jsonl"
    path.write_bytes(b"\n".join(lines))
    source = JsonlSource([str(path)], MAX_RECORD_BYTES)
    assert all(isinstance(source[i], (Record, BadRecord)) for i in range(len(source)))  # never raises per record
    read_one_batch(path, tokenizer, skip_bad_records=skip, mode=mode)


COLUMNS = st.sampled_from([
    pa.array(["hello", None, "world"]), pa.array([1, 2, 3]), pa.array([1.5, None, 2.0]),
    pa.array([b"ok", b"\xff\xfe", b"x"], type=pa.binary()), pa.array([[1], [], None]),
    pa.array([{"a": 1}, None, {"a": 2}]), pa.array([True, False, None]), pa.array([None, None, None]),
])


@PROPERTY
@given(text=COLUMNS, skip=st.booleans(),
       damage=st.one_of(st.none(), st.tuples(st.integers(0, 10**6), st.binary(min_size=1, max_size=16))),
       cut=st.one_of(st.none(), st.integers(0, 10**6)))
def test_parquet_with_wrong_types_or_damaged_bytes(tmp_path_factory, tokenizer, text, skip, damage, cut):
    path = tmp_path_factory.mktemp("parquet") / "data.parquet"
    pq.write_table(pa.table({"text": text, "id": [1, 2, 3]}), path)
    data = bytearray(path.read_bytes())
    if damage is not None:
        at, junk = damage[0] % len(data), damage[1]
        data[at:at + len(junk)] = junk
    if cut is not None:
        data = data[:cut % (len(data) + 1)]
    path.write_bytes(bytes(data))
    read_one_batch(path, tokenizer, skip_bad_records=skip)


@PROPERTY
@given(content=st.binary(max_size=400), skip=st.booleans())
def test_random_bytes_named_parquet(tmp_path_factory, tokenizer, content, skip):
    path = tmp_path_factory.mktemp("parquet") / "data.parquet"
    path.write_bytes(b"PAR1" + content + b"PAR1" if content[:1] == b"P" else content)
    read_one_batch(path, tokenizer, skip_bad_records=skip)


def test_damaged_parquet_pages_name_the_file(tmp_path, tokenizer):
    """The footer reads (so the file opens) but a data page is garbage: a DataError, not pyarrow's OSError."""
    path = tmp_path / "data.parquet"
    pq.write_table(pa.table({"text": ["hello", None, "world"], "id": [1, 2, 3]}), path)
    data = bytearray(path.read_bytes())
    data[61:64] = b"\0\0\0"
    path.write_bytes(bytes(data))
    with pytest.raises(DataError, match=rf"{path}: not a readable Parquet file \(.*\); re-create it"):
        read_one_batch_strict(path, tokenizer)


def read_one_batch_strict(path, tokenizer) -> None:
    config = DataConfig.from_dict({"sources": [str(path)], "shuffle": False, "prefetch": 0})
    next(make_data_iterator(config, tokenizer, global_batch_size=1, seq_len=32))
