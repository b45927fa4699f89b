"""The one home of tokenizers: where a model's tokenizer comes from, loading it, and the special ids.

A tokenizer source is a Hugging Face tokenizer directory, a ``.gguf`` file (its tokenizer is rebuilt from
the metadata), ``"smollm2"`` (the bundled GGUF) or an already loaded tokenizer. Nothing is ever downloaded.
Data, training, generation, evaluation and conversion all load tokenizers here.
"""
from __future__ import annotations

import json
import os
import tempfile
import warnings
from pathlib import Path
from typing import Any, Optional

import jax_controlllm.convert.gguf as gguf
from jax_controlllm.config import ModelConfig, RunConfig
from jax_controlllm.convert.auto import detect_format
from jax_controlllm.files import copy_file_atomic, write_text_atomic

# the files of a Hugging Face tokenizer that an export copies
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model",
                   "vocab.json", "merges.txt", "added_tokens.json", "chat_template.jinja")
SMOLLM2 = "smollm2"


class TokenizerError(ValueError):
    """No tokenizer where one was asked for; the message names the source and how to give one."""


# ----------------------------------------------------------------------------------------------
# Where a tokenizer comes from
# ----------------------------------------------------------------------------------------------

def is_gguf_source(source: Any) -> bool:
    """A ``.gguf`` file or ``"smollm2"``: the tokenizer is rebuilt from GGUF metadata."""
    return str(source) == SMOLLM2 or str(source).endswith(".gguf")


def gguf_file(source: Any) -> Path:
    """The GGUF file of a GGUF source (``"smollm2"``: the bundled one)."""
    return gguf.smollm2_gguf_path() if str(source) == SMOLLM2 else Path(source)


def has_tokenizer(folder: Path) -> bool:
    """A directory holding a Hugging Face tokenizer (tokenizer.json or a sentencepiece tokenizer.model)."""
    return folder.is_dir() and any((folder / f).is_file() for f in ("tokenizer.json", "tokenizer.model"))


def find_tokenizer_dir(model_path: str | Path) -> Optional[Path]:
    """A tokenizer saved with (or beside) a model or checkpoint: the directory itself, its ``tokenizer/``
    subdirectory, or the same in its parent and grandparent (a run directory holding ``checkpoints/N``)."""
    path = Path(model_path)
    for folder in (path, *list(path.parents)[:2]):
        for candidate in (folder, folder / "tokenizer"):
            if has_tokenizer(candidate):
                return candidate
    return None


def tokenizer_of_run(path: str | Path):
    """For a training run (or one of its checkpoints) whose base model has the tokenizer: the run's
    ``config.yaml`` names it as data.tokenizer or base.path."""
    import yaml
    path = Path(path)
    for folder in (path, *list(path.parents)[:2]):
        if (folder / "config.yaml").is_file():
            run = yaml.safe_load((folder / "config.yaml").read_text(encoding="utf-8")) or {}
            base = (run.get("base") or {}).get("path")
            source = (run.get("data") or {}).get("tokenizer") or base
            if source and (is_gguf_source(source) or has_tokenizer(Path(source))):
                return source
    return None


def tokenizer_source_for(model: str | Path, tokenizer: Optional[str | Path] = None):
    """Where the tokenizer for ``model`` comes from: an explicit source, the GGUF file / HF directory itself,
    or a tokenizer saved beside one of our checkpoints."""
    if tokenizer is not None:
        return tokenizer
    if is_gguf_source(model):
        return model
    found = find_tokenizer_dir(model) or tokenizer_of_run(model)
    if found is None:
        raise TokenizerError(f"no tokenizer found in or beside {model}; pass --tokenizer (tokenizer=) with a "
                             "Hugging Face model directory, a .gguf file or 'smollm2'")
    return found


def run_tokenizer_source(run: RunConfig, run_dir: Optional[Path]):
    """The tokenizer of a training run's real data: data.tokenizer, else the base model's (an HF directory as
    is; a GGUF's written once into ``run_dir/tokenizer``). None for synthetic data or when there is none."""
    data = run.data
    if data.synthetic or data.tokenizer:
        return data.tokenizer
    path, fmt = run.base.path, run.base.format
    if path is None:
        return None
    kind = detect_format(path) if fmt == "auto" else fmt
    if kind == "hf":
        return path
    if kind in ("gguf", SMOLLM2) and run_dir is not None:
        out_dir = Path(run_dir) / "tokenizer"
        if not (out_dir / "tokenizer.json").is_file():     # every process may get here: each writes aside
            write_tokenizer(path if kind == "gguf" else SMOLLM2, out_dir)
        return out_dir
    return None


# ----------------------------------------------------------------------------------------------
# Tokenizer files
# ----------------------------------------------------------------------------------------------

