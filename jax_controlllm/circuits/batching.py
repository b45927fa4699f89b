"""Prompt arrays: validation, per-item weights and fixed-shape padded chunks (one compile per shape).

Prompts are right-padded [N, T] token ids with their real lengths; the metric reads position length-1.
Causal attention keeps pads out of every real position, so padding (and extra padding) never changes a
result. Chunks are padded to ``chunk_size`` items (dummy items get weight 0) and T is rounded up to a
multiple of ``pad_multiple``, so a whole data set compiles the attribution step once.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator, Optional

import numpy as np

NORMALIZATIONS = ("dkc", "per_item")


@dataclass
class Prompts:
    clean: np.ndarray                  # [N, T] int32
    corrupted: Optional[np.ndarray]    # [N, T] int32 or None
    labels: np.ndarray                 # [N, 2] int32: (clean label, corrupted label)
    last: np.ndarray                   # [N] int32: position of the last real token

    @property
    def n_items(self) -> int:
        return self.clean.shape[0]


def _ids(name: str, x, vocab_size: int) -> np.ndarray:
    x = np.asarray(x)
    if x.ndim != 2 or not np.issubdtype(x.dtype, np.integer):
        raise ValueError(f"{name}: expected right-padded token ids as an integer array [N, T], "
                         f"got dtype {x.dtype} shape {x.shape}")
    if x.size and (x.min() < 0 or x.max() >= vocab_size):
        raise ValueError(f"{name}: token ids must lie in [0, {vocab_size}), found {x.min()}..{x.max()}")
    return x.astype(np.int32)


def _labels(name: str, x, n: int, vocab_size: int) -> np.ndarray:
    x = np.asarray(x).reshape(-1) if np.ndim(x) else np.full(n, x)
    if x.shape != (n,) or not np.issubdtype(x.dtype, np.integer):
        raise ValueError(f"{name}: expected one integer token id per prompt ({n}), got shape {x.shape}")
    if x.min() < 0 or x.max() >= vocab_size:
        raise ValueError(f"{name}: label ids must lie in [0, {vocab_size}), found {x.min()}..{x.max()}")
    return x.astype(np.int32)


def prepare(clean_ids, corrupted_ids, clean_label_ids, corrupted_label_ids, lengths, vocab_size: int) -> Prompts:
    """Validate the user's arrays (clear errors) and gather them into ``Prompts``."""
    clean = _ids("clean_ids", clean_ids, vocab_size)
    n, t = clean.shape
    if n == 0:
        raise ValueError("clean_ids: no prompts given")
    corrupted = None
    if corrupted_ids is not None:
        corrupted = _ids("corrupted_ids", corrupted_ids, vocab_size)
        if corrupted.shape != clean.shape:
            raise ValueError(f"corrupted_ids has shape {corrupted.shape} but clean_ids has {clean.shape}: clean "
                             f"and corrupted prompts must pair up with equal token lengths (pad both the same)")
    clean_labels = _labels("clean_label_ids", clean_label_ids, n, vocab_size)
    corrupted_labels = (clean_labels if corrupted_label_ids is None
                        else _labels("corrupted_label_ids", corrupted_label_ids, n, vocab_size))
    if lengths is None:
        lengths = np.full(n, t)
    lengths = np.asarray(lengths).reshape(-1)
    if lengths.shape != (n,) or lengths.min() < 1 or lengths.max() > t:
        raise ValueError(f"lengths: expected {n} real lengths in 1..{t} (the padded width), got "
                         f"{lengths.tolist() if lengths.size <= 8 else lengths.shape}")
    return Prompts(clean, corrupted, np.stack([clean_labels, corrupted_labels], 1), (lengths - 1).astype(np.int32))


def item_weights(n_items: int, batch_size: int, normalization: str = "dkc") -> np.ndarray:
    """Each item's weight in the summed score.

    ``dkc`` (the reference code): the metric is a mean over each batch of ``batch_size`` consecutive items and
    the summed scores are divided by N again, so item i weighs 1 / (N * |batch(i)|); the last, partial batch
    weighs more per item. ``per_item``: the plain mean over items, 1 / N.
    """
    if normalization not in NORMALIZATIONS:
        raise ValueError(f"normalization {normalization!r} is not one of {', '.join(NORMALIZATIONS)}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}")
    if normalization == "per_item":
        return np.full(n_items, 1.0 / n_items)
    sizes = np.minimum(batch_size, n_items - (np.arange(n_items) // batch_size) * batch_size)
    return 1.0 / (n_items * sizes)


def padded_length(t: int, pad_multiple: int) -> int:
    return -(-t // pad_multiple) * pad_multiple


def chunks(prompts: Prompts, weights: np.ndarray, chunk_size: int, pad_multiple: int = 8) -> Iterator[dict]:
    """Fixed-shape chunks: dicts of clean, corrupted, labels, last, weight (numpy), plus ``items`` (the real
    item indices in the chunk)."""
    n, t = prompts.clean.shape
    width = padded_length(t, pad_multiple)
    for start in range(0, n, chunk_size):
        items = np.arange(start, min(start + chunk_size, n))
        rows = np.zeros(chunk_size, np.int64)
        rows[:len(items)] = items

        def take(x):
            out = np.zeros((chunk_size, width), np.int32)
            out[:, :t] = x[rows]
            return out

        weight = np.zeros(chunk_size, np.float32)
        weight[:len(items)] = weights[items]
        yield {"clean": take(prompts.clean),
               "corrupted": None if prompts.corrupted is None else take(prompts.corrupted),
               "labels": prompts.labels[rows], "last": prompts.last[rows], "weight": weight, "items": items}
