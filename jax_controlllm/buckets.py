"""Padding to shape buckets: each (batch, length) bucket compiles once, so a session of ragged requests
compiles a handful of programs, not one per request. Used by generation and evaluation."""
from __future__ import annotations

from typing import Optional, Sequence

import numpy as np


def round_up(n: int, multiple: int) -> int:
    """n rounded up to a multiple of ``multiple`` (at least one multiple)."""
    return max(multiple, -(-n // multiple) * multiple)


def batch_bucket(n: int, cap: Optional[int] = None) -> int:
    """Rows to pad n rows to: the next power of two, at most ``cap`` (a small last chunk or a small evaluation
    set does not pay for a full batch)."""
    bucket = 1 << max(n - 1, 0).bit_length()
    return bucket if cap is None else min(cap, bucket)


def length_bucket(n: int) -> int:
    """Padded length for n tokens: a power of two from 16 up to 512, then multiples of 512. Few buckets (few
    compilations) at at most 2x padding for short rows."""
    if n <= 512:
        return max(16, 1 << max(n - 1, 0).bit_length())
    return round_up(n, 512)


def pad_rows(rows: Sequence[Sequence[int]], batch_size: int, pad_id: int = 0,
             length: Optional[int] = None) -> tuple[np.ndarray, np.ndarray]:
    """Right-pad token rows into ([batch_size, L] ids, mask); L is ``length`` or ``length_bucket`` of the longest."""
    length = length or length_bucket(max(len(r) for r in rows))
    ids = np.full((batch_size, length), pad_id, np.int32)
    mask = np.zeros((batch_size, length), np.int32)
    for i, row in enumerate(rows):
        ids[i, :len(row)], mask[i, :len(row)] = row, 1
    return ids, mask
