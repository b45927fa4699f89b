"""A tiny Hugging Face tokenizer built in milliseconds, for tests and examples without model files.

Byte-level BPE (any text encodes, decoding is exact) trained on a few sentences, with ChatML
special tokens and, optionally, a ChatML chat template and a Llama-style BOS post-processor.
"""
from __future__ import annotations

from pathlib import Path

CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<s>"]
_CORPUS = [
    "The quick brown fox jumps over the lazy dog.",
    "Control LLM grows a model with parallel blocks and keeps what it knew.",
    "What is the capital of France? The capital of France is Paris.",
    "user assistant system hello world answer question",
    "0123456789 numbers, punctuation; and: quotes \"like\" 'these'!",
]


def build_tiny_tokenizer(out_dir: str | Path, chat_template: bool = True, add_bos: bool = False,
                         vocab_size: int = 400) -> Path:
    """Write a tokenizer directory loadable with ``AutoTokenizer.from_pretrained(out_dir)``.

    ``add_bos=True`` makes the tokenizer prepend ``<s>`` by default (like Llama 2/3), so the
    pipeline's "auto" BOS policy adds it to documents.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tokenizer.train_from_iterator(_CORPUS * 4, trainer=trainer)
    if add_bos:
        tokenizer.post_processor = processors.TemplateProcessing(
            single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", tokenizer.token_to_id("<s>"))])
    else:
        tokenizer.post_processor = processors.ByteLevel(trim_offsets=False)
    wrapped = PreTrainedTokenizerFast(tokenizer_object=tokenizer, bos_token="<s>" if add_bos else None,
                                      eos_token="<|im_end|>", pad_token="<|endoftext|>")
    if chat_template:
        wrapped.chat_template = CHATML_TEMPLATE
    out_dir = Path(out_dir)
    wrapped.save_pretrained(str(out_dir))
    return out_dir
