"""Records -> tokenised documents, and the cursor that walks them (the pipeline's resumable position).

``DocumentReader`` gives random access to the tokenised document at each stream position,
tokenising ahead in chunks (one tokenizer call per chunk is several times faster than one per
document). ``DocumentCursor`` is the position ``(document index, token offset)``; it skips bad
and empty records (or fails on a bad one, naming its file and line) and counts what it skipped.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Optional, Sequence, Union

import numpy as np

from jax_controlllm.config import DataConfig
from jax_controlllm.data.errors import DataError
from jax_controlllm.data.sources import BadRecord, Record
from jax_controlllm.data.tokenize import ChatEncoder, ChatTemplateError, Document, TextEncoder, TokenPolicy

MAX_CONSECUTIVE_SKIPS = 10_000     # then the data (or the field names) must be wrong: fail instead of spinning


@dataclass(frozen=True)
class Skipped:
    """A stream position that yields no document: ``kind`` is "bad" (unreadable) or "empty"."""
    kind: str
    where: str
    reason: str


Item = Union[Document, Skipped]


# --------------------------------------------------------------------------------------------
# Field extraction
# --------------------------------------------------------------------------------------------

def _missing(record: Record, wanted: str, setting: str) -> Skipped:
    present = ", ".join(repr(k) for k in sorted(record.fields)) or "none"
    return Skipped("bad", record.where, f"has no field {wanted}; fields present: {present}. "
                                        f"Set {setting} to the field that holds it")


def _as_text(value, field: str, record: Record, max_chars: int) -> Union[str, Skipped]:
    if isinstance(value, bytes):     # TFDS Text features come back as UTF-8 bytes
        try:
            value = value.decode("utf-8")
        except UnicodeDecodeError as err:
            return Skipped("bad", record.where, f"field {field!r} is not valid UTF-8 (byte {err.start})")
    if not isinstance(value, str):
        return Skipped("bad", record.where, f"field {field!r} is a {type(value).__name__}, expected a string")
    if len(value) > max_chars:
        return Skipped("bad", record.where, f"field {field!r} has {len(value)} characters, over "
                                            f"data.max_record_bytes={max_chars}")
    return value


def extract_text(record: Record, field: str, max_chars: int) -> Union[str, Skipped]:
    if field not in record.fields:
        return _missing(record, repr(field), "data.text_field (or the source's text_field)")
    return _as_text(record.fields[field], field, record, max_chars)


def _check_messages(messages, field: str, record: Record, max_chars: int) -> Union[list, Skipped]:
    if not isinstance(messages, list) or not messages:
        return Skipped("bad", record.where, f"field {field!r} must be a non-empty list of {{role, content}}")
    checked = []
    for i, message in enumerate(messages):
        if not isinstance(message, dict) or "role" not in message or "content" not in message:
            return Skipped("bad", record.where, f"{field}[{i}] must be a mapping with 'role' and 'content'")
        role = _as_text(message["role"], f"{field}[{i}].role", record, max_chars)
        content = _as_text(message["content"], f"{field}[{i}].content", record, max_chars)
        for value in (role, content):
            if isinstance(value, Skipped):
                return value
        checked.append({"role": role, "content": content})
    if not any(m["role"] == "assistant" for m in checked):
        return Skipped("bad", record.where, f"field {field!r} has no assistant turn, so nothing to train on")
    return checked


def extract_messages(record: Record, messages_field: str, prompt_field: str, response_field: str,
                     max_chars: int) -> Union[list, Skipped]:
    """A conversation: the messages field (a list, or its JSON text), or one prompt/response turn."""
    fields = record.fields
    if messages_field in fields:
        value = fields[messages_field]
        if isinstance(value, (str, bytes)):     # JSON text (TFDS datasets made by `prepare`)
            text = _as_text(value, messages_field, record, max_chars)
            if isinstance(text, Skipped):
                return text
            try:
                value = json.loads(text)
            except json.JSONDecodeError as err:
                return Skipped("bad", record.where, f"field {messages_field!r} is text but not JSON: {err.msg}")
        return _check_messages(value, messages_field, record, max_chars)
    if prompt_field in fields and response_field in fields:
        turns = [{"role": "user", "content": fields[prompt_field]},
                 {"role": "assistant", "content": fields[response_field]}]
        return _check_messages(turns, f"{prompt_field}/{response_field}", record, max_chars)
    return _missing(record, f"{messages_field!r} (or {prompt_field!r} and {response_field!r})",
                    "data.messages_field (or data.prompt_field and data.response_field)")


# --------------------------------------------------------------------------------------------
# Reader: stream position -> Document | Skipped
# --------------------------------------------------------------------------------------------

class DocumentReader:
    """Tokenised documents at positions of a record stream, optionally one process's share of it.

    With ``shard=(index, count)`` position k reads record ``k * count + index``: each process
    tokenises only its own documents (``shard_by: documents``).
    """

    def __init__(self, records: Sequence, sources: list, data: DataConfig, tokenizer, policy: TokenPolicy,
                 finite: bool, shard: tuple[int, int] = (0, 1)):
        self.records, self.sources, self.data, self.finite = records, sources, data, finite
        self.shard_index, self.shard_count = shard
        if data.mode == "sft":
            self.encoder = ChatEncoder(tokenizer, policy, where=f"tokenizer {getattr(tokenizer, 'name_or_path', '')}")
        else:
            self.encoder = TextEncoder(tokenizer, policy)
        self._start, self._items = 0, []

    def __len__(self) -> int:
        if not self.finite:
            raise TypeError("an infinite stream has no length")
        total = len(self.records)
        return max(0, (total - self.shard_index + self.shard_count - 1) // self.shard_count)

    def get(self, k: int) -> Optional[Item]:
        """The document at position k; None past the end of a finite stream."""
        if self.finite and k >= len(self):
            return None
        if not self._start <= k < self._start + len(self._items):
            self._fill(k)
        return self._items[k - self._start]

    def _fill(self, k: int) -> None:
        stop = k + self.data.tokenize_chunk
        if self.finite:
            stop = min(stop, len(self))
        records = [self.records[j * self.shard_count + self.shard_index] for j in range(k, stop)]
        items = [self._extract(record) for record in records]
        todo = [i for i, item in enumerate(items) if not isinstance(item, Skipped)]
        if self.data.mode == "sft":
            rendered = []
            for i in list(todo):
                try:
                    rendered.append(self.encoder.assistant_spans(items[i][1]))
                except ChatTemplateError:
                    raise
                except Exception as err:  # jinja raises from inside templates (e.g. unsupported role)
                    items[i] = Skipped("bad", items[i][0], f"the chat template failed on it: {err}")
                    todo.remove(i)
            docs = self.encoder.encode_rendered(rendered)
        else:
            docs = self.encoder.encode([items[i][1] for i in todo])
        for i, doc in zip(todo, docs):
            if not self.sources[records[i].source].lm_loss:      # alignment-only text: no next-token targets
                doc = Document(doc.ids, np.zeros_like(doc.trained))
            items[i] = doc if len(doc) else Skipped("empty", items[i][0], "no tokens")
        self._start, self._items = k, items

    def _extract(self, record) -> Union[tuple, Skipped]:
        """(where, text or messages) or Skipped."""
        if isinstance(record, BadRecord):
            return Skipped("bad", record.where, record.reason)
        source = self.sources[record.source]
        limit = self.data.max_record_bytes
        if self.data.mode == "sft":
            value = extract_messages(record, self.data.messages_field_of(source), self.data.prompt_field,
                                     self.data.response_field, limit)
        else:
            value = extract_text(record, self.data.text_field_of(source), limit)
            if isinstance(value, str) and not value.strip():
                return Skipped("empty", record.where, "empty text")
        return value if isinstance(value, Skipped) else (record.where, value)


class ListReader:
    """In-memory documents (for ``pack_documents``); empty ones are skipped."""

    def __init__(self, docs: list[Document]):
        self.docs = docs

    def get(self, k: int) -> Optional[Item]:
        if k >= len(self.docs):
            return None
        return self.docs[k] if len(self.docs[k]) else Skipped("empty", f"document {k}", "no tokens")


# --------------------------------------------------------------------------------------------
# Cursor: the resumable position
# --------------------------------------------------------------------------------------------

class DocumentCursor:
    """``(position, offset)``: the next document and how many of its tokens are already packed."""

    def __init__(self, reader, skip_bad: bool):
        self.reader, self.skip_bad = reader, skip_bad
        self.position, self.offset = 0, 0
        self.counts = {"documents": 0, "skipped_bad_records": 0, "empty_documents": 0}

    def current(self) -> Optional[Document]:
        """The document being packed (skipping bad/empty ones); None at the end of a finite stream."""
        consecutive = 0
        while True:
            item = self.reader.get(self.position)
            if item is None or isinstance(item, Document):
                return item
            if item.kind == "bad" and not self.skip_bad:
                raise DataError(f"{item.where}: {item.reason}. Fix the record, or set data.skip_bad_records: "
                                f"true to skip and count such records")
            self.counts["skipped_bad_records" if item.kind == "bad" else "empty_documents"] += 1
            self.position += 1
            consecutive += 1
            if consecutive >= MAX_CONSECUTIVE_SKIPS:
                raise DataError(f"{consecutive} records in a row were unusable (the latest: {item.where}: "
                                f"{item.reason}); check the data and the field names in the data config")

    def advance(self, n_tokens: int, document_length: int) -> None:
        """Mark ``n_tokens`` more of the current document as packed; past its end, move to the next."""
        self.offset += n_tokens
        if self.offset >= document_length:
            self.position += 1
            self.offset = 0
            self.counts["documents"] += 1

    def skip_document(self) -> None:
        """Move past the current document without packing the rest of it (truncation)."""
        self.position += 1
        self.offset = 0
        self.counts["documents"] += 1
