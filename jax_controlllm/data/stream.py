"""The record stream: which raw record sits at each global position, for training and for eval.

Training: each source (minus its held-out part) is an infinite sequence of epochs, each epoch a
fresh permutation of the source (``EpochShuffled``), and the sources are interleaved by weight
with ``grain.MapDataset.mix``. The result is an infinite random-access sequence, so the
pipeline's whole position is one integer. Eval: the held-out parts of all sources, concatenated
in order, read once.

Why not ``MapDataset.source(...).shuffle(seed).repeat()``: grain's per-record monitoring costs
~40 us per access and its index shuffle takes milliseconds per access for sources of fewer than
~1000 records (cycle walking); a cached numpy permutation per epoch is exact and ~1 us.
"""
from __future__ import annotations

import bisect
import sys
from collections import OrderedDict
from dataclasses import dataclass
from typing import Optional, Sequence

import grain
import grain.experimental
import numpy as np

from jax_controlllm.config import DataConfig, SourceConfig
from jax_controlllm.data.errors import DataError
from jax_controlllm.data.sources import open_source


class Holdout:
    """Every ``every``-th record (indices every-1, 2*every-1, ...) is eval; the rest is train.

    Strided rather than a random subset: membership and the train/eval index maps are O(1)
    arithmetic with no per-record memory, and the held-out records are spread over the whole
    source (all files), not taken from its end.
    """

    def __init__(self, records: Sequence, every: int, eval_part: bool):
        if every < 2:
            raise ValueError(f"every must be >= 2, got {every}")
        self.records, self.every, self.eval_part = records, every, eval_part
        n_eval = len(records) // every
        self._len = n_eval if eval_part else len(records) - n_eval

    def __len__(self) -> int:
        return self._len

    def __getitem__(self, i: int):
        if not 0 <= i < self._len:
            raise IndexError(f"record {i} out of range [0, {self._len})")
        if self.eval_part:
            return self.records[i * self.every + self.every - 1]
        return self.records[i + i // (self.every - 1)]


class Concat:
    """Several record sequences back to back."""

    def __init__(self, parts: list):
        self.parts = parts
        self._offsets = np.cumsum([0] + [len(p) for p in parts]).tolist()

    def __len__(self) -> int:
        return self._offsets[-1]

    def __getitem__(self, i: int):
        if not 0 <= i < len(self):
            raise IndexError(f"record {i} out of range [0, {len(self)})")
        part = bisect.bisect_right(self._offsets, i) - 1
        return self.parts[part][i - self._offsets[part]]


class EpochShuffled(grain.MapDataset):
    """Infinite: position k reads record ``perm_e[k % n]`` of epoch ``e = k // n``.

    Each epoch's permutation comes from ``(seed, epoch)`` alone, so any position can be read in
    any order. Permutations of sources up to ``MAX_CACHED_PERMUTATION`` records are numpy arrays
    (the last two epochs cached); bigger sources use grain's O(1)-memory index shuffle.
    """

    MAX_CACHED_PERMUTATION = 1 << 24

    def __init__(self, records: Sequence, seed: int, shuffle: bool = True):
        super().__init__()
        self.records, self.seed, self.shuffle = records, seed, shuffle
        self._n = len(records)
        self._perms: OrderedDict[int, np.ndarray] = OrderedDict()

    def __len__(self) -> int:
        return sys.maxsize

    def __str__(self) -> str:
        return f"EpochShuffled(n={self._n}, seed={self.seed}, shuffle={self.shuffle})"

    def record_index(self, k: int) -> int:
        epoch, i = divmod(k, self._n)
        if not self.shuffle:
            return i
        if self._n > self.MAX_CACHED_PERMUTATION:
            return grain.experimental.index_shuffle(i, max_index=self._n - 1,
                                                      seed=(self.seed + epoch) % 2**32, rounds=4)
        if epoch not in self._perms:
            self._perms[epoch] = np.random.default_rng([self.seed, epoch]).permutation(self._n)
            while len(self._perms) > 2:
                self._perms.popitem(last=False)
        return int(self._perms[epoch][i])

    def __getitem__(self, k):
        if isinstance(k, slice):
            return self.slice(k)
        return self.records[self.record_index(k)]


@dataclass
class Stream:
    """A record stream and a description of what went into it (compared when restoring state)."""
    records: Sequence                   # records[k] -> Record | BadRecord (infinite for training)
    finite: bool
    parts: list                         # per source: {"source", "format", "split", "records", "weight"}
    sources: list                       # the SourceConfigs that Record.source indexes into

    def __len__(self) -> int:
        return len(self.records)


def holdout_every(fraction: float) -> int:
    """The stride that holds out ``fraction`` of the records (0.01 -> every 100th)."""
    return max(2, int(round(1.0 / fraction)))


def source_seed(seed: int, index: int) -> int:
    """Independent 32-bit shuffle seeds per source, stable for a given (seed, source index)."""
    return int(np.random.SeedSequence([seed, index]).generate_state(1, dtype=np.uint32)[0])


def _eval_split_of(source: SourceConfig, data: DataConfig) -> Optional[str]:
    if source.resolved_format() not in ("tfds", "hf_disk"):
        return None
    return source.eval_split or data.eval_split


def _require_records(records: Sequence, source: SourceConfig, split: str, note: str = "") -> None:
    if len(records) == 0:
        raise DataError(f"data source {source.describe()} (split {split!r}) has no records{note}; "
                        f"check the path/glob and that the files are not empty")


def train_stream(data: DataConfig, seed: int) -> Stream:
    """The infinite, shuffled, weighted training stream."""
    datasets, parts = [], []
    for i, source in enumerate(data.sources):
        records = open_source(source, data, source.split, i)
        _require_records(records, source, source.split)
        if _eval_split_of(source, data) is None and data.holdout_fraction > 0 and not data.eval_sources:
            records = Holdout(records, holdout_every(data.holdout_fraction), eval_part=False)
            _require_records(records, source, source.split, " after holding out eval records")
        datasets.append(EpochShuffled(records, source_seed(seed, i), data.shuffle))
        parts.append({"source": source.name or "local", "format": source.resolved_format(),
                      "split": source.split, "records": len(records), "weight": source.weight})
    if len(datasets) == 1:
        return Stream(datasets[0], finite=False, parts=parts, sources=data.sources)
    mixed = grain.MapDataset.mix(datasets, [s.weight for s in data.sources])
    return Stream(mixed, finite=False, parts=parts, sources=data.sources)


def eval_stream(data: DataConfig) -> Stream:
    """The held-out records of every source, in order, once."""
    pieces, parts = [], []
    if data.eval_sources:
        for i, source in enumerate(data.eval_sources):
            records = open_source(source, data, source.split, i)
            _require_records(records, source, source.split)
            pieces.append(records)
            parts.append({"source": source.name or "local", "format": source.resolved_format(),
                          "split": source.split, "records": len(records)})
    else:
        for i, source in enumerate(data.sources):
            split = _eval_split_of(source, data)
            if split is not None:
                records = open_source(source, data, split, i)
            elif data.holdout_fraction > 0:
                split = f"{source.split} holdout 1/{holdout_every(data.holdout_fraction)}"
                records = Holdout(open_source(source, data, source.split, i),
                                  holdout_every(data.holdout_fraction), eval_part=True)
            else:
                continue
            _require_records(records, source, split, " to hold out (it is smaller than 1/holdout_fraction)")
            pieces.append(records)
            parts.append({"source": source.name or "local", "format": source.resolved_format(),
                          "split": split, "records": len(records)})
    if not pieces:
        raise DataError("no eval data: set data.holdout_fraction (e.g. 0.01) to hold out part of the sources, "
                        "data.eval_split for TFDS/save_to_disk sources with a validation split, or data.eval_sources")
    sources = data.eval_sources or data.sources
    return Stream(Concat(pieces), finite=True, parts=parts, sources=sources)
