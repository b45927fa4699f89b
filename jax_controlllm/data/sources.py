"""Random-access record sources: local JSONL / Parquet / text files, ``save_to_disk`` datasets, TFDS.

Every source is a sequence (``len`` and ``[i]``) of records, so that shuffling, mixing, sharding
and exact resume all reduce to integer index arithmetic (done with ``grain.MapDataset`` in
``stream.py``). ``source[i]`` never raises for a bad record: it returns a ``BadRecord`` naming the
file and line, and the pipeline decides whether to fail or skip and count it
(``DataConfig.skip_bad_records``). Nothing here downloads: a dataset that is not on disk is a
``DataError`` that says how to prepare it.
"""
from __future__ import annotations

import bisect
import glob
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Sequence, Union

import numpy as np

from jax_controlllm.config import DataConfig, SourceConfig
from jax_controlllm.data.errors import DataError

_SCAN_BLOCK = 8 << 20      # bytes read at a time when indexing lines: memory stays flat for any line length


@dataclass(frozen=True)
class Record:
    """One raw record and where it came from (for error messages)."""
    fields: dict
    where: str
    source: int = 0        # index of the source in DataConfig.sources


@dataclass(frozen=True)
class BadRecord:
    """A record that could not be read; ``where`` is file:line (or dataset[index])."""
    where: str
    reason: str
    source: int = 0


RecordOrBad = Union[Record, BadRecord]


def expand_glob(pattern: str) -> list[str]:
    """Sorted files matching a glob (``~`` expanded); an error naming the pattern when none match."""
    pattern = os.path.expanduser(pattern)
    paths = sorted(p for p in glob.glob(pattern, recursive=True) if os.path.isfile(p))
    if not paths:
        raise DataError(f"no files match {pattern!r}; check the path (globs like 'corpus/*.jsonl' are allowed)")
    return paths


# --------------------------------------------------------------------------------------------
# Line-oriented files (JSONL, plain text): a byte-offset index built by one streaming pass
# --------------------------------------------------------------------------------------------

