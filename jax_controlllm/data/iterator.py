"""The training/eval data iterator: this process's slice of each global batch, with resumable state.

Sharding (``DataConfig.shard_by``):

* ``rows`` (default): every process walks the same global stream of packed rows; global batch b
  is rows ``[b*G, (b+1)*G)`` and process p keeps rows ``[b*G + p*L, b*G + (p+1)*L)`` (G global,
  L local batch). Batches are identical whatever the number of processes, and the state (a
  cursor into the global stream) is the same on every process, so it resumes exactly after a
  change of process count or global batch size. Cost: every process tokenises all documents.
* ``documents``: process p reads only documents p, p+P, p+2P, ... and packs its own rows: 1/P of
  the tokenising work, but the stream depends on P, so a state only resumes on the same process
  (same index and count).

Eval iterators always shard by rows, so every process yields the same number of batches.
"""
from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np

from jax_controlllm.config import DataConfig
from jax_controlllm.data.documents import DocumentCursor, DocumentReader
from jax_controlllm.data.errors import DataError
from jax_controlllm.data.pack import Packer, empty_rows, write_row
from jax_controlllm.data.prefetch import PrefetchingIterator
from jax_controlllm.data.stream import Stream, eval_stream, train_stream
from jax_controlllm.data.tokenize import token_policy
from jax_controlllm.tokenizer import TokenizerError, load_tokenizer

STATE_FORMAT = "jax_controlllm.data/1"


class DataIterator:
    """Yields ``{input_ids, labels, segment_ids, positions}``: int32 numpy arrays [local_batch, seq_len]."""

    def __init__(self, stream: Stream, data: DataConfig, tokenizer, global_batch_size: int, seq_len: int,
                 seed: int, process_index: int, process_count: int, shard_by: str, split: str):
        if global_batch_size % process_count:
            raise DataError(f"global batch size {global_batch_size} is not divisible by the "
                            f"{process_count} processes; each process loads an equal slice")
        if not 0 <= process_index < process_count:
            raise DataError(f"process_index {process_index} is not in [0, {process_count})")
        self.data, self.tokenizer, self.seq_len = data, tokenizer, seq_len
        self.global_batch_size, self.local_batch_size = global_batch_size, global_batch_size // process_count
        self.process_index, self.process_count, self.shard_by = process_index, process_count, shard_by
        self.policy = token_policy(tokenizer, data)
        shard = (process_index, process_count) if shard_by == "documents" else (0, 1)
        reader = DocumentReader(stream.records, stream.sources, data, tokenizer, self.policy, stream.finite, shard)
        self._cursor = DocumentCursor(reader, data.skip_bad_records)
        self._packer = Packer(self._cursor, seq_len, data.packing, split_documents=data.mode == "pretrain")
        self.batches = 0
        self.fingerprint = self._fingerprint(stream, seed, split)

    # ---------------------------------------------------------------- iteration

    def __iter__(self):
        return self

    def __next__(self) -> dict[str, np.ndarray]:
        if self.shard_by == "rows":
            rows_per_batch, mine = self.global_batch_size, self.process_index * self.local_batch_size
        else:
            rows_per_batch, mine = self.local_batch_size, 0
        batch = empty_rows(self.local_batch_size, self.seq_len, self.policy.pad_id)
        for r in range(rows_per_batch):
            pieces = self._packer.next_row()
            if pieces is None:           # end of a finite stream: pad the last batch with empty rows
                if r == 0:
                    raise StopIteration
                break
            if mine <= r < mine + self.local_batch_size:
                write_row(batch, r - mine, pieces)
        self.batches += 1
        return batch

    @property
    def pad_id(self) -> int:
        return self.policy.pad_id

    @property
    def stats(self) -> dict[str, Any]:
        """Counters over the stream so far (global in rows mode) and packing ratios."""
        counts = {**self._cursor.counts, **self._packer.counts, "batches": self.batches}
        rows = max(counts["rows"], 1)
        counts["fill_ratio"] = counts["tokens"] / (rows * self.seq_len)
        counts["documents_per_row"] = counts["segments"] / rows
        return counts

    # ---------------------------------------------------------------- state

    def get_state(self) -> dict:
        """JSON-serialisable position after the last batch yielded; ``set_state`` continues from it."""
        return {"format": STATE_FORMAT, "position": self._cursor.position, "offset": self._cursor.offset,
                "batches": self.batches, "counts": {**self._cursor.counts, **self._packer.counts},
                "stream": self.fingerprint}

    def set_state(self, state: dict) -> None:
        if not isinstance(state, dict) or state.get("format") != STATE_FORMAT:
            raise DataError(f"not a data iterator state of format {STATE_FORMAT!r}: "
                            f"{str(state)[:200]}")
        self._check_compatible(state["stream"])
        self._cursor.position, self._cursor.offset = int(state["position"]), int(state["offset"])
        self.batches = int(state["batches"])
        for counts in (self._cursor.counts, self._packer.counts):
            for key in counts:
                counts[key] = int(state["counts"].get(key, 0))

    def reset(self) -> None:
        """Back to the start of the stream (e.g. to run the same eval pass again)."""
        self._cursor.position = self._cursor.offset = self.batches = 0
        for counts in (self._cursor.counts, self._packer.counts):
            for key in counts:
                counts[key] = 0

    def _fingerprint(self, stream: Stream, seed: int, split: str) -> dict:
        """What determines the stream; a state only resumes on an iterator with the same fingerprint."""
        settings = {k: v for k, v in dataclasses.asdict(self.data).items()
                    if k not in ("sources", "eval_sources", "tokenizer", "skip_bad_records", "tokenize_chunk",
                                 "prefetch", "source", "min_doc_len", "max_doc_len")}   # the last three: synthetic
        fingerprint = {"split": split, "seed": seed, "seq_len": self.seq_len, "shard_by": self.shard_by,
                       "parts": stream.parts, "settings": settings,
                       "tokens": {"vocab_size": len(self.tokenizer), **self.policy.describe(self.tokenizer)}}
        if self.shard_by == "documents":
            fingerprint["process"] = [self.process_index, self.process_count]
        return fingerprint

    def _check_compatible(self, saved: dict) -> None:
        if saved.get("shard_by") == "documents" and self.shard_by == "documents" \
                and saved.get("process") != self.fingerprint.get("process"):
            old, new = saved.get("process"), self.fingerprint.get("process")
            raise DataError(f"this data state was saved by process {old[0]} of {old[1]} with data.shard_by: "
                            f"documents, whose stream depends on the process count; it cannot continue as "
                            f"process {new[0]} of {new[1]}. Use data.shard_by: rows (the default) to resume "
                            f"across process counts, or start the data stream afresh")
        changed = sorted(k for k in set(saved) | set(self.fingerprint) if saved.get(k) != self.fingerprint.get(k))
        if changed:
            detail = "; ".join(f"{k}: saved {_short(saved.get(k))}, now {_short(self.fingerprint.get(k))}"
                               for k in changed)
            raise DataError(f"the data state does not match this data pipeline ({detail}). Resuming needs the same "
                            f"sources, settings, seed, seq_len and tokenizer; start the data stream afresh "
                            f"to change them")


