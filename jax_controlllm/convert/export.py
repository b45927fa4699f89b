"""A Hugging Face export with its tokenizer: the one path the CLI, ``make train`` and the Python API share.

The tokenizer files come from a Hugging Face directory (copied) or a GGUF file / ``"smollm2"`` (built from
its metadata). ``tokenizer_config.json`` always names the model's inputs (``input_ids``, ``attention_mask``),
so that ``model.generate(**tokenizer(text, return_tensors="pt"))`` works in transformers 4.49 and 5.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

from jax_controlllm.config import ModelConfig
from jax_controlllm.convert.gguf import (
    MODEL_INPUT_NAMES,
    gguf_tokenizer_files,
    smollm2_gguf_path,
)
from jax_controlllm.convert.hf import save_hf

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model",
                   "vocab.json", "merges.txt", "added_tokens.json", "chat_template.jinja")


def copy_tokenizer(source: str | Path, out: Path) -> list[str]:
    """Write the tokenizer of ``source`` (a directory, a .gguf file or 'smollm2') into ``out``; returns the
    file names written."""
    out = Path(out)
    if str(source) == "smollm2" or str(source).endswith(".gguf"):
        files = gguf_tokenizer_files(smollm2_gguf_path() if str(source) == "smollm2" else source)
        for name, text in files.items():
            (out / name).write_text(text, encoding="utf-8")
        written = sorted(files)
    else:
        written = [name for name in TOKENIZER_FILES if (Path(source) / name).is_file()]
        for name in written:
            shutil.copyfile(Path(source) / name, out / name)
    if "tokenizer_config.json" in written:
        name_model_inputs(out / "tokenizer_config.json")
    return written


def name_model_inputs(tokenizer_config: Path) -> None:
    """Add ``model_input_names`` to a tokenizer_config.json that lacks it."""
    config = json.loads(tokenizer_config.read_text(encoding="utf-8"))
    if "model_input_names" not in config:
        config["model_input_names"] = list(MODEL_INPUT_NAMES)
        tokenizer_config.write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


def export_hf(config: ModelConfig, params: dict, out_dir: str | Path, tokenizer: str | Path | None = None,
              **save_options) -> dict:
    """``save_hf`` (see there for ``dtype``, ``merge_back``, ``expanded_from``, ...) plus the tokenizer of
    ``tokenizer`` (a Hugging Face directory, a .gguf file or "smollm2"; None: weights only). Returns the
    report, with the tokenizer files written under "tokenizer_files"."""
    report = save_hf(config, params, out_dir, **save_options)
    report["tokenizer_files"] = copy_tokenizer(tokenizer, Path(out_dir)) if tokenizer is not None else []
    return report
