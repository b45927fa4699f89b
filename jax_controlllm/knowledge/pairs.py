"""Clean/corrupted prompt pairs for circuit discovery, for a given tokenizer.

A pair is two queries of the same attribute about different entities, with the same number of tokens
(so every position lines up) and different first answer tokens (the labels). The corrupted prompt of
item i is the clean prompt of another item, and its label that item's label. Token ids are right-padded.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Iterable, Optional

import numpy as np

from jax_controlllm.knowledge.corpus import Query, queries
from jax_controlllm.knowledge.entities import Entity


def as_encoder(tokenizer) -> Callable[[str], list[int]]:
    """text -> token ids without special tokens, for a ``tokenizers.Tokenizer``, a transformers tokenizer or a
    plain callable."""
    if hasattr(tokenizer, "encode"):
        def encode(text: str) -> list[int]:
            out = tokenizer.encode(text, add_special_tokens=False)
            return list(out.ids if hasattr(out, "ids") else out)
        return encode
    if callable(tokenizer):
        return lambda text: list(tokenizer(text))
    raise TypeError(f"cannot tokenize with {type(tokenizer).__name__}: pass a tokenizers.Tokenizer, a "
                    f"transformers tokenizer or a function text -> list of token ids")


@dataclass
class PromptPairs:
    clean_ids: np.ndarray            # [N, T] right-padded
    corrupted_ids: np.ndarray        # [N, T]
    clean_label_ids: np.ndarray      # [N]
    corrupted_label_ids: np.ndarray  # [N]
    lengths: np.ndarray              # [N] real lengths (pairs share them)
    subject_spans: np.ndarray        # [N, 2] token positions [start, end) of the subject in the clean prompt
    clean: list                      # the clean Query of each item
    corrupted: list                  # the Query its corrupted prompt comes from

    def __len__(self) -> int:
        return len(self.lengths)

    def head(self, n: Optional[int]) -> "PromptPairs":
        """The first n pairs (all for None)."""
        return PromptPairs(self.clean_ids[:n], self.corrupted_ids[:n], self.clean_label_ids[:n],
                           self.corrupted_label_ids[:n], self.lengths[:n], self.subject_spans[:n], self.clean[:n],
                           self.corrupted[:n])

    def args(self) -> tuple:
        """(clean_ids, corrupted_ids, clean_label_ids, corrupted_label_ids, lengths) for attribute()/faithfulness()."""
        return self.clean_ids, self.corrupted_ids, self.clean_label_ids, self.corrupted_label_ids, self.lengths

    def subject_mask(self) -> np.ndarray:
        """[N, T] the subject's tokens."""
        pos = np.arange(self.clean_ids.shape[1])
        return (pos >= self.subject_spans[:, :1]) & (pos < self.subject_spans[:, 1:])

    def relation_mask(self) -> np.ndarray:
        """[N, T] the relation's tokens: after the subject, up to the last real token."""
        pos = np.arange(self.clean_ids.shape[1])
        return (pos >= self.subject_spans[:, 1:]) & (pos < self.lengths[:, None])


def _subject_span(query: Query, ids: list[int], encode, offset: int) -> Optional[tuple[int, int]]:
    start_char = query.prompt.index(query.entity)
    before = encode(query.prompt[:start_char]) if start_char else []
    through = encode(query.prompt[:start_char + len(query.entity)])
    if ids[offset:offset + len(through)] != through or through[:len(before)] != before:
        return None                    # the tokenizer merges across the subject's boundary: skip this prompt
    return offset + len(before), offset + len(through)


def make_prompt_pairs(entities: Iterable[Entity], attribute: str, tokenizer, bos_id: Optional[int] = None,
                      pad_id: int = 0, seed: int = 0, max_pairs: Optional[int] = None) -> PromptPairs:
    """Pairs for one attribute (see the module docstring); ``bos_id`` is prepended when given."""
    encode = as_encoder(tokenizer)
    offset = 0 if bos_id is None else 1
    items = []                                        # (query, ids, label, span)
    for q in queries(entities, [attribute]):
        ids = ([bos_id] if bos_id is not None else []) + encode(q.prompt)
        answer = encode(q.answer)
        span = _subject_span(q, ids, encode, offset)
        if answer and span is not None:
            items.append((q, ids, answer[0], span))
    rng = np.random.default_rng(seed)
    by_length: dict[int, list] = {}
    for i in rng.permutation(len(items)):
        by_length.setdefault(len(items[i][1]), []).append(items[i])
    pairs = []
    for group in by_length.values():
        for i, item in enumerate(group):
            # the nearest other item (in shuffled order) whose label differs
            partner = next((group[(i + s) % len(group)] for s in range(1, len(group))
                            if group[(i + s) % len(group)][2] != item[2]), None)
            if partner is not None:
                pairs.append((item, partner))
    if not pairs:
        raise ValueError(f"no clean/corrupted pairs for attribute {attribute!r}: need at least two queries with the "
                         f"same token length and different first answer tokens; generate more entities")
    pairs = pairs[:max_pairs] if max_pairs else pairs
    width = max(len(a[1]) for a, _ in pairs)

    def padded(ids):
        return ids + [pad_id] * (width - len(ids))

    return PromptPairs(
        clean_ids=np.array([padded(a[1]) for a, _ in pairs], np.int32),
        corrupted_ids=np.array([padded(b[1]) for _, b in pairs], np.int32),
        clean_label_ids=np.array([a[2] for a, _ in pairs], np.int32),
        corrupted_label_ids=np.array([b[2] for _, b in pairs], np.int32),
        lengths=np.array([len(a[1]) for a, _ in pairs], np.int32),
        subject_spans=np.array([a[3] for a, _ in pairs], np.int32),
        clean=[a[0] for a, _ in pairs], corrupted=[b[0] for _, b in pairs])
