"""python -m launch.data: prepare a TFDS dataset from local files, then inspect what training sees."""
import json

import pytest

from jax_controlllm.data.testing import build_tiny_tokenizer
from launch.data import main


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli")
    tokenizer = build_tiny_tokenizer(root / "tok")
    chats = [{"messages": [{"role": "user", "content": f"question {i}"},
                           {"role": "assistant", "content": f"answer {i}"}]} for i in range(12)]
    (root / "chat.jsonl").write_text("".join(json.dumps(c) + "\n" for c in chats))
    return root, tokenizer


def test_prepare_then_inspect_a_run_config(setup, capsys):
    root, tokenizer = setup
    assert main(["prepare", "--input", str(root / "chat.jsonl"), "--name", "toy_chat",
                 "--data-dir", str(root / "tfds"), "--eval-fraction", "0.25"]) == 0
    summary = capsys.readouterr().out
    assert '"written": 9' in summary and '"written": 3' in summary
    run = root / "run.yaml"
    run.write_text(f"train: {{batch_size: 2, seq_len: 48}}\n"
                   f"data:\n  mode: sft\n  tokenizer: {tokenizer}\n"
                   f"  sources: [{{name: toy_chat, data_dir: {root / 'tfds'}}}]\n  eval_split: validation\n")
    assert main(["inspect", "--config", str(run), "--n", "2", "--split", "eval"]) == 0
    out = capsys.readouterr().out
    assert out.count("=== row") == 2
    assert "⟦<|im_start|>user\nquestion 3<|im_end|>\n<|im_start|>assistant\n⟧answer 3<|im_end|>" in out
    assert "fill ratio:" in out and "documents per row:" in out


def test_inspect_reports_config_errors(setup, capsys):
    root, tokenizer = setup
    bad = root / "bad.yaml"
    bad.write_text(f"sources: [{root / 'chat.jsonl'}]\nmode: sft\ntokenizer: {tokenizer}\npackng: false\n")
    assert main(["inspect", "--config", str(bad)]) == 2
    assert "did you mean 'packing'" in capsys.readouterr().err
