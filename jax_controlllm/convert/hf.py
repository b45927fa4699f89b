"""Hugging Face <-> our parameter trees: plain Llama and the Control LLM release's format (spec §5).

Our tree follows HF's names; the only differences are stacking of repeated blocks (for scan), Linear
weights stored as ``kernel[in, out]`` (HF: ``weight[out, in]``) and the embedding leaf name. So the mapping
is a walk over the per-block parameter specs: no q/k permutation, no special cases per tensor.
"""
from __future__ import annotations

import dataclasses
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Mapping, Optional

import jax
import jax.numpy as jnp
import numpy as np

from jax_controlllm.config import (
    ExpansionConfig,
    ModelConfig,
    from_dict,
    model_config_from_hf,
    model_config_to_hf,
    plain,
    to_dict,
)
from jax_controlllm.convert.safetensors_io import SafetensorsDir, SafetensorsError, save_file
from jax_controlllm.model.layout import layer_plan
from jax_controlllm.model.lora import merge_lora
from jax_controlllm.model.params import block_specs, param_specs, stack_blocks, unstack_blocks


class ConversionError(ValueError):
    pass


MERGED_MARKER = -2   # the release writes expansion.num_exp_layers = -2 into merged-back configs


SUPPORTED_ARCHITECTURES = ("LlamaForCausalLM", "CausalLMExpansion")
RELEASE_EXPANSION_KEYS = ("expand_type", "merge_method", "freezed_layers", "expanded_from", "num_ori_layers",
                          "num_exp_layers", "interpolation_factor", "interpolation_loss_alpha",
                          "interpolation_loss_type", "interpolation_norm_alpha", "freeze_interpolation_factor",
                          "freeze_ori_layers", "freeze_ori_non_layers")


# ----------------------------------------------------------------------------------------------
# Names: our tree paths <-> HF tensor names
# ----------------------------------------------------------------------------------------------

def _hf_leaf_name(path: tuple[str, ...]) -> tuple[str, bool]:
    """(HF name suffix, whether the array is transposed) for a path inside one block / the top level."""
    parts = [("gate_network.0" if p == "gate_network_0" else p) for p in path]
    transposed = parts[-1] == "kernel"
    if transposed:
        parts[-1] = "weight"
    return ".".join(parts), transposed


def _walk(tree: dict, prefix: tuple = ()):
    for key, value in tree.items():
        if isinstance(value, dict):
            yield from _walk(value, prefix + (key,))
        else:
            yield prefix + (key,), value


def _block_names(config: ModelConfig, index: int, block) -> list[tuple[tuple, str, bool]]:
    return [(path, f"model.layers.{index}.{name}", t)
            for path, _ in _walk(block_specs(config, block))
            for name, t in [_hf_leaf_name(path)]]


def _top_level_names(config: ModelConfig) -> list[tuple[tuple, str, bool]]:
    names = [(("embed_tokens", "embedding"), "model.embed_tokens.weight", False),
             (("norm", "weight"), "model.norm.weight", False)]
    if not config.tie_word_embeddings:
        names.append((("lm_head", "kernel"), "lm_head.weight", True))
    return names


def _get(tree: dict, path: tuple):
    for p in path:
        tree = tree[p]
    return tree


def _set(tree: dict, path: tuple, value) -> None:
    for p in path[:-1]:
        tree = tree.setdefault(p, {})
    tree[path[-1]] = value


def to_hf_tensors(config: ModelConfig, tree: dict) -> dict[str, np.ndarray]:
    """Any params-shaped tree (params, gradients, optimizer moments) -> {HF name: np.ndarray [out, in]}."""
    out = {}
    for path, name, transposed in _top_level_names(config):
        x = np.asarray(_get(tree, path))
        out[name] = x.T if transposed else x
    for index, (block, params) in enumerate(zip(layer_plan(config), unstack_blocks(config, tree))):
        for path, name, transposed in _block_names(config, index, block):
            x = np.asarray(_get(params, path))
            out[name] = x.T if transposed else x
    return out