def scan_lines(path: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(starts, ends, line_numbers) of the non-empty lines of ``path``; ends exclude the newline.

    Reads fixed-size blocks and finds newlines with numpy, so a file that is one huge line costs
    one pass and no more memory than a block (the line is then refused at read time by size).
    """
    starts, ends = [], []
    line_start = offset = 0
    with open(path, "rb") as f:
        while block := f.read(_SCAN_BLOCK):
            newlines = np.flatnonzero(np.frombuffer(block, np.uint8) == ord("\n")) + offset
            if len(newlines):
                starts.append(np.concatenate([[line_start], newlines[:-1] + 1]))
                ends.append(newlines)
                line_start = int(newlines[-1]) + 1
            offset += len(block)
    if line_start < offset:                      # last line without a trailing newline
        starts.append(np.array([line_start]))
        ends.append(np.array([offset]))
    if not starts:
        return (np.zeros(0, np.int64),) * 3
    starts, ends = np.concatenate(starts).astype(np.int64), np.concatenate(ends).astype(np.int64)
    numbers = np.arange(1, len(starts) + 1, dtype=np.int64)
    keep = ends > starts
    return starts[keep], ends[keep], numbers[keep]


class LineFiles:
    """The non-empty lines of several files as one random-access sequence of raw bytes."""

    def __init__(self, paths: list[str], max_record_bytes: int):
        self.paths = paths
        self.max_record_bytes = max_record_bytes
        index = [scan_lines(p) for p in paths]
        self._starts = [s for s, _, _ in index]
        self._ends = [e for _, e, _ in index]
        self._numbers = [n for _, _, n in index]
        self._offsets = np.cumsum([0] + [len(s) for s in self._starts]).tolist()
        self._fds: dict[int, int] = {}

    def __len__(self) -> int:
        return self._offsets[-1]

    def locate(self, i: int) -> tuple[int, int]:
        if not 0 <= i < len(self):
            raise IndexError(f"record {i} out of range [0, {len(self)})")
        file = bisect.bisect_right(self._offsets, i) - 1
        return file, i - self._offsets[file]

    def where(self, i: int) -> str:
        file, row = self.locate(i)
        return f"{self.paths[file]}:{int(self._numbers[file][row])}"

    def read(self, i: int) -> Union[bytes, str]:
        """The line's bytes, or a reason string when it is over ``max_record_bytes``."""
        file, row = self.locate(i)
        start, end = int(self._starts[file][row]), int(self._ends[file][row])
        if end - start > self.max_record_bytes:
            return (f"line is {end - start} bytes, over data.max_record_bytes={self.max_record_bytes}; "
                    f"raise the limit or fix the line")
        if file not in self._fds:
            self._fds[file] = os.open(self.paths[file], os.O_RDONLY)
        data = os.pread(self._fds[file], end - start, start)
        return data[:-1] if data.endswith(b"\r") else data

    def __del__(self):
        for fd in getattr(self, "_fds", {}).values():
            try:
                os.close(fd)
            except OSError:
                pass


def decode_utf8(data: bytes) -> tuple[str, str]:
    """(text, "") or ("", reason) for bytes that are not valid UTF-8."""
    try:
        return data.decode("utf-8"), ""
    except UnicodeDecodeError as err:
        return "", f"invalid UTF-8 at byte {err.start} ({data[err.start:err.start + 4]!r})"


def read_text_line(lines: "LineFiles", i: int, source: int) -> "str | BadRecord":
    """Line i decoded as UTF-8, or the BadRecord saying why it cannot be (too long, unreadable, not UTF-8)."""
    data = lines.read(i)
    if isinstance(data, str):
        return BadRecord(lines.where(i), data, source)
    text, problem = decode_utf8(data)
    if problem:
        return BadRecord(lines.where(i), problem, source)
    return text


class JsonlSource:
    """One JSON object per line."""

    def __init__(self, paths: list[str], max_record_bytes: int, source: int = 0):
        self.lines = LineFiles(paths, max_record_bytes)
        self.source = source

    def __len__(self) -> int:
        return len(self.lines)

    def __getitem__(self, i: int) -> RecordOrBad:
        text = read_text_line(self.lines, i, self.source)
        if isinstance(text, BadRecord):
            return text
        try:
            value = json.loads(text)
        except json.JSONDecodeError as err:
            return BadRecord(self.lines.where(i), f"malformed JSON: {err.msg} at column {err.colno}", self.source)
        if not isinstance(value, dict):
            return BadRecord(self.lines.where(i), f"expected a JSON object per line, got {type(value).__name__}",
                             self.source)
        return Record(value, self.lines.where(i), self.source)


class TextLinesSource:
    """Plain text, one document per non-empty line, exposed under ``field``."""

    def __init__(self, paths: list[str], field: str, max_record_bytes: int, source: int = 0):
        self.lines = LineFiles(paths, max_record_bytes)
        self.field = field
        self.source = source

    def __len__(self) -> int:
        return len(self.lines)

    def __getitem__(self, i: int) -> RecordOrBad:
        text = read_text_line(self.lines, i, self.source)
        if isinstance(text, BadRecord):
            return text
        return Record({self.field: text}, self.lines.where(i), self.source)


class TextFilesSource:
    """Plain text, one document per file."""

    def __init__(self, paths: list[str], field: str, max_record_bytes: int, source: int = 0):
        self.paths, self.field, self.max_record_bytes, self.source = paths, field, max_record_bytes, source

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> RecordOrBad:
        path = self.paths[i]
        size = os.path.getsize(path)
        if size > self.max_record_bytes:
            return BadRecord(path, f"file is {size} bytes, over data.max_record_bytes={self.max_record_bytes}",
                             self.source)
        text, problem = decode_utf8(Path(path).read_bytes())
        if problem:
            return BadRecord(path, problem, self.source)
        return Record({self.field: text}, path, self.source)


# --------------------------------------------------------------------------------------------
# Columnar and dataset sources
# --------------------------------------------------------------------------------------------

class ParquetSource:
    """Rows of Parquet files; each file is memory-mapped on first use."""

    def __init__(self, paths: list[str], source: int = 0):
        import pyarrow.parquet as pq
        self.paths, self.source = paths, source
        counts = []
        for path in paths:
            try:
                counts.append(pq.ParquetFile(path).metadata.num_rows)
            except Exception as err:  # pyarrow raises several types for a corrupt file
                raise _unreadable_parquet(path, err) from None
        self._offsets = np.cumsum([0] + counts).tolist()
        self._tables: dict[int, Any] = {}

    def __len__(self) -> int:
        return self._offsets[-1]

    def __getitem__(self, i: int) -> RecordOrBad:
        import pyarrow.parquet as pq
        if not 0 <= i < len(self):
            raise IndexError(f"record {i} out of range [0, {len(self)})")
        file = bisect.bisect_right(self._offsets, i) - 1
        row = i - self._offsets[file]
        where = f"{self.paths[file]} row {row}"
        if file not in self._tables:
            try:
                self._tables[file] = pq.read_table(self.paths[file], memory_map=True)
            except Exception as err:  # a footer that reads but damaged pages: the whole file is unusable
                raise _unreadable_parquet(self.paths[file], err) from None
        table = self._tables[file]
        try:
            fields = {name: table.column(name)[row].as_py() for name in table.column_names}
        except UnicodeDecodeError as err:
            return BadRecord(where, f"invalid UTF-8 ({err.reason})", self.source)
        return Record(fields, where, self.source)


def _unreadable_parquet(path: str, err: Exception) -> DataError:
    reason = " ".join(str(err).split()) or type(err).__name__      # pyarrow's messages span several lines
    return DataError(f"{path}: not a readable Parquet file ({reason[:300]}); re-create it or remove it from "
                     f"data.sources")


class DatasetSource:
    """Any ``len``/``[i]`` dataset whose items are dicts: Hugging Face ``Dataset``, TFDS data source."""

    def __init__(self, dataset, label: str, source: int = 0):
        self.dataset, self.label, self.source = dataset, label, source

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, i: int) -> RecordOrBad:
        return Record(dict(self.dataset[i]), f"{self.label} record {i}", self.source)


