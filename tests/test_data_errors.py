"""Bad input: clear errors naming the file and line, or counted skips; never a hang."""
import json
import time

import pytest

from jax_controlllm.config import ConfigError
from jax_controlllm.data import DataConfig, DataError, make_data_iterator
from jax_controlllm.data.testing import build_tiny_tokenizer


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    from jax_controlllm.tokenizer import load_tokenizer
    return load_tokenizer(build_tiny_tokenizer(tmp_path_factory.mktemp("tok")))


def write_lines(path, lines: list[bytes]):
    path.write_bytes(b"".join(line + b"\n" for line in lines))
    return path


def good(i: int) -> bytes:
    return json.dumps({"text": f"hello world {i}"}).encode()


def iterator(path, tokenizer, **extra):
    config = DataConfig.from_dict({"sources": [str(path)], "shuffle": False, **extra})
    return make_data_iterator(config, tokenizer, global_batch_size=1, seq_len=64, seed=0)


def test_malformed_line_names_file_and_line(tmp_path, tokenizer):
    path = write_lines(tmp_path / "bad.jsonl", [good(0), b"", good(1), b'{"text": "unterminated', good(2)])
    with pytest.raises(DataError, match=rf"{path}:4: malformed JSON.*skip_bad_records"):
        next(iterator(path, tokenizer))


def test_skip_bad_records_counts_them_in_stats_and_state(tmp_path, tokenizer):
    path = write_lines(tmp_path / "bad.jsonl", [good(0), b"[1, 2]", b"{not json", good(1), b"\xff\xfe garbage"])
    it = iterator(path, tokenizer, skip_bad_records=True)
    next(it)                                  # 64 tokens cover the file twice over
    assert it.stats["skipped_bad_records"] >= 3 and it.stats["documents"] >= 2
    assert it.get_state()["counts"]["skipped_bad_records"] == it.stats["skipped_bad_records"]


def test_missing_field_lists_the_fields_that_exist(tmp_path, tokenizer):
    path = write_lines(tmp_path / "other.jsonl", [json.dumps({"content": "x", "id": 1}).encode()])
    with pytest.raises(DataError, match=r"no field 'text'; fields present: 'content', 'id'.*data.text_field"):
        next(iterator(path, tokenizer))


def test_invalid_utf8_names_the_line(tmp_path, tokenizer):
    path = write_lines(tmp_path / "latin1.txt", ["café".encode(), "naïve".encode("latin-1")])
    with pytest.raises(DataError, match=rf"{path}:2: invalid UTF-8 at byte 2"):
        next(iterator(path, tokenizer))


def test_huge_line_is_refused_quickly_or_skipped(tmp_path, tokenizer):
    huge = b'{"text": "' + b"a" * (3 << 20) + b'"}'              # one 3 MiB line
    path = write_lines(tmp_path / "huge.jsonl", [good(0), huge, good(1)])
    start = time.perf_counter()
    with pytest.raises(DataError, match=rf"{path}:2: line is \d+ bytes, over data.max_record_bytes=1048576"):
        next(iterator(path, tokenizer, max_record_bytes=1 << 20))
    it = iterator(path, tokenizer, max_record_bytes=1 << 20, skip_bad_records=True)
    next(it)
    assert it.stats["skipped_bad_records"] >= 1
    assert time.perf_counter() - start < 5


def test_a_file_without_newlines_does_not_hang(tmp_path, tokenizer):
    path = tmp_path / "blob.txt"
    path.write_bytes(b"x" * (20 << 20))                            # 20 MiB, no newline
    start = time.perf_counter()
    with pytest.raises(DataError, match="over data.max_record_bytes"):
        next(iterator(path, tokenizer))
    assert time.perf_counter() - start < 5


def test_only_bad_records_with_skipping_fails_instead_of_spinning(tmp_path, tokenizer):
    path = write_lines(tmp_path / "allbad.jsonl", [b"{oops", b"[]"])
    with pytest.raises(DataError, match="records in a row were unusable"):
        next(iterator(path, tokenizer, skip_bad_records=True))


def test_empty_sources_are_errors(tmp_path, tokenizer):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n\n")
    with pytest.raises(DataError, match="has no records"):
        iterator(empty, tokenizer)
    with pytest.raises(DataError, match="no files match"):
        iterator(tmp_path / "nothing*.jsonl", tokenizer)
    with pytest.raises(ConfigError, match="no data sources"):
        DataConfig.from_dict({"sources": []})


def test_unknown_config_key_suggests_the_closest(tmp_path):
    with pytest.raises(ConfigError, match=r"unknown config key 'data.shufle'; did you mean 'shuffle'"):
        DataConfig.from_dict({"sources": ["x.jsonl"], "shufle": True})
    with pytest.raises(ConfigError, match=r"data.sources\[0\].wieght'; did you mean 'weight'"):
        DataConfig.from_dict({"sources": [{"path": "x.jsonl", "wieght": 2}]})
    with pytest.raises(ConfigError, match="data.mode: 'chat' is not one of pretrain, sft"):
        DataConfig.from_dict({"sources": ["x.jsonl"], "mode": "chat"})


def test_missing_tokenizer_directory(tmp_path):
    config = DataConfig.from_dict({"sources": ["x.jsonl"]})
    with pytest.raises(DataError, match="tokenizer directory .* does not exist"):
        make_data_iterator(config, tmp_path / "no_such_tokenizer", 1, 16, 0)
