"""Tokenising documents: document boundaries and chat templates (tokenizers load in jax_controlllm.tokenizer).

Pre-training documents become ``[BOS] text [END]`` where BOS is added only if the tokenizer adds
it by default (Llama 2/3 do, SmolLM2 does not) and END is the token the model family separates
pre-training documents with (``<|end_of_text|>`` for Llama 3, ``<|endoftext|>`` for SmolLM2 and
GPT-2 style vocabularies, else the EOS token, ``</s>`` for Llama 2). SFT conversations are
rendered with the tokenizer's chat template and only the assistant turns (with their
end-of-turn marker) are trained.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import numpy as np

from jax_controlllm.config import DataConfig
from jax_controlllm.data.errors import DataError

DOC_END_CANDIDATES = ("<|end_of_text|>", "<|endoftext|>")


@dataclass
class Document:
    """One tokenised document: token ids and which of them are loss targets."""
    ids: np.ndarray        # int32 [n]
    trained: np.ndarray    # bool [n]

    def __len__(self) -> int:
        return len(self.ids)


@dataclass
class TokenPolicy:
    """Which special tokens wrap documents and which id pads rows."""
    bos_id: Optional[int]        # prepended to each document (None: not added)
    end_id: Optional[int]        # appended to each document (None: not added)
    pad_id: int

    def describe(self, tokenizer) -> dict:
        name = lambda i: None if i is None else tokenizer.convert_ids_to_tokens(int(i))  # noqa: E731
        return {"bos": name(self.bos_id), "end": name(self.end_id), "pad": name(self.pad_id)}


def _adds_bos_by_default(tokenizer) -> bool:
    bos = tokenizer.bos_token_id
    if bos is None:
        return False
    ids = tokenizer("a")["input_ids"]
    return len(ids) > 0 and ids[0] == bos


def _doc_end_id(tokenizer, config: DataConfig) -> Optional[int]:
    vocab = tokenizer.get_vocab()
    if config.doc_end_token is not None:
        if config.doc_end_token not in vocab:
            raise DataError(f"data.doc_end_token {config.doc_end_token!r} is not in the tokenizer's vocabulary")
        return vocab[config.doc_end_token]
    for token in DOC_END_CANDIDATES:
        if token in vocab:
            return vocab[token]
    return tokenizer.eos_token_id


def token_policy(tokenizer, config: DataConfig) -> TokenPolicy:
    """BOS/END/pad ids for this tokenizer and config (``None`` settings follow the model family)."""
    add_bos = _adds_bos_by_default(tokenizer) if config.add_bos is None else config.add_bos
    add_eos = (config.mode == "pretrain") if config.add_eos is None else config.add_eos
    if add_bos and tokenizer.bos_token_id is None:
        raise DataError("data.add_bos is true but the tokenizer has no BOS token; set data.add_bos: false")
    end_id = _doc_end_id(tokenizer, config) if add_eos else None
    if add_eos and end_id is None:
        raise DataError("the tokenizer has no EOS / end-of-text token to end documents with; set "
                        "data.doc_end_token to one of its tokens or data.add_eos: false")
    pad_id = next((i for i in (tokenizer.pad_token_id, end_id, tokenizer.eos_token_id) if i is not None), 0)
    return TokenPolicy(tokenizer.bos_token_id if add_bos else None, end_id, int(pad_id))


def _encode_batch(tokenizer, texts: list[str], offsets: bool):
    """(ids, offsets) per text without special tokens; the Rust backend directly when there is one."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        encodings = backend.encode_batch(texts, add_special_tokens=False)
        return [(e.ids, e.offsets if offsets else None) for e in encodings]
    out = tokenizer(texts, add_special_tokens=False, return_offsets_mapping=offsets)
    return [(ids, out["offset_mapping"][i] if offsets else None) for i, ids in enumerate(out["input_ids"])]


