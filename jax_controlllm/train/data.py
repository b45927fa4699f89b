"""Batches for the train step: this process's rows from a data iterator, assembled into global arrays.

Two kinds of iterator share one interface (``next`` -> dict of int32 numpy [local_batch, seq_len];
``get_state`` / ``set_state``): the data pipeline's (``jax_controlllm.data``) for real corpora, and
``SyntheticTokens`` below (``data: {source: synthetic}``) for tests, benchmarks and the no-download demo.
"""
from __future__ import annotations

import dataclasses
from typing import Optional

import jax
import numpy as np

from jax_controlllm.config import ConfigError, RunConfig


class SyntheticTokens:
    """Packed rows of arithmetic token sequences (a, a+k, a+2k, ... mod vocab) with random lengths.

    Learnable (the loss falls quickly), packed with segment ids and per-document positions like real
    data, and a pure function of (seed, split, batch index, global row): any process count or mesh
    yields the same global batches, and the state is just the number of batches consumed.
    """

    def __init__(self, vocab_size: int, global_batch_size: int, seq_len: int, seed: int = 0,
                 process_index: int = 0, process_count: int = 1, split: str = "train",
                 min_doc_len: int = 8, max_doc_len: Optional[int] = None):
        if global_batch_size % process_count:
            raise ConfigError(f"train.batch_size: {global_batch_size} is not divisible by the {process_count} "
                              f"processes loading it; use a multiple of {process_count}")
        self.vocab_size, self.seq_len, self.seed = vocab_size, seq_len, seed
        self.local_batch_size = global_batch_size // process_count
        self.first_row = process_index * self.local_batch_size
        self.global_batch_size = global_batch_size
        self.split_id = {"train": 0, "eval": 1}[split]
        self.min_doc_len = max(2, min(min_doc_len, seq_len))
        self.max_doc_len = max(self.min_doc_len, min(max_doc_len or seq_len, seq_len))
        self.batches = 0

    def __iter__(self):
        return self

    def __next__(self) -> dict[str, np.ndarray]:
        rows = [self._row(self.first_row + r) for r in range(self.local_batch_size)]
        self.batches += 1
        return {k: np.stack([row[k] for row in rows]) for k in rows[0]}

    def _row(self, row: int) -> dict[str, np.ndarray]:
        rng = np.random.default_rng([self.seed, self.split_id, self.batches, row])
        ids = np.zeros(self.seq_len, np.int32)
        segments = np.zeros(self.seq_len, np.int32)
        positions = np.zeros(self.seq_len, np.int32)
        start, segment = 0, 1
        while start < self.seq_len:
            length = min(int(rng.integers(self.min_doc_len, self.max_doc_len + 1)), self.seq_len - start)
            first, stride = int(rng.integers(0, self.vocab_size)), int(rng.integers(1, 8))
            ids[start:start + length] = (first + stride * np.arange(length)) % self.vocab_size
            segments[start:start + length] = segment
            positions[start:start + length] = np.arange(length)
            start, segment = start + length, segment + 1
        return {"input_ids": ids, "labels": ids.copy(), "segment_ids": segments, "positions": positions}

    def get_state(self) -> dict:
        return {"format": "synthetic/1", "batches": self.batches}

    def set_state(self, state: dict) -> None:
        if state.get("format") != "synthetic/1":
            raise ConfigError(f"data: the checkpoint's data state {str(state)[:120]} is not from the synthetic "
                              f"source; resume with the data config the run was started with")
        self.batches = int(state["batches"])

    def reset(self) -> None:
        self.batches = 0

    @property
    def stats(self) -> dict:
        return {"batches": self.batches}


def check_data_config(run: RunConfig) -> None:
    """Fail before any work when no data is configured (the section's values were checked by load_config;
    a knowledge section supplies the sources at the start of the run: call this after prepare_knowledge)."""
    data = run.data
    if data.synthetic:
        return
    if not data.sources:
        raise ConfigError("data: no data configured; set data.sources (see docs/data.md) or "
                          "data: {source: synthetic} for generated tokens")
    data.validate()


def make_iterator(run: RunConfig, vocab_size: int, split: str, process_index: int, process_count: int,
                  tokenizer=None):
    """This process's slice of each global batch of ``split`` ("train" or "eval")."""
    train, data = run.train, run.data
    if data.synthetic:
        lengths = {k: getattr(data, k) for k in ("min_doc_len", "max_doc_len") if getattr(data, k) is not None}
        batch = train.batch_size if split == "train" else eval_batch_size(run)
        return SyntheticTokens(vocab_size, batch, train.seq_len, train.seed, process_index, process_count,
                               split, **lengths)
    from jax_controlllm.data import make_data_iterator, make_eval_iterator
    if split == "eval":
        return make_eval_iterator(data, tokenizer, eval_batch_size(run), train.seq_len, process_index,
                                  process_count)
    # The training loop reads batches ahead in its own thread (PrefetchingIterator, train.prefetch); a second
    # prefetch thread inside the data pipeline would only stack another queue on top of it.
    return make_data_iterator(dataclasses.replace(data, prefetch=0), tokenizer, train.batch_size, train.seq_len,
                              train.seed, process_index, process_count, split)


def eval_batch_size(run: RunConfig) -> int:
    """Eval batches are one micro-batch (what fits in memory with gradients fits without them)."""
    return run.train.batch_size // run.train.grad_accum


# ----------------------------------------------------------------------------------------------
# Global arrays from process-local rows
# ----------------------------------------------------------------------------------------------

def process_batch_slot(sharding, global_batch: int, seq_len: int) -> tuple[int, int]:
    """(index, count): this process holds rows [index * B / count, (index + 1) * B / count) of each global
    batch under ``sharding``. Read from the sharding itself, so any device order works."""
    indices = sharding.addressable_devices_indices_map((global_batch, seq_len)).values()
    starts = [idx[0].start or 0 for idx in indices]
    stops = [global_batch if idx[0].stop is None else idx[0].stop for idx in indices]
    lo, hi = min(starts), max(stops)
    rows = hi - lo
    covered = np.zeros(global_batch, bool)
    for a, b in zip(starts, stops):
        covered[a:b] = True
    if not covered[lo:hi].all() or global_batch % rows or lo % rows:
        raise ConfigError(f"mesh: the devices of process {jax.process_index()} hold a non-contiguous part of the "
                          f"batch; order the mesh so that each process's devices are adjacent along the "
                          f"batch axes")
    return lo // rows, global_batch // rows


def to_global(local: dict, shardings: dict, global_batch: int) -> dict:
    """Assemble each process's rows into one global jax.Array per key (no cross-host copies)."""
    return {k: jax.make_array_from_process_local_data(shardings[k], local[k], (global_batch, *local[k].shape[1:]))
            for k in shardings}
