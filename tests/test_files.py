"""Whole-or-nothing file writes (``jax_controlllm.files``): what every record, corpus and tokenizer file goes
through."""
import pytest

from jax_controlllm.files import copy_file_atomic, write_text_atomic


def test_write_text_atomic_creates_parents_and_leaves_no_temporary(tmp_path):
    path = write_text_atomic(tmp_path / "a" / "b" / "record.json", "{}\n")
    assert path.read_text() == "{}\n"
    write_text_atomic(path, "ü\n")
    assert path.read_text(encoding="utf-8") == "ü\n"
    assert sorted(p.name for p in path.parent.iterdir()) == ["record.json"]


def test_a_failed_copy_keeps_the_previous_file(tmp_path):
    source, target = tmp_path / "source.json", tmp_path / "out" / "target.json"
    source.write_text("new")
    write_text_atomic(target, "old")

    def edit(tmp):
        assert tmp.read_text() == "new" and tmp.name != target.name
        raise RuntimeError("stopped mid-write")

    with pytest.raises(RuntimeError, match="stopped mid-write"):
        copy_file_atomic(source, target, edit)
    assert target.read_text() == "old"
    assert sorted(p.name for p in target.parent.iterdir()) == ["target.json"]
    copy_file_atomic(source, target, lambda tmp: tmp.write_text(tmp.read_text() + "+edited"))
    assert target.read_text() == "new+edited"


def test_concurrent_writers_of_one_file_do_not_share_a_temporary_file(tmp_path):
    """A second writer of the same file (another host's process) finishing while the first is mid-write: each
    has its own temporary file, so both renames succeed and the file is one writer's whole text."""
    source, target = tmp_path / "source.txt", tmp_path / "tokenizer.json"
    source.write_text("first writer")

    def meanwhile(tmp):
        write_text_atomic(target, "second writer")
        assert tmp.read_text() == "first writer"

    copy_file_atomic(source, target, meanwhile)
    assert target.read_text() == "first writer"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["source.txt", "tokenizer.json"]