def write_tokenizer(source, out_dir: Path) -> list[str]:
    """Write the tokenizer files of ``source`` (a directory, a .gguf file or 'smollm2') into ``out_dir``;
    each file is written whole or not at all (``jax_controlllm.files``), so concurrent writers (one per process)
    never leave half a file. ``tokenizer_config.json`` always names the model's inputs (``model_input_names``)
    and a class both transformers 4.49 and 5 know, so that ``model.generate(**tokenizer(text,
    return_tensors="pt"))`` works in both (``make_portable``).
    Returns the names written."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    if is_gguf_source(source):
        path = gguf_file(source)
        if not path.is_file():
            raise TokenizerError(f"tokenizer source {path} does not exist")
        files = gguf.gguf_tokenizer_files(path)
        for name, text in files.items():
            write_text_atomic(out_dir / name, text)
        return sorted(files)
    source = Path(source)
    fast = (source / "tokenizer.json").is_file()
    written = [name for name in TOKENIZER_FILES if (source / name).is_file()]
    for name in written:
        edit = (lambda tmp: make_portable(tmp, fast=fast)) if name == "tokenizer_config.json" else None
        copy_file_atomic(source / name, out_dir / name, edit)
    return written


def make_portable(tokenizer_config: Path, fast: bool) -> None:
    """Make a tokenizer_config.json load in transformers 4.49 and 5 alike: add ``model_input_names`` where it
    lacks them (GGUF-built ones have them), and for a fast tokenizer (``fast``: a tokenizer.json beside it) name
    transformers 5's generic class TokenizersBackend, which 4.49 lacks, by its alias PreTrainedTokenizerFast
    (the same generic fast class in 4.49)."""
    config = json.loads(tokenizer_config.read_text(encoding="utf-8"))
    portable = {**config, "model_input_names": config.get("model_input_names") or list(gguf.MODEL_INPUT_NAMES)}
    if fast and portable.get("tokenizer_class") == "TokenizersBackend":
        portable["tokenizer_class"] = "PreTrainedTokenizerFast"
    if portable != config:
        tokenizer_config.write_text(json.dumps(portable, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


# ----------------------------------------------------------------------------------------------
# Loading
# ----------------------------------------------------------------------------------------------

def load_tokenizer(source: Any):
    """A Hugging Face tokenizer from a tokenizer directory, a .gguf file or ``"smollm2"``; an already loaded
    tokenizer is passed through as is. Never downloads."""
    if source is None:
        raise TokenizerError("no tokenizer: pass a tokenizer (or its directory) or set data.tokenizer to a local "
                             "Hugging Face tokenizer directory (the GGUF import writes one next to the weights)")
    if not isinstance(source, (str, os.PathLike)):
        return source
    if is_gguf_source(source):
        folder = Path(tempfile.mkdtemp(prefix="jcl-tokenizer-"))
        write_tokenizer(source, folder)
        return auto_tokenizer(folder)
    folder = Path(os.path.expanduser(str(source)))
    if not folder.is_dir():
        raise TokenizerError(f"tokenizer directory {folder} does not exist; point data.tokenizer (or --tokenizer) "
                             f"at a local Hugging Face tokenizer directory (tokenizer.json + "
                             f"tokenizer_config.json), a .gguf file or 'smollm2'. Nothing is downloaded at run time")
    if not has_tokenizer(folder):
        raise TokenizerError(f"{folder} has no tokenizer (tokenizer.json or tokenizer.model); give a Hugging Face "
                             "model directory, a .gguf file or 'smollm2'")
    try:
        return auto_tokenizer(folder)
    except (OSError, ValueError) as err:
        raise TokenizerError(f"cannot load a tokenizer from {folder}: {err}") from None


def auto_tokenizer(folder: Path):
    """AutoTokenizer from a local directory, quietly: it also reads config.json and warns about model types
    it does not know (our release-format exports say causallmexpansion)."""
    from transformers import AutoTokenizer
    from transformers.utils import logging as hf_logging

    level = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)
            return AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
    finally:
        hf_logging.set_verbosity(level)


# ----------------------------------------------------------------------------------------------
# Text to ids, special ids
# ----------------------------------------------------------------------------------------------

def chat_prompt(tokenizer, user: str, system: Optional[str] = None) -> str:
    """The tokenizer's chat template applied to one user turn, ready for the assistant's reply."""
    if not getattr(tokenizer, "chat_template", None):
        raise TokenizerError("the tokenizer has no chat template (a base model?); drop --chat / chat=True, "
                             "or use a tokenizer directory whose tokenizer_config.json has a chat_template")
    messages = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": user}]
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)


def encode(tokenizer, text: str, templated: bool = False) -> list[int]:
    """Token ids of ``text``. Plain text gets the tokenizer's own special tokens (e.g. BOS); a chat-templated
    string already spells them out, so none are added."""
    return list(tokenizer(text, add_special_tokens=not templated)["input_ids"])


def eos_ids_of(config: ModelConfig, tokenizer=None) -> tuple[int, ...]:
    """Every id that ends a generation: the model config's eos_token_id (int or list) and the tokenizer's."""
    ids = config.eos_token_id if isinstance(config.eos_token_id, (list, tuple)) else [config.eos_token_id]
    if tokenizer is not None and getattr(tokenizer, "eos_token_id", None) is not None:
        ids = list(ids) + [tokenizer.eos_token_id]
    return tuple(sorted({int(i) for i in ids if i is not None}))


def pad_id_of(config: ModelConfig, tokenizer=None) -> int:
    """The id that pads rows: the tokenizer's pad token, else the config's, else an EOS id, else 0 (only ids
    inside the model's vocabulary qualify)."""
    for candidate in (getattr(tokenizer, "pad_token_id", None), config.pad_token_id, *eos_ids_of(config), 0):
        if candidate is not None and 0 <= int(candidate) < config.vocab_size:
            return int(candidate)
    return 0