def _short(value) -> str:
    text = repr(value)
    return text if len(text) <= 160 else text[:157] + "..."


def make_data_iterator(data_config: DataConfig, tokenizer_dir_or_tokenizer=None, global_batch_size: int = 8,
                       seq_len: int = 512, seed: int = 0, process_index: int = 0, process_count: int = 1,
                       split: str = "train"):
    """This process's batches of ``data_config``: infinite and shuffled for ``split="train"``, one
    ordered pass over the held-out data for ``split="eval"`` (see ``make_eval_iterator``).

    Returns a ``DataIterator``, wrapped in a ``PrefetchingIterator`` (same interface) when
    ``data_config.prefetch > 0``.
    """
    if isinstance(data_config, dict):
        data_config = DataConfig.from_dict(data_config)
    if split not in ("train", "eval"):
        raise DataError(f"split must be 'train' or 'eval', got {split!r} (source splits are set per source)")
    try:
        tokenizer = load_tokenizer(tokenizer_dir_or_tokenizer if tokenizer_dir_or_tokenizer is not None
                                   else data_config.tokenizer)
    except TokenizerError as err:       # the data pipeline reports every input problem as a DataError
        raise DataError(str(err)) from None
    if split == "eval":
        stream, shard_by = eval_stream(data_config), "rows"
    else:
        stream, shard_by = train_stream(data_config, seed), data_config.shard_by
    iterator = DataIterator(stream, data_config, tokenizer, global_batch_size, seq_len, seed, process_index,
                            process_count, shard_by, split)
    return PrefetchingIterator(iterator, data_config.prefetch) if data_config.prefetch else iterator


def make_eval_iterator(data_config: DataConfig, tokenizer_dir_or_tokenizer=None, global_batch_size: int = 8,
                       seq_len: int = 512, process_index: int = 0, process_count: int = 1):
    """One pass over the held-out data (holdout_fraction / eval_split / eval_sources), in order.

    Every process yields the same number of batches; the last is padded with empty rows
    (segment id 0, no labels). Call ``reset()`` to run the pass again.
    """
    return make_data_iterator(data_config, tokenizer_dir_or_tokenizer, global_batch_size, seq_len, 0,
                              process_index, process_count, split="eval")