def _fetch(tensors: Mapping, name: str, shape: tuple, transposed: bool, where: str) -> np.ndarray:
    if name not in tensors:
        raise ConversionError(f"tensor {name!r} is missing from {where}")
    x = tensors[name]
    expected = tuple(reversed(shape)) if transposed else tuple(shape)
    if tuple(x.shape) != expected:
        raise ConversionError(f"tensor {name!r} in {where}: expected shape {expected}, found {tuple(x.shape)}")
    return np.asarray(x).T if transposed else np.asarray(x)


def from_hf_tensors(config: ModelConfig, tensors: Mapping, as_numpy: bool = False, where: str = "the tensors",
                    strict: bool = True) -> dict:
    """{HF name: array} -> our params tree (leaf dtypes as declared by ``param_specs``)."""
    specs = param_specs(config)
    where_of = getattr(tensors, "file_of", lambda name: where)
    tree: dict = {}
    used = set()
    for path, name, transposed in _top_level_names(config):
        spec = _get(specs, path)
        _set(tree, path, _fetch(tensors, name, spec.shape, transposed, where_of(name)).astype(spec.dtype))
        used.add(name)
    blocks = []
    for index, block in enumerate(layer_plan(config)):
        bspecs = block_specs(config, block)
        params: dict = {}
        for path, name, transposed in _block_names(config, index, block):
            spec = _get(bspecs, path)
            dtype = np.dtype(jnp.dtype(spec.dtype))
            _set(params, path, _fetch(tensors, name, spec.shape, transposed, where_of(name)).astype(dtype))
            used.add(name)
        blocks.append(params)
    tree["layers"] = stack_blocks(config, blocks, np_module=np)
    if strict:
        extra = sorted(set(tensors) - used - {"model.rotary_emb.inv_freq"}
                       - ({"lm_head.weight"} if config.tie_word_embeddings else set()))
        if extra:
            raise ConversionError(f"{len(extra)} tensors in {where} are not part of this model "
                                  f"(first: {extra[:3]}); is the config right?")
    if as_numpy:
        return tree
    return jax.tree.map(jnp.asarray, tree)


# ----------------------------------------------------------------------------------------------
# Configs
# ----------------------------------------------------------------------------------------------

def config_from_hf_dict(hf: dict, where: str = "config.json") -> ModelConfig:
    archs = hf.get("architectures") or ["LlamaForCausalLM"]
    model_type = hf.get("model_type", "llama")
    if model_type not in ("llama", "causallmexpansion") or not set(archs) & set(SUPPORTED_ARCHITECTURES):
        raise ConversionError(f"{where}: unsupported architecture {archs} (model_type {model_type!r}); supported: "
                              f"{', '.join(SUPPORTED_ARCHITECTURES)} (model_type llama or causallmexpansion)")
    config = model_config_from_hf(hf)
    exp = hf.get("expansion")
    if exp and exp.get("num_exp_layers") == MERGED_MARKER:
        exp = None  # merged back into a plain Llama: the dict is provenance only
    if exp:
        known = {f.name for f in dataclasses.fields(ExpansionConfig)}
        ours = hf.get("jax_controlllm_expansion") or {}
        fields = {k: v for k, v in {**exp, **ours}.items() if k in known}
        config = dataclasses.replace(config, expansion=from_dict(ExpansionConfig, fields, "expansion"))
    config.validate()
    return config


def config_to_hf_dict(config: ModelConfig, expanded_from: Optional[str] = None) -> dict:
    hf = model_config_to_hf(config)
    exp = config.expansion
    if exp is None:
        return hf
    plan = layer_plan(config)
    release = to_dict(exp)
    release = {k: release[k] for k in RELEASE_EXPANSION_KEYS if k in release}
    release["freezed_layers"] = [i for i, b in enumerate(plan) if b.kind == "llama" and not b.trainable]
    release["expanded_from"] = expanded_from or ""
    # The release's format names it; here the embeddings, final norm and LM head of an expanded model are always
    # frozen, so it is no setting of ours (an imported config's value is ignored).
    release["freeze_ori_non_layers"] = True
    hf["expansion"] = release
    hf["jax_controlllm_expansion"] = {"layers": plain(exp.layers), "divergence_mask": exp.divergence_mask}
    if any(b.kind == "controlled" for b in plan):
        hf.update(model_type="causallmexpansion", architectures=["CausalLMExpansion"])
    return hf


