"""Packing documents into fixed-length rows with segment ids, per-document positions and labels.

Row layout (every array is ``[seq_len]`` int32):

* ``input_ids``: the documents' tokens back to back, then ``pad_id``.
* ``segment_ids``: 1, 2, ... for the documents of the row in order, 0 for padding. Attention is
  allowed only between equal non-zero segment ids, so a token never sees another document.
* ``positions``: restart at 0 for each document piece (RoPE positions of the document alone).
* ``labels``: UNSHIFTED targets. ``labels[t] = input_ids[t]`` where token t is trained, -100
  elsewhere (padding, prompt tokens in SFT). The loss shifts internally: it scores
  ``logits[t]`` against ``labels[t + 1]`` and only when ``segment_ids[t] == segment_ids[t + 1]``.
  In addition, the first token of every document after the row's first has label -100, so even
  a loss that ignored segment ids would never train document k to predict document k+1's first
  token. (The row's first label is never scored: no position precedes it.)

Pre-training packs by concatenate-and-split: a document longer than the space left continues in
the next row (its positions restart at 0 there, as if it were a new document). SFT keeps
examples whole: an example that does not fit in the current row starts a new row, and one longer
than ``seq_len`` is truncated (counted). With ``packing=False`` every row holds one document
(or one ``seq_len`` piece of a long pre-training document).
"""
from __future__ import annotations

from typing import Optional, Sequence

import numpy as np

from jax_controlllm.data.documents import DocumentCursor, ListReader
from jax_controlllm.data.tokenize import Document

IGNORE_INDEX = -100
ROW_KEYS = ("input_ids", "labels", "segment_ids", "positions")

Piece = tuple[np.ndarray, np.ndarray]     # (ids, trained) of one document (or a part of one)


def empty_rows(n: int, seq_len: int, pad_id: int) -> dict[str, np.ndarray]:
    """``n`` all-padding rows (segment 0, no labels)."""
    return {"input_ids": np.full((n, seq_len), pad_id, np.int32),
            "labels": np.full((n, seq_len), IGNORE_INDEX, np.int32),
            "segment_ids": np.zeros((n, seq_len), np.int32),
            "positions": np.zeros((n, seq_len), np.int32)}


def write_row(rows: dict[str, np.ndarray], r: int, pieces: Sequence[Piece]) -> None:
    """Fill row ``r`` of ``empty_rows`` arrays with ``pieces`` (documents in order)."""
    t = 0
    for segment, (ids, trained) in enumerate(pieces, start=1):
        n = len(ids)
        rows["input_ids"][r, t:t + n] = ids
        rows["labels"][r, t:t + n] = np.where(trained, ids, IGNORE_INDEX)
        rows["segment_ids"][r, t:t + n] = segment
        rows["positions"][r, t:t + n] = np.arange(n, dtype=np.int32)
        if t > 0:
            rows["labels"][r, t] = IGNORE_INDEX     # never a target across a document boundary
        t += n


class Packer:
    """Greedy streaming packer: takes documents from a cursor, returns the pieces of one row at a time.

    Greedy and in stream order, so the cursor position at a row boundary is the entire state:
    restoring the cursor restores every later row exactly.
    """

    def __init__(self, cursor: DocumentCursor, seq_len: int, packing: bool, split_documents: bool):
        if seq_len < 2:
            raise ValueError(f"seq_len must be at least 2, got {seq_len}")
        self.cursor, self.seq_len = cursor, seq_len
        self.packing, self.split_documents = packing, split_documents
        self.counts = {"rows": 0, "segments": 0, "tokens": 0, "trained_tokens": 0,
                       "split_documents": 0, "truncated_documents": 0}

    def next_row(self) -> Optional[list[Piece]]:
        """The pieces of the next row; None when a finite stream is exhausted."""
        pieces: list[Piece] = []
        space = self.seq_len
        while space > 0 and (self.packing or not pieces):
            doc = self.cursor.current()
            if doc is None:
                break
            if self.split_documents:
                piece = self._take_split(doc, space)
            else:
                piece = self._take_whole(doc, space, first=not pieces)
                if piece is None:
                    break
            pieces.append(piece)
            space -= len(piece[0])
        if not pieces:
            return None
        self._count(pieces)
        return pieces

    def _take_split(self, doc: Document, space: int) -> Piece:
        start = self.cursor.offset
        take = min(space, len(doc) - start)
        if start == 0 and take < len(doc):
            self.counts["split_documents"] += 1
        self.cursor.advance(take, len(doc))
        return doc.ids[start:start + take], doc.trained[start:start + take]

    def _take_whole(self, doc: Document, space: int, first: bool) -> Optional[Piece]:
        n = min(len(doc), self.seq_len)
        if n > space and not first:
            return None                               # starts the next row instead
        if n < len(doc):
            self.counts["truncated_documents"] += 1
        self.cursor.skip_document()
        return doc.ids[:n], doc.trained[:n]

    def _count(self, pieces: list[Piece]) -> None:
        self.counts["rows"] += 1
        self.counts["segments"] += len(pieces)
        self.counts["tokens"] += sum(len(ids) for ids, _ in pieces)
        # trained targets as the loss sees them: not the first token of any piece
        self.counts["trained_tokens"] += sum(int(trained[1:].sum()) for _, trained in pieces)


def pack_documents(documents: Sequence[Sequence[int]], seq_len: int, pad_id: int,
                   trained: Optional[Sequence[Sequence[bool]]] = None, split_documents: bool = True,
                   packing: bool = True) -> dict[str, np.ndarray]:
    """Pack token-id lists into rows; returns ``input_ids, labels, segment_ids, positions`` [n_rows, seq_len].

    Documents go in order; by default (pre-training) a document that does not fit continues in
    the next row. ``trained`` optionally marks per token whether it is a loss target (SFT:
    assistant tokens); ``split_documents=False`` keeps each document whole in one row
    (truncating ones longer than ``seq_len``); ``packing=False`` puts one document per row.

    Label contract: labels are unshifted, ``input_ids`` where trained and -100 elsewhere
    (including padding and the first token of every document but the row's first); the loss
    scores ``logits[t]`` against ``labels[t+1]`` only where ``segment_ids[t] == segment_ids[t+1]``.
    Empty documents are dropped.
    """
    docs = []
    for i, ids in enumerate(documents):
        ids = np.asarray(ids, np.int32).reshape(-1)
        mask = np.ones(len(ids), bool) if trained is None else np.asarray(trained[i], bool).reshape(-1)
        if mask.shape != ids.shape:
            raise ValueError(f"document {i}: {len(ids)} tokens but {len(mask)} trained flags")
        docs.append(Document(ids, mask))
    packer = Packer(DocumentCursor(ListReader(docs), skip_bad=True), seq_len, packing, split_documents)
    all_pieces = []
    while (pieces := packer.next_row()) is not None:
        all_pieces.append(pieces)
    rows = empty_rows(len(all_pieces), seq_len, pad_id)
    for r, pieces in enumerate(all_pieces):
        write_row(rows, r, pieces)
    return rows
