"""Where the checkpoints of an evolution study come from: Hugging Face directories, our Orbax runs
(every saved step of a run directory, a single step directory or an export), a GGUF file or ``smollm2``
(a base model), or (config, params) pairs.
Checkpoints are loaded lazily, one at a time, so a long series never holds more than one model."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable

from jax_controlllm.config import ConfigError


@dataclass
class CheckpointRef:
    name: str
    load: Callable[[], tuple]        # () -> (ModelConfig, params)
    source: str = ""                 # the resolved path (or "smollm2") it loads from; "" for in-memory models


def _hf_ref(path: Path, dtype: str) -> CheckpointRef:
    def load():
        from jax_controlllm.convert import load_hf
        return load_hf(path, dtype=dtype)
    return CheckpointRef(path.name, load, str(path.resolve()))


def _orbax_ref(path: Path, name: str) -> CheckpointRef:
    def load():
        from jax_controlllm.checkpoint import load_model
        return load_model(path)
    return CheckpointRef(name, load, str(path.resolve()))


def _orbax_steps(path: Path) -> list[Path]:
    """The step directories of an Orbax run directory (RUN/checkpoints/<step>/), oldest first."""
    root = path / "checkpoints" if (path / "checkpoints").is_dir() else path
    steps = sorted((int(c.name), c) for c in root.iterdir() if c.is_dir() and c.name.isdigit())
    return [c for _, c in steps]


def checkpoint_refs(items: Iterable, dtype: str = "float32") -> list[CheckpointRef]:
    """Each item: a path (HF dir; Orbax run dir -> one ref per saved step; Orbax step dir or export), a
    (config, params) pair, a (name, config, params) triple, or a CheckpointRef."""
    refs = []
    for i, item in enumerate(items):
        if isinstance(item, CheckpointRef):
            refs.append(item)
        elif isinstance(item, tuple) and len(item) == 2:
            refs.append(CheckpointRef(f"checkpoint_{i}", lambda item=item: item))
        elif isinstance(item, tuple) and len(item) == 3:
            refs.append(CheckpointRef(str(item[0]), lambda item=item: item[1:]))
        else:
            refs.extend(_path_refs(Path(item), dtype))
    if not refs:
        raise ConfigError("checkpoints: none given; pass Hugging Face directories, Orbax run directories or "
                          "(config, params) pairs")
    return refs


def _base_ref(source: str, dtype: str) -> CheckpointRef:
    """A GGUF file or ``smollm2`` (the bundled base model): the start of a continual pre-training run."""
    def load():
        from jax_controlllm.convert.auto import load_pretrained
        return load_pretrained(source, format="smollm2" if source == "smollm2" else "gguf", dtype=dtype)
    if source == "smollm2":
        return CheckpointRef("base", load, source)
    return CheckpointRef(Path(source).stem, load, str(Path(source).resolve()))


def _path_refs(path: Path, dtype: str) -> list[CheckpointRef]:
    if str(path) == "smollm2" or (path.suffix == ".gguf" and path.is_file()):
        return [_base_ref(str(path), dtype)]
    if not path.exists():
        raise ConfigError(f"checkpoint {path} does not exist")
    if (path / "config.json").is_file() and any(path.glob("*.safetensors")):
        return [_hf_ref(path, dtype)]
    if (path / "model_config.json").is_file() or (path / "model_config").is_dir():
        return [_orbax_ref(path, path.name)]                     # an export or a single step
    steps = _orbax_steps(path)
    if steps:
        return [_orbax_ref(step, f"step_{step.name}") for step in steps]
    raise ConfigError(f"checkpoint {path}: not a Hugging Face directory (config.json + *.safetensors) nor one "
                      f"of our Orbax checkpoints (a run directory with checkpoints/<step>/, a step directory, "
                      f"or an export with model_config.json)")