# ----------------------------------------------------------------------------------------------
# Directories
# ----------------------------------------------------------------------------------------------

def load_hf(path: str | Path, dtype: Optional[str] = None, allow_pickle: bool = False, as_numpy: bool = False,
            **policy) -> tuple[ModelConfig, dict]:
    """Read a Hugging Face Llama or Control LLM directory (single or sharded safetensors), tensor by tensor.

    ``dtype`` sets all three dtype policies at once (e.g. "float32" for tests); ``policy`` may set
    param_dtype / frozen_dtype / compute_dtype / remat / attention_impl individually.
    """
    path = Path(path)
    if not path.is_dir():
        raise ConversionError(f"{path}: not a directory; expected a Hugging Face model directory with config.json")
    cfg_file = path / "config.json"
    if not cfg_file.is_file():
        raise ConversionError(f"{path}: config.json is missing")
    config = config_from_hf_dict(json.loads(cfg_file.read_text()), str(cfg_file))
    if dtype is not None:
        policy = {"param_dtype": dtype, "frozen_dtype": dtype, "compute_dtype": dtype, **policy}
    config = dataclasses.replace(config, **policy)
    config.validate()
    try:
        tensors = SafetensorsDir(path)
    except SafetensorsError as err:
        if any(path.glob("*.bin")) and not allow_pickle:
            raise ConversionError(f"{path}: only pickled .bin weights found; they can execute code when loaded. "
                                  "Convert them to safetensors, or pass allow_pickle=True if you trust the source"
                                  ) from None
        if any(path.glob("*.bin")):
            tensors = _load_pickled(path)
        else:
            raise ConversionError(str(err)) from None
    return config, from_hf_tensors(config, tensors, as_numpy=as_numpy, where=str(path))


def _load_pickled(path: Path) -> dict:
    import torch  # only on explicit opt-in

    tensors = {}
    for f in sorted(path.glob("*.bin")):
        for name, t in torch.load(f, map_location="cpu", weights_only=True).items():
            tensors[name] = t.float().numpy()
    return tensors


def _atomic_dir(out_dir: Path):
    """A temporary sibling directory that replaces ``out_dir`` only once complete, with the permissions of any
    new directory (mkdtemp makes it 0700: the export would be unreadable to other users)."""
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.tmp-", dir=out_dir.parent))
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o777 & ~umask)
    return tmp


def commit_dir(tmp: Path, out_dir: Path) -> None:
    if out_dir.exists():
        backup = out_dir.with_name(f".{out_dir.name}.old")
        shutil.rmtree(backup, ignore_errors=True)
        os.replace(out_dir, backup)
        os.replace(tmp, out_dir)
        shutil.rmtree(backup, ignore_errors=True)
    else:
        os.replace(tmp, out_dir)


