"""A word-level tokenizer over a synthetic corpus, for tiny from-scratch models in tests and experiments.

Whitespace and punctuation split words; every word of the corpus is one token, so an answer such as
" Lisbon" is a single token. Saved as ``tokenizer.json``, it loads with ``tokenizers.Tokenizer.from_file``
and transformers' ``PreTrainedTokenizerFast``.
"""
from __future__ import annotations

from pathlib import Path
from typing import Iterable

SPECIAL_TOKENS = ("<pad>", "<s>", "</s>", "<unk>")     # ids 0, 1, 2, 3
PAD_ID, BOS_ID, EOS_ID, UNK_ID = range(4)


def build_word_tokenizer(texts: Iterable[str]):
    """A ``tokenizers.Tokenizer`` whose vocabulary is the special tokens plus every word of ``texts``."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    pre = pre_tokenizers.Sequence([pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Punctuation()])
    vocab = {token: i for i, token in enumerate(SPECIAL_TOKENS)}
    for text in texts:
        for word, _ in pre.pre_tokenize_str(text):
            vocab.setdefault(word, len(vocab))
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre
    return tokenizer


def save_word_tokenizer(tokenizer, out_dir) -> Path:
    """Write tokenizer.json + tokenizer_config.json into an (HF model) directory."""
    import json
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    tokenizer.save(str(out_dir / "tokenizer.json"))
    (out_dir / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "PreTrainedTokenizerFast", "pad_token": "<pad>", "bos_token": "<s>",
        "eos_token": "</s>", "unk_token": "<unk>"}, indent=1))
    return out_dir / "tokenizer.json"
