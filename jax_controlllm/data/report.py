"""Human-readable views of packed batches: decoded documents with the unscored spans marked, and
packing statistics (what ``python -m launch.data inspect`` prints)."""
from __future__ import annotations

from typing import Iterable

import numpy as np

from jax_controlllm.data.pack import IGNORE_INDEX

MASK_OPEN, MASK_CLOSE = "⟦", "⟧"


def scored_mask(labels: np.ndarray, segment_ids: np.ndarray) -> np.ndarray:
    """Which tokens the loss trains as targets: a label, and the previous token in the same document."""
    scored = labels != IGNORE_INDEX
    scored[..., 0] = False
    scored[..., 1:] &= segment_ids[..., 1:] == segment_ids[..., :-1]
    return scored


def _spans(flags: np.ndarray) -> Iterable[tuple[int, int, bool]]:
    start = 0
    for t in range(1, len(flags) + 1):
        if t == len(flags) or flags[t] != flags[start]:
            yield start, t, bool(flags[start])
            start = t


def format_row(tokenizer, batch: dict, r: int) -> str:
    """Row ``r`` of a batch, one block per document, unscored tokens inside ⟦ ⟧."""
    ids, seg = batch["input_ids"][r], batch["segment_ids"][r]
    scored = scored_mask(batch["labels"][r], seg)
    lines = []
    for segment in [s for s in np.unique(seg) if s > 0]:
        where = np.flatnonzero(seg == segment)
        lo, hi = int(where[0]), int(where[-1]) + 1
        n_scored = int(scored[lo:hi].sum())
        lines.append(f"--- document {segment}: tokens {lo}..{hi - 1} ({hi - lo} tokens, {n_scored} trained), "
                     f"positions {int(batch['positions'][r, lo])}..{int(batch['positions'][r, hi - 1])} ---")
        text = []
        for a, b, trained in _spans(scored[lo:hi]):
            piece = tokenizer.decode(ids[lo + a:lo + b].tolist(), skip_special_tokens=False)
            text.append(piece if trained else f"{MASK_OPEN}{piece}{MASK_CLOSE}")
        lines.append("".join(text))
    padding = int((seg == 0).sum())
    if padding:
        lines.append(f"--- {padding} padding tokens ---")
    return "\n".join(lines)


def packing_summary(stats: dict, seq_len: int) -> str:
    """Fill ratio, documents per row and what was split, truncated or skipped."""
    rows = max(stats["rows"], 1)
    return "\n".join([
        f"rows: {stats['rows']} of {seq_len} tokens, {stats['batches']} batches",
        f"fill ratio: {stats['fill_ratio']:.3f} (non-padding tokens / all tokens)",
        f"documents per row: {stats['documents_per_row']:.2f} (pieces of documents, {stats['documents']} "
        f"documents finished)",
        f"trained tokens: {stats['trained_tokens']} ({stats['trained_tokens'] / (rows * seq_len):.3f} of all)",
        f"split across rows: {stats['split_documents']}, truncated: {stats['truncated_documents']}, "
        f"empty: {stats['empty_documents']}, bad records skipped: {stats['skipped_bad_records']}",
    ])