def write_hf_dir(hf_config: dict, tensors: dict[str, np.ndarray], out_dir: str | Path,
                 max_shard_bytes: int = 4 * 1024 ** 3, extra_files: Optional[dict] = None) -> Path:
    """Write config.json + safetensors (sharded with an index when large) atomically."""
    out_dir = Path(out_dir)
    tmp = _atomic_dir(out_dir)
    try:
        shards, current, size = [], {}, 0
        for name in sorted(tensors):
            nbytes = tensors[name].nbytes
            if current and size + nbytes > max_shard_bytes:
                shards.append(current)
                current, size = {}, 0
            current[name] = tensors[name]
            size += nbytes
        shards.append(current)
        if len(shards) == 1:
            save_file(shards[0], tmp / "model.safetensors", {"format": "pt"})
        else:
            weight_map = {}
            for k, shard in enumerate(shards):
                fname = f"model-{k + 1:05d}-of-{len(shards):05d}.safetensors"
                save_file(shard, tmp / fname, {"format": "pt"})
                weight_map.update({name: fname for name in shard})
            total = sum(t.nbytes for t in tensors.values())
            (tmp / "model.safetensors.index.json").write_text(
                json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))
        (tmp / "config.json").write_text(json.dumps(hf_config, indent=2, sort_keys=True))
        for fname, content in (extra_files or {}).items():
            (tmp / fname).parent.mkdir(parents=True, exist_ok=True)
            (tmp / fname).write_text(content if isinstance(content, str) else json.dumps(content, indent=2))
        commit_dir(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out_dir


BASE_CONFIG_DIR = "base_config"  # inside a release-format export: the plain base's config.json


def base_hf_config(config: ModelConfig) -> dict:
    """config.json of the plain Llama that ``config`` was expanded from."""
    base = dataclasses.replace(config, expansion=None, trainable_layers=None,
                               num_hidden_layers=config.expansion.num_ori_layers or config.num_hidden_layers)
    return model_config_to_hf(base)


def save_hf(config: ModelConfig, params: dict, out_dir: str | Path, dtype: Optional[str] = None,
            max_shard_bytes: int = 4 * 1024 ** 3, expanded_from: Optional[str] = None) -> dict:
    """Write ``params`` as a Hugging Face directory. Plain models: LlamaForCausalLM. Expanded models: the
    release's CausalLMExpansion format (to fold them into a plain Llama, see ``merge_back.save_merged_hf``).
    LoRA models: their adapters merged into the kernels first, a plain Llama (the report says so).
    ``expanded_from`` is what the release's loader passes to ``AutoConfig.from_pretrained`` (a hub id or a
    directory). By default the export carries the base's config in ``base_config/`` and names that directory
    by its absolute path, so the export loads offline from any working directory (until it is moved)."""
    merged: dict = {}
    if config.lora is not None:
        merged["lora_merged"] = to_dict(config.lora)
        config, params = merge_lora(config, params)
    report = save_hf_tensors(config, to_hf_tensors(config, params), out_dir, dtype, max_shard_bytes, expanded_from)
    return {**report, **merged}


def save_hf_tensors(config: ModelConfig, tensors: Mapping[str, np.ndarray], out_dir: str | Path,
                    dtype: Optional[str] = None, max_shard_bytes: int = 4 * 1024 ** 3,
                    expanded_from: Optional[str] = None, expansion_provenance: Optional[dict] = None) -> dict:
    """Serialise HF-named ``tensors`` of ``config`` (cast to ``dtype``) with their config.json, atomically.
    ``expansion_provenance`` replaces config.json's expansion entry (a merged-back model records where it came
    from). Returns {"out_dir": ...}."""
    report: dict = {"out_dir": str(out_dir)}
    if dtype is not None:
        tensors = {k: v.astype(jnp.dtype(dtype)) for k, v in tensors.items()}
    extra = {"generation_config.json": {"bos_token_id": config.bos_token_id, "eos_token_id": config.eos_token_id}}
    if config.expansion is not None and not expanded_from:
        extra[f"{BASE_CONFIG_DIR}/config.json"] = base_hf_config(config)
        expanded_from = str(Path(out_dir).resolve() / BASE_CONFIG_DIR)
    hf = config_to_hf_dict(config, expanded_from)
    if expansion_provenance is not None:
        hf["expansion"] = expansion_provenance
    hf["torch_dtype"] = str(np.dtype(jnp.dtype(dtype)) if dtype else next(iter(tensors.values())).dtype)
    if hf["torch_dtype"] not in ("float32", "float16", "bfloat16"):
        hf["torch_dtype"] = "float32"
    write_hf_dir(hf, tensors, out_dir, max_shard_bytes, extra_files=extra)
    return report