def _wrap(ids: np.ndarray, trained: np.ndarray, policy: TokenPolicy) -> Document:
    if policy.bos_id is not None and not (len(ids) and ids[0] == policy.bos_id):
        ids = np.concatenate([np.array([policy.bos_id], np.int32), ids])
        trained = np.concatenate([np.zeros(1, bool), trained])     # BOS is never a target
    if policy.end_id is not None:
        ids = np.concatenate([ids, np.array([policy.end_id], np.int32)])
        trained = np.concatenate([trained, np.ones(1, bool)])       # learn to end documents
    return Document(ids, trained)


class TextEncoder:
    """Pre-training: texts -> documents, every token trained."""

    def __init__(self, tokenizer, policy: TokenPolicy):
        self.tokenizer, self.policy = tokenizer, policy

    def encode(self, texts: list[str]) -> list[Document]:
        docs = []
        for ids, _ in _encode_batch(self.tokenizer, texts, offsets=False):
            ids = np.asarray(ids, np.int32)
            docs.append(_wrap(ids, np.ones(len(ids), bool), self.policy))
        return docs


class ChatTemplateError(DataError):
    """The chat template cannot be split into per-turn spans."""


class ChatEncoder:
    """SFT: conversations rendered with the chat template; only assistant turns are trained.

    The assistant span of turn i is the text between the rendering of turns [0, i) with the
    generation prompt and the rendering of turns [0, i]: exactly what the model must produce
    after the prompt at inference, including its end-of-turn marker. Tokens are attributed to
    spans by their character offsets in the full rendering, so the ids are those of tokenising
    the whole conversation at once.
    """

    def __init__(self, tokenizer, policy: TokenPolicy, where: str = "the tokenizer"):
        if not getattr(tokenizer, "chat_template", None):
            raise DataError(f"{where} has no chat template, and SFT mode renders conversations with it: use a "
                            f"tokenizer with one (chat_template in tokenizer_config.json or chat_template.jinja) "
                            f"or set data.mode: pretrain")
        self.tokenizer, self.policy = tokenizer, policy

    def _render(self, messages: list, generation_prompt: bool = False) -> str:
        return self.tokenizer.apply_chat_template(messages, tokenize=False,
                                                  add_generation_prompt=generation_prompt)

    def assistant_spans(self, messages: list) -> tuple[str, list[tuple[int, int]]]:
        """The full rendering and the character spans of the assistant turns in it."""
        text = self._render(messages)
        spans = []
        for i, message in enumerate(messages):
            if message["role"] != "assistant":
                continue
            prompt = self._render(messages[:i], generation_prompt=True) if i else ""
            through = text if i == len(messages) - 1 else self._render(messages[: i + 1])
            if not (text.startswith(through) and through.startswith(prompt)):
                raise ChatTemplateError(
                    "the chat template does not render conversations prefix by prefix (turns [0, i) plus the "
                    "generation prompt must be a prefix of turns [0, i]), so assistant turns cannot be located; "
                    "use a standard template or pre-render the data and train in pretrain mode")
            spans.append((len(prompt), len(through)))
        return text, spans

    def encode(self, conversations: list[list]) -> list[Document]:
        return self.encode_rendered([self.assistant_spans(messages) for messages in conversations])

    def encode_rendered(self, rendered: list[tuple[str, list]]) -> list[Document]:
        """Tokenise (text, assistant spans) pairs from ``assistant_spans`` in one batch."""
        encoded = _encode_batch(self.tokenizer, [text for text, _ in rendered], offsets=True)
        docs = []
        for (_, spans), (ids, offsets) in zip(rendered, encoded):
            ids = np.asarray(ids, np.int32)
            starts = np.asarray([start for start, _ in offsets], np.int64).reshape(-1)
            trained = np.zeros(len(ids), bool)
            for lo, hi in spans:
                trained |= (starts >= lo) & (starts < hi)
            docs.append(_wrap(ids, trained, self.policy))
        return docs
