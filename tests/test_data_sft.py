"""SFT: conversations rendered with the chat template, loss only on assistant tokens."""
import json

import numpy as np
import pytest

from jax_controlllm.data import DataConfig, DataError, make_data_iterator
from jax_controlllm.data.report import scored_mask
from jax_controlllm.data.testing import build_tiny_tokenizer
from jax_controlllm.tokenizer import load_tokenizer

CONVERSATIONS = [
    [{"role": "user", "content": "What is the capital of France?"},
     {"role": "assistant", "content": "The capital of France is Paris."}],
    [{"role": "system", "content": "Answer briefly."},
     {"role": "user", "content": "hello"},
     {"role": "assistant", "content": "hello world"},
     {"role": "user", "content": "and the fox?"},
     {"role": "assistant", "content": "The quick brown fox."}],
]


@pytest.fixture(scope="module")
def chat_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("chat") / "chat.jsonl"
    path.write_text("".join(json.dumps({"messages": m}) + "\n" for m in CONVERSATIONS))
    return path


def trained_texts(tokenizer, batch) -> list[list[str]]:
    """Per row, per document: the decoded runs of tokens the loss scores."""
    out = []
    for r in range(len(batch["input_ids"])):
        scored = scored_mask(batch["labels"][r], batch["segment_ids"][r])
        runs, current = [], []
        for t, flag in enumerate(scored):
            if flag:
                current.append(int(batch["input_ids"][r, t]))
            elif current:
                runs.append(tokenizer.decode(current))
                current = []
        if current:
            runs.append(tokenizer.decode(current))
        out.append(runs)
    return out


def check_assistant_only(tokenizer, chat_file, end_of_turn: str):
    config = DataConfig.from_dict({"sources": [str(chat_file)], "mode": "sft", "shuffle": False})
    batch = next(make_data_iterator(config, tokenizer, global_batch_size=1, seq_len=1024, seed=0))
    n = int(np.isin(batch["segment_ids"][0], (1, 2)).sum())  # the stream repeats: keep the first two
    batch = {k: v[:, :n] for k, v in batch.items()}
    assert batch["segment_ids"][0, -1] == 2                # both conversations packed in one row
    labels = batch["labels"][0]
    trained = labels != -100
    np.testing.assert_array_equal(labels[trained], batch["input_ids"][0][trained])
    runs = trained_texts(tokenizer, batch)[0]
    assert runs == [f"The capital of France is Paris.{end_of_turn}",
                    f"hello world{end_of_turn}", f"The quick brown fox.{end_of_turn}"]


def test_only_assistant_tokens_are_trained_tiny_tokenizer(tmp_path, chat_file):
    tokenizer = load_tokenizer(build_tiny_tokenizer(tmp_path / "tok"))
    check_assistant_only(tokenizer, chat_file, "<|im_end|>\n")


def test_only_assistant_tokens_are_trained_smollm2(smollm2_hf_dir, chat_file):
    tokenizer = load_tokenizer(smollm2_hf_dir)
    check_assistant_only(tokenizer, chat_file, "<|im_end|>\n")
    # the rendered row is exactly the tokenizer's own chat-template tokenisation
    config = DataConfig.from_dict({"sources": [str(chat_file)], "mode": "sft", "shuffle": False, "packing": False})
    row = next(make_data_iterator(config, smollm2_hf_dir, 1, 256, seed=0))
    ids = row["input_ids"][0][row["segment_ids"][0] > 0]
    text = tokenizer.apply_chat_template(CONVERSATIONS[0], tokenize=False)
    assert ids.tolist() == tokenizer(text, add_special_tokens=False)["input_ids"]
    # SmolLM2's pre-training convention: no BOS, documents end with <|endoftext|>
    from jax_controlllm.data.tokenize import token_policy
    policy = token_policy(tokenizer, DataConfig.from_dict({"sources": ["x.jsonl"]}))
    assert policy.describe(tokenizer) == {"bos": None, "end": "<|endoftext|>", "pad": "<|im_end|>"}


def test_prompt_response_fields(tmp_path):
    tokenizer = load_tokenizer(build_tiny_tokenizer(tmp_path / "tok"))
    path = tmp_path / "pr.jsonl"
    path.write_text(json.dumps({"prompt": "hello", "response": "world"}) + "\n")
    config = DataConfig.from_dict({"sources": [str(path)], "mode": "sft", "packing": False})
    batch = next(make_data_iterator(config, tokenizer, 1, 64, seed=0))
    assert trained_texts(tokenizer, batch) == [["world<|im_end|>\n"]]


def test_sft_needs_a_chat_template(tmp_path, chat_file):
    plain = build_tiny_tokenizer(tmp_path / "plain", chat_template=False)
    config = DataConfig.from_dict({"sources": [str(chat_file)], "mode": "sft"})
    with pytest.raises(DataError, match="no chat template.*data.mode: pretrain"):
        make_data_iterator(config, plain, 1, 64, seed=0)


def test_long_conversations_are_truncated_and_counted(tmp_path, chat_file):
    tokenizer = load_tokenizer(build_tiny_tokenizer(tmp_path / "tok"))
    config = DataConfig.from_dict({"sources": [str(chat_file)], "mode": "sft", "shuffle": False})
    it = make_data_iterator(config, tokenizer, 1, 24, seed=0)
    batch = next(it)
    assert batch["segment_ids"][0].min() == 1 and it.stats["truncated_documents"] == 1
