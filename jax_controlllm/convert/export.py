"""A Hugging Face export with its tokenizer: the one path the CLI, ``make train`` and the Python API share.

Merge-back (a transform of the model) runs first when asked, then the serialiser writes the weights, then the
tokenizer files are written (``jax_controlllm.tokenizer.write_tokenizer``).
"""
from __future__ import annotations

from pathlib import Path
from typing import Optional

from jax_controlllm.config import ModelConfig
from jax_controlllm.convert.hf import save_hf
from jax_controlllm.convert.merge_back import save_merged_hf
from jax_controlllm.tokenizer import write_tokenizer


def export_hf(config: ModelConfig, params: dict, out_dir: str | Path, tokenizer: Optional[str | Path] = None,
              merge_back: bool = False, **save_options) -> dict:
    """``save_hf`` (or, with ``merge_back``, ``save_merged_hf``; see there for ``dtype``, ``expanded_from``,
    ...) plus the tokenizer of ``tokenizer`` (a Hugging Face directory, a .gguf file or "smollm2"; None:
    weights only). Returns the report, with the tokenizer files written under "tokenizer_files"."""
    save = save_merged_hf if merge_back else save_hf
    report = save(config, params, out_dir, **save_options)
    report["tokenizer_files"] = write_tokenizer(tokenizer, Path(out_dir)) if tokenizer is not None else []
    return report