def open_hf_disk(path: str, split: str, source: int = 0) -> DatasetSource:
    """A dataset written by Hugging Face ``datasets`` ``save_to_disk`` (a Dataset or DatasetDict)."""
    folder = Path(os.path.expanduser(path))
    if not folder.is_dir():
        raise DataError(f"{path}: no such directory. Local files need a suffix (.jsonl, .parquet, .txt) or an "
                        f"explicit format (jsonl, parquet, text); a directory must be written by datasets' "
                        f"save_to_disk")
    import datasets
    try:
        dataset = datasets.load_from_disk(str(folder))
    except FileNotFoundError as err:
        raise DataError(f"{path}: not a Hugging Face save_to_disk directory ({err}); write one with "
                        f"Dataset.save_to_disk, or name local files by glob with their suffix") from None
    if isinstance(dataset, datasets.DatasetDict):
        if split not in dataset:
            raise DataError(f"{path}: no split {split!r}; it has {sorted(dataset)}. Set the source's split")
        dataset = dataset[split]
    return DatasetSource(dataset, f"{path}[{split}]", source)


def open_tfds(name: str, data_dir: Optional[str], split: str, source: int = 0) -> DatasetSource:
    """A TFDS dataset prepared as ``array_record``, read with ``tfds.data_source`` (no TensorFlow)."""
    import tensorflow_datasets as tfds
    data_dir = os.path.expanduser(data_dir) if data_dir else None
    how = (f"Nothing is downloaded at run time. Prepare it first: from local files with "
           f"`python -m launch.data prepare --input 'files/*.jsonl' --name {name.split('/')[0].split(':')[0]}"
           f"{' --data-dir ' + data_dir if data_dir else ''}`, or for a catalog dataset, on a machine with "
           f"network, `tfds build {name} --file_format=array_record"
           f"{' --data_dir=' + data_dir if data_dir else ''}` and copy the data_dir here")
    try:
        data = tfds.data_source(name, split=split, data_dir=data_dir, download=False)
    except tfds.core.registered.DatasetNotFoundError:
        raise DataError(f"TFDS dataset {name!r} is not prepared under data_dir {data_dir or '~/tensorflow_datasets'}. "
                        f"{how}") from None
    except (AssertionError, ValueError, FileNotFoundError, NotImplementedError) as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise DataError(f"TFDS dataset {name!r} split {split!r} in {data_dir or '~/tensorflow_datasets'} cannot be "
                        f"read as array_record: {first}. {how}") from None
    return DatasetSource(data, f"tfds:{name}[{split}]", source)


def open_source(source: SourceConfig, data: DataConfig, split: str, index: int = 0) -> Sequence[RecordOrBad]:
    """The records of one configured source's ``split`` (``split`` matters for TFDS / save_to_disk only)."""
    fmt = source.resolved_format()
    if fmt == "tfds":
        return open_tfds(source.name, source.data_dir, split, index)
    if fmt == "hf_disk":
        return open_hf_disk(source.path, split, index)
    paths = expand_glob(source.path)
    if fmt == "jsonl":
        return JsonlSource(paths, data.max_record_bytes, index)
    if fmt == "parquet":
        return ParquetSource(paths, index)
    field = data.text_field_of(source)
    if source.text_unit == "file":
        return TextFilesSource(paths, field, data.max_record_bytes, index)
    return TextLinesSource(paths, field, data.max_record_bytes, index)
