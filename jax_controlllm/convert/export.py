"""A Hugging Face export with its tokenizer: the one path the CLI, ``make train`` and the Python API share.

The weights are written by ``save_hf``, then the tokenizer files by ``jax_controlllm.tokenizer.write_tokenizer``
(copied from a Hugging Face directory or built from a GGUF file / ``"smollm2"``; ``tokenizer_config.json``
always names the model's inputs).
"""
from __future__ import annotations

from pathlib import Path

from jax_controlllm.config import ModelConfig
from jax_controlllm.convert.hf import save_hf
from jax_controlllm.tokenizer import write_tokenizer


def export_hf(config: ModelConfig, params: dict, out_dir: str | Path, tokenizer: str | Path | None = None,
              **save_options) -> dict:
    """``save_hf`` (see there for ``dtype``, ``merge_back``, ``expanded_from``, ...) plus the tokenizer of
    ``tokenizer`` (a Hugging Face directory, a .gguf file or "smollm2"; None: weights only). Returns the
    report, with the tokenizer files written under "tokenizer_files"."""
    report = save_hf(config, params, out_dir, **save_options)
    report["tokenizer_files"] = write_tokenizer(tokenizer, Path(out_dir)) if tokenizer is not None else []
    return report
