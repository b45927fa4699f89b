"""Typed configuration: frozen dataclasses, YAML loading, dotted overrides and validation.

Every knob a user can set lives in one of the dataclasses below. ``load_config`` reads a YAML
file, applies ``--set a.b=c`` overrides and returns a validated ``RunConfig``, every section typed
(``data``, ``knowledge`` and ``report`` included). Unknown keys are errors that name the key and
suggest the closest valid one, because a silently ignored typo in a training config costs a TPU-day.

Configs are immutable: sections are frozen dataclasses, lists are tuples and mappings are ``FrozenDict``s
(coerced whatever the source: YAML, JSON, keyword arguments). A changed setting is a new config
(``dataclasses.replace``), and a ``ModelConfig`` is itself the static argument of compiled functions: equal
configs share compilations. ``to_dict`` gives plain lists and dicts again (YAML, JSON).
"""
from __future__ import annotations

import dataclasses
import difflib
import json
import math
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Union

import yaml


class ConfigError(ValueError):
    """A configuration value is missing, unknown or out of range; the message says which and how to fix it."""


# --------------------------------------------------------------------------------------------
# Immutable values: tuples for lists, FrozenDict for mappings
# --------------------------------------------------------------------------------------------

class FrozenDict(dict):
    """A read-only dict that hashes (a mapping field of a frozen config: ``model.rope_scaling``, ``mesh.rules``).
    Still a dict: ``json.dumps`` and ``dataclasses.asdict`` work as for any mapping."""

    def _read_only(self, *args, **kwargs):
        raise TypeError(f"{type(self).__name__} is read-only; build a new mapping (configs are immutable)")

    __setitem__ = __delitem__ = __ior__ = clear = pop = popitem = setdefault = update = _read_only

    def __hash__(self):
        return hash(frozenset(self.items()))

    def __reduce__(self):      # pickle and copy rebuild it whole instead of filling it item by item
        return (type(self), (dict(self),))

    def __repr__(self):
        return f"{type(self).__name__}({dict.__repr__(self)})"


def freeze(value):
    """``value`` with every list a tuple and every dict a FrozenDict, all the way down (hashable)."""
    if isinstance(value, dict):
        return value if _is_frozen(value) else FrozenDict({k: freeze(v) for k, v in value.items()})
    if isinstance(value, (list, tuple)):
        return value if _is_frozen(value) else tuple(freeze(v) for v in value)
    return value


def _is_frozen(value) -> bool:
    if isinstance(value, FrozenDict):
        return all(_is_frozen(v) for v in value.values())
    if isinstance(value, tuple):
        return all(_is_frozen(v) for v in value)
    return not isinstance(value, (list, dict))


def plain(value):
    """``value`` with tuples as lists and mappings as plain dicts, all the way down (YAML, JSON, comparisons
    with what was read back from either)."""
    if isinstance(value, dict):
        return {k: plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [plain(v) for v in value]
    return value


class Section:
    """Base of the config dataclasses (all ``frozen=True``): list and dict values given to the constructor become
    tuples and FrozenDicts, so every config is hashable and nothing in it can change after validation."""

    def __post_init__(self):
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            frozen = freeze(value)
            if frozen is not value:
                object.__setattr__(self, f.name, frozen)


# --------------------------------------------------------------------------------------------
# Model
# --------------------------------------------------------------------------------------------

POSITIVE_MODEL_FIELDS = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                        "num_key_value_heads", "head_dim", "max_position_embeddings")


MAX_LAYERS = 100_000      # far beyond any real model: a bound that keeps per-layer work at load time small

REMAT_POLICIES = ("none", "selective", "full", "save_dots", "save_dots_no_batch")
FROZEN_MATMULS = ("compute", "fp8", "fp8_backward")   # model.frozen_matmul (model/fp8.py)


@dataclass(frozen=True)
class ModelConfig(Section):
    """A Llama-family decoder, with Hugging Face field names so ``config.json`` maps 1:1, and the structure of the
    built model: which layers train, its expansion, its adapters. The config is the static argument of the
    compiled model functions (its frozen-dataclass hash and equality are the compilation key)."""
    vocab_size: int = 32000
    hidden_size: int = 4096
    intermediate_size: int = 11008
    num_hidden_layers: int = 32
    num_attention_heads: int = 32
    num_key_value_heads: Optional[int] = None      # None: same as num_attention_heads (MHA)
    head_dim: Optional[int] = None                 # None: hidden_size // num_attention_heads
    max_position_embeddings: int = 4096
    rms_norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    rope_scaling: Optional[FrozenDict] = None      # {"rope_type": "llama3"|"linear", ...}
    tie_word_embeddings: bool = False
    attention_bias: bool = False
    mlp_bias: bool = False
    hidden_act: str = "silu"
    bos_token_id: Optional[int] = 1
    eos_token_id: Union[int, tuple[int, ...], None] = 2   # int or list of ints (Llama 3 instruct)
    pad_token_id: Optional[int] = None
    # --- runtime policy (not part of HF config.json) ---
    param_dtype: str = "float32"                   # dtype of trainable (master) weights
    frozen_dtype: str = "float32"                  # dtype of frozen weights (bf16 for training)
    compute_dtype: str = "float32"                 # activations / matmul inputs
    remat: str = "none"                            # none | selective | full | save_dots | save_dots_no_batch
    attention_impl: str = "xla"                    # xla (masked softmax) | cudnn (fused, GPU)
    frozen_matmul: str = "compute"                 # compute (compute_dtype) | fp8 | fp8_backward: the frozen block
                                                   # weights' GEMMs in FP8, both or the input gradient only
                                                   # (model/fp8.py)
    scan_layers: bool = True
    loss_chunk: int = 0                            # sequence positions per LM-head + CE chunk (0: all at once);
                                                   # chunking keeps [B, S, V] float32 logits out of memory
    # --- the built model's structure. Training resolves these from the run's request (train.mode,
    # train.trainable_layers, the run's expansion and lora sections: jax_controlllm.train.setup); a checkpoint's
    # or export's model config records them ---
    # indices of the blocks that train (full / partial tuning); None = none (a frozen base; Control LLM trains
    # its expansion)
    trainable_layers: Optional[tuple[int, ...]] = None
    train_embeddings: bool = False                 # full tuning: embeddings, final norm, LM head
    expansion: Optional["ExpansionConfig"] = None  # the expansion this model was built with (num_ori_layers set)
    lora: Optional["LoraConfig"] = None            # low-rank adapters on a frozen plain model (train.mode lora)

    def __post_init__(self):
        super().__post_init__()
        if self.num_key_value_heads is None:
            object.__setattr__(self, "num_key_value_heads", self.num_attention_heads)
        if self.head_dim is None and self.num_attention_heads:   # 0 heads: validate() says so
            object.__setattr__(self, "head_dim", self.hidden_size // self.num_attention_heads)

    def validate(self) -> None:
        for name in POSITIVE_MODEL_FIELDS:
            _check(getattr(self, name) >= 1, f"model.{name}", f"must be at least 1, got {getattr(self, name)}")
        _check(self.num_hidden_layers <= MAX_LAYERS, "model.num_hidden_layers",
               f"{self.num_hidden_layers} layers is more than any model has (at most {MAX_LAYERS})")
        _check(self.hidden_act == "silu", "model.hidden_act",
               f"only 'silu' (SwiGLU) is supported, got {self.hidden_act!r}")
        eos = self.eos_token_id if isinstance(self.eos_token_id, tuple) else (self.eos_token_id,)
        _check(self.eos_token_id is None or all(isinstance(e, int) and not isinstance(e, bool) for e in eos),
               "model.eos_token_id", f"expected a token id or a list of them, got {_show(self.eos_token_id)}")
        _check(self.num_attention_heads % self.num_key_value_heads == 0, "model.num_key_value_heads",
               f"{self.num_attention_heads} attention heads are not a multiple of "
               f"{self.num_key_value_heads} key/value heads")
        rope_type = (self.rope_scaling or {}).get("rope_type", (self.rope_scaling or {}).get("type", "default"))
        _check(rope_type in ("default", "llama3", "linear"), "model.rope_scaling",
               f"rope_type {rope_type!r} is not supported; supported: default, llama3, linear")
        for name in ("param_dtype", "frozen_dtype", "compute_dtype"):
            _check(getattr(self, name) in ("float32", "bfloat16", "float16"), f"model.{name}",
                   f"{getattr(self, name)!r} is not one of float32, bfloat16, float16")
        _check(self.remat in REMAT_POLICIES, "model.remat",
               f"{self.remat!r} is not one of {', '.join(REMAT_POLICIES)}")
        _check(self.attention_impl in ("xla", "cudnn"), "model.attention_impl",
               f"{self.attention_impl!r} is not one of xla, cudnn")
        _check(self.frozen_matmul in FROZEN_MATMULS, "model.frozen_matmul",
               f"{self.frozen_matmul!r} is not one of {', '.join(FROZEN_MATMULS)}")
        if self.expansion is not None:
            self.expansion.validate(self)
        if self.lora is not None:
            _check(self.expansion is None, "lora",
                   "LoRA adapts a plain Llama but this model is expanded (Control LLM); train LoRA on the plain "
                   "base, or merge the expanded model first (launch.convert orbax-to-hf --merge-back)")
            self.lora.validate()


# --------------------------------------------------------------------------------------------
# Control LLM expansion (spec: shared/spec/controlllm.md)
# --------------------------------------------------------------------------------------------

EXPAND_TYPES = ("concat", "stack", "hybrid")
MERGE_METHODS = ("lerp", "dlerp", "dlerpin", "slerp", "moe", "proj", "prog")
LOSS_TYPES = ("mse", "cosine")


@dataclass(frozen=True)
class ExpansionConfig(Section):
    """How a plain Llama is expanded. Field names follow the release's ``expansion`` dict.

    ``RunConfig.expansion`` is the request (how to expand the base; ``layers`` may be ``auto``);
    ``ModelConfig.expansion`` is what a built model was expanded with (layers resolved, ``num_ori_layers`` set)."""
    expand_type: str = "concat"
    num_exp_layers: int = 8
    # explicit original-layer indices (overrides the rule), or "auto": chosen from the base's knowledge circuits
    # at setup
    layers: Optional[Union[tuple[int, ...], str]] = None
    merge_method: str = "dlerp"
    interpolation_factor: float = 0.0
    interpolation_loss_alpha: float = 1.0          # λ; 0 disables; -1 weights tokens by the gate
    interpolation_loss_type: str = "mse"
    interpolation_norm_alpha: float = 0.0          # relaxed norm in expanded layers: 0, (0,1], or -1
    freeze_interpolation_factor: bool = True
    freeze_ori_layers: bool = True
    divergence_mask: str = "tokens"                # tokens: non-padding only | reference: all tokens
    num_ori_layers: Optional[int] = None           # filled in by expand()

    def validate(self, model: Optional[ModelConfig] = None) -> None:
        _check(self.expand_type in EXPAND_TYPES, "expansion.expand_type",
               f"{self.expand_type!r} is not one of {', '.join(EXPAND_TYPES)}")
        _check(self.merge_method in MERGE_METHODS, "expansion.merge_method",
               f"{self.merge_method!r} is not one of {', '.join(MERGE_METHODS)}")
        _check(self.interpolation_loss_type in LOSS_TYPES, "expansion.interpolation_loss_type",
               f"{self.interpolation_loss_type!r} is not one of {', '.join(LOSS_TYPES)}")
        _check(self.divergence_mask in ("tokens", "reference"), "expansion.divergence_mask",
               f"{self.divergence_mask!r} is not one of tokens, reference")
        a = self.interpolation_norm_alpha
        _check(a == -1 or 0 <= a <= 1, "expansion.interpolation_norm_alpha",
               f"must be 0 (plain RMSNorm), in (0, 1] (fixed mix) or -1 (learnable), got {a}")
        _check(1 <= self.num_exp_layers <= MAX_LAYERS, "expansion.num_exp_layers",
               f"must be in 1..{MAX_LAYERS}, got {self.num_exp_layers}")
        if self.layers == "auto":
            return                                     # resolved at setup (jax_controlllm.circuits.layer_choice)
        _check(not isinstance(self.layers, str), "expansion.layers",
               f"expected a list of layer indices or auto, got {_show(self.layers)}")
        _check_int_list(self.layers, "expansion.layers")
        if model is not None:
            selected_layers(self, self.num_ori_layers or model.num_hidden_layers)


def selected_layers(expansion: ExpansionConfig, num_ori_layers: int) -> list[int]:
    """Original layers that get an expanded branch (spec §1), validated."""
    n = expansion.num_exp_layers
    if expansion.layers == "auto":
        raise ConfigError("expansion.layers: auto is chosen when a run starts (python -m launch.train); "
                          "to build a model directly, list the layers")
    if expansion.layers is not None:
        layers = sorted(int(i) for i in expansion.layers)
        bad = [i for i in layers if not 0 <= i < num_ori_layers]
        if bad:
            raise ConfigError(f"expansion.layers: indices {bad} are out of range for a model with "
                              f"{num_ori_layers} layers (valid: 0..{num_ori_layers - 1})")
        if len(set(layers)) != len(layers):
            raise ConfigError(f"expansion.layers: duplicate indices in {expansion.layers}")
        if not layers:
            raise ConfigError("expansion.layers: the list is empty")
        return layers
    if n > num_ori_layers:
        raise ConfigError(f"expansion.num_exp_layers: {n} is more than the model's {num_ori_layers} layers")
    split = max(num_ori_layers // n, 1)
    count = num_ori_layers // split       # the rule: layers split-1, 2*split-1, ... (counted, not listed: any depth)
    if count != n:
        raise ConfigError(
            f"expansion.num_exp_layers: the release's rule (every {split}-th layer) selects {count} "
            f"layers, not {n}, for {num_ori_layers} layers; choose a divisor of {num_ori_layers} or pass the "
            f"exact indices as expansion.layers, e.g. layers: {[(k + 1) * split - 1 for k in range(min(n, count))]}")
    return [(k + 1) * split - 1 for k in range(n)]


# --------------------------------------------------------------------------------------------
# LoRA (the baseline most users reach for): W x + (alpha / rank) B A dropout(x) on chosen projections
# --------------------------------------------------------------------------------------------

LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@dataclass(frozen=True)
class LoraConfig(Section):
    """Low-rank adapters on a frozen plain Llama (Hu et al. 2021; PEFT's conventions). The default targets every
    attention and MLP projection, not PEFT's q and v: LoRA is the baseline whose acquisition Control LLM is
    compared with, so it gets its strongest common setting (QLoRA needed all linear layers to match full tuning)."""
    rank: int = 16
    alpha: float = 32.0                            # the update is scaled by alpha / rank
    targets: tuple[str, ...] = LORA_TARGETS
    dropout: float = 0.0                           # on the adapter's input only, during training steps

    def validate(self) -> None:
        _check(self.rank >= 1, "lora.rank", f"must be at least 1, got {self.rank}")
        _check(self.alpha > 0, "lora.alpha", f"must be positive, got {self.alpha}")
        _check(0 <= self.dropout < 1, "lora.dropout", f"must be in [0, 1), got {self.dropout}")
        unknown = [t for t in self.targets if t not in LORA_TARGETS]
        _check(not unknown, "lora.targets", f"unknown projection(s) {_show(unknown)}; choose from "
                                            f"{', '.join(LORA_TARGETS)}")
        _check(bool(self.targets) and len(set(self.targets)) == len(self.targets), "lora.targets",
               f"expected a non-empty list of distinct projections, got {_show(self.targets)}")

    @property
    def scale(self) -> float:
        return self.alpha / self.rank


# --------------------------------------------------------------------------------------------
# Training, data, mesh, checkpoints
# --------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class TrainConfig(Section):
    mode: str = "controlllm"                       # controlllm | full | partial | lora
    steps: int = 100
    batch_size: int = 8                            # global batch (sequences per optimizer step)
    grad_accum: int = 1
    seq_len: int = 512
    lr: float = 5e-5
    min_lr: float = 1e-5
    warmup_steps: int = 1000
    weight_decay: float = 0.01
    adam_b1: float = 0.9
    adam_b2: float = 0.95
    adam_eps: float = 1e-8
    clip_grad_norm: float = 1.0
    # the λ schedule: the divergence term's weight is multiplied by 1 at the first step, by this at the last,
    # linearly in between (1: constant λ; 0: the pull towards the frozen layers fades out)
    divergence_scale_end: float = 1.0
    # weight of KL(base || model) of the next-token distributions on tokens without language-modelling targets
    # (the alignment text; Control LLM only: the base is the frozen pretrained branches); 0: off
    distill_weight: float = 0.0
    seed: int = 0
    log_every: int = 1
    eval_every: int = 0                            # 0: no periodic eval
    eval_batches: int = 4
    save_every: int = 0                            # 0: only at the end (and on SIGTERM)
    keep_last: int = 3
    keep_every: int = 0                            # additionally keep every K-th step (0: off)
    async_checkpoint: bool = True
    skip_nonfinite_steps: int = 0
    inject_nan_at_step: int = -1                   # testing aid: poison the loss at this step
    inject_sigterm_at_step: int = -1               # testing aid: send SIGTERM to itself after this step
    # partial mode, the request: indices of the base's layers to tune (resolved into the trained model's
    # ModelConfig.trainable_layers at setup)
    trainable_layers: Optional[tuple[int, ...]] = None
    peak_flops_per_device: float = 0.0             # for the MFU estimate; 0: from the device kind (none on CPU)
    prefetch: int = 2                              # batches prepared ahead in a background thread

    def validate(self) -> None:
        for name, least in TRAIN_MINIMUMS.items():
            value = getattr(self, name)
            _check(value >= least, f"train.{name}", f"must be at least {least}, got {value}")
        _check_int_list(self.trainable_layers, "train.trainable_layers")
        _check(math.isfinite(self.divergence_scale_end) and self.divergence_scale_end >= 0,
               "train.divergence_scale_end", f"must be a finite number >= 0, got {self.divergence_scale_end}")
        _check(math.isfinite(self.distill_weight) and self.distill_weight >= 0,
               "train.distill_weight", f"must be a finite number >= 0, got {self.distill_weight}")


# Integer train settings and their smallest valid value (0 where 0 means "off" or "none").
TRAIN_MINIMUMS = {"steps": 0, "batch_size": 1, "grad_accum": 1, "seq_len": 1, "warmup_steps": 0, "log_every": 1,
                  "eval_every": 0, "eval_batches": 0, "save_every": 0, "keep_last": 1, "keep_every": 0,
                  "skip_nonfinite_steps": 0, "prefetch": 0}


TRAIN_MODES = ("controlllm", "full", "partial", "lora")


@dataclass(frozen=True)
class MeshConfig(Section):
    shape: str = "1"                               # "4x8", "2x2x8", "-1x8"
    axes: Optional[tuple[str, ...]] = None         # names, default by rank (see sharding.py)
    rules: Optional[FrozenDict] = None             # logical axis -> mesh axis / list / null


@dataclass(frozen=True)
class BaseModelConfig(Section):
    """Where the starting weights come from: HF directory, GGUF file, Orbax checkpoint or fresh init."""
    path: Optional[str] = None                     # None: fresh random init from `model`
    format: str = "auto"                           # auto | hf | gguf | orbax | smollm2
    allow_pickle: bool = False


# --------------------------------------------------------------------------------------------
# Data (the pipeline: jax_controlllm.data; docs/data.md)
# --------------------------------------------------------------------------------------------

DATA_MODES = ("pretrain", "sft")
DATA_FORMATS = ("auto", "jsonl", "parquet", "text", "hf_disk", "tfds")
TEXT_UNITS = ("line", "file")
SHARD_BY = ("rows", "documents")
SYNTHETIC_KEYS = ("source", "min_doc_len", "max_doc_len", "tokenizer")   # tokenizer: the run's, for reports


@dataclass(frozen=True)
class SourceConfig(Section):
    """One dataset of the mixture: local files by glob, a ``save_to_disk`` directory, or a TFDS name."""
    path: Optional[str] = None           # glob of .jsonl/.parquet/.txt files, or a save_to_disk directory
    name: Optional[str] = None           # TFDS dataset name ("my_corpus", "my_corpus/config:1.0.0")
    format: str = "auto"                 # auto: tfds if `name`, else by file suffix / directory layout
    data_dir: Optional[str] = None       # TFDS data_dir holding the prepared array_record dataset
    split: str = "train"                 # split of TFDS / save_to_disk DatasetDict sources
    eval_split: Optional[str] = None     # held-out split of this source (overrides DataConfig.eval_split)
    weight: float = 1.0                  # relative sampling weight in the mixture
    lm_loss: bool = True                 # false: no next-token targets; the text still passes through the model,
                                         # so Control LLM's divergence (alignment) loss sees it
    text_unit: str = "line"              # plain-text files: one document per line, or per file
    text_field: Optional[str] = None     # per-source overrides of the DataConfig field names
    messages_field: Optional[str] = None

    def resolved_format(self) -> str:
        if self.format != "auto":
            return self.format
        if self.name is not None:
            return "tfds"
        path = (self.path or "").rstrip("/")
        for suffix, fmt in ((".jsonl", "jsonl"), (".parquet", "parquet"), (".txt", "text"), (".text", "text")):
            if path.endswith(suffix):
                return fmt
        return "hf_disk"   # a directory without a file suffix: Hugging Face `save_to_disk`

    def describe(self) -> str:
        return f"tfds:{self.name}" if self.name is not None else str(self.path)

    def validate(self, where: str) -> None:
        if (self.path is None) == (self.name is None):
            raise ConfigError(f"{where}: set exactly one of 'path' (local files or a save_to_disk "
                              f"directory) and 'name' (a TFDS dataset)")
        _one_of(self.format, DATA_FORMATS, f"{where}.format")
        _one_of(self.text_unit, TEXT_UNITS, f"{where}.text_unit")
        if self.path is not None and self.resolved_format() == "tfds":
            raise ConfigError(f"{where}: format tfds reads a dataset by 'name' (with 'data_dir'), not by 'path'")
        if self.path is not None and self.path.endswith(".gz"):
            raise ConfigError(f"{where}.path: compressed files are not supported; decompress "
                              f"{self.path!r} first (random access needs plain files)")
        if self.eval_split is not None and self.resolved_format() not in ("tfds", "hf_disk"):
            raise ConfigError(f"{where}.eval_split: only TFDS and save_to_disk sources have splits; hold out "
                              f"part of local files with data.holdout_fraction, or list them in data.eval_sources")
        if not self.weight > 0:
            raise ConfigError(f"{where}.weight: must be > 0, got {self.weight}")


@dataclass(frozen=True)
class DataConfig(Section):
    """What training reads: the data pipeline's settings (docs/data.md), or ``source: synthetic`` for generated
    tokens (tests, benchmarks, the no-download demo; then only ``min_doc_len``, ``max_doc_len`` and the run's
    ``tokenizer`` apply).

    A YAML example (a 3:1 mixture of local JSONL and a prepared TFDS dataset)::

        data:
          mode: pretrain
          tokenizer: runs/smollm2/hf
          sources:
            - {path: "corpus/*.jsonl", weight: 3}
            - {name: my_corpus, data_dir: ~/tensorflow_datasets, weight: 1}
          holdout_fraction: 0.01
    """
    sources: tuple[SourceConfig, ...] = ()           # a string is a path
    mode: str = "pretrain"                           # pretrain: text documents | sft: chat conversations
    packing: bool = True                             # pack several documents per row (segment ids)
    shuffle: bool = True                             # shuffle each source, reshuffled every epoch
    shard_by: str = "rows"                           # rows: global row stream | documents: per-process docs
    text_field: str = "text"
    messages_field: str = "messages"                 # SFT: list of {role, content}
    prompt_field: str = "prompt"                     # SFT without messages: a single prompt/response turn
    response_field: str = "response"
    tokenizer: Optional[str] = None                  # HF tokenizer directory (if not passed in code)
    add_bos: Optional[bool] = None                   # None: as the tokenizer does by default (model family)
    add_eos: Optional[bool] = None                   # None: pretrain ends each document, sft relies on the template
    doc_end_token: Optional[str] = None              # None: <|end_of_text|>, <|endoftext|> or the EOS token
    skip_bad_records: bool = False                   # skip and count malformed records instead of failing
    max_record_bytes: int = 16 * 1024 * 1024         # longer lines/records are bad records
    holdout_fraction: float = 0.0                    # eval = every round(1/f)-th record of sources without eval split
    eval_split: Optional[str] = None                 # eval split for TFDS / save_to_disk sources
    eval_sources: tuple[SourceConfig, ...] = ()      # separate eval data; overrides both
    tokenize_chunk: int = 128                        # documents tokenised per call (speed only)
    prefetch: int = 2                                # batches prepared ahead by a thread (0: none)
    source: Optional[str] = None                     # synthetic: generated tokens instead of the sources above
    min_doc_len: Optional[int] = None                # synthetic only: document lengths (None: 8 .. seq_len)
    max_doc_len: Optional[int] = None

    def __post_init__(self):
        super().__post_init__()
        for kind in ("sources", "eval_sources"):       # DataConfig(sources=["a.jsonl", {"path": ...}]) too
            items = getattr(self, kind)
            if not (isinstance(items, tuple) and all(isinstance(item, SourceConfig) for item in items)):
                object.__setattr__(self, kind, _sources_from(items, f"data.{kind}"))

    @classmethod
    def parse(cls, data: dict, where: str = "data") -> "DataConfig":
        """Typed from a plain mapping (sources parsed too); unknown keys raise ConfigError with a suggestion.
        Values are checked by ``check`` / ``validate``."""
        if not isinstance(data, dict):
            raise ConfigError(f"{where}: expected a mapping, got {type(data).__name__}")
        data = dict(data)
        if data.get("source") == "synthetic":
            names = {f.name for f in dataclasses.fields(cls)}
            unknown = sorted(str(k) for k in data if k not in names)
            if unknown:
                raise ConfigError(f"unknown config key '{where}.{unknown[0]}' for the synthetic source; "
                                  f"valid keys: {', '.join(SYNTHETIC_KEYS)}")
        for kind in ("sources", "eval_sources"):
            if kind in data:
                data[kind] = _sources_from(data[kind], f"{where}.{kind}")
        return from_dict(cls, data, where)

    @classmethod
    def from_dict(cls, data: dict, where: str = "data") -> "DataConfig":
        """Build and validate from a plain dict; unknown keys raise ConfigError with a suggestion."""
        config = cls.parse(data, where)
        config.validate(where)
        return config

    @property
    def synthetic(self) -> bool:
        return self.source == "synthetic"

    def check(self, where: str = "data") -> None:
        """Every value in range; sources may still be missing (a knowledge section supplies them at the start)."""
        if self.source is not None:
            _check(self.synthetic, f"{where}.source", f"{self.source!r} is not a data source; use synthetic for "
                                                      f"generated tokens, or remove it and list data.sources")
            default = DataConfig()
            unused = [f.name for f in dataclasses.fields(self) if f.name not in SYNTHETIC_KEYS
                      and getattr(self, f.name) != getattr(default, f.name)]
            if unused:
                raise ConfigError(f"unknown config key '{where}.{unused[0]}' for the synthetic source; "
                                  f"valid keys: {', '.join(SYNTHETIC_KEYS)}")
            return
        for name in ("min_doc_len", "max_doc_len"):
            _check(getattr(self, name) is None, f"{where}.{name}",
                   "only for source: synthetic (generated tokens); the lengths of real documents are their own")
        for kind in ("sources", "eval_sources"):
            for i, source in enumerate(getattr(self, kind)):
                source.validate(f"{where}.{kind}[{i}]")
        _one_of(self.mode, DATA_MODES, f"{where}.mode")
        _one_of(self.shard_by, SHARD_BY, f"{where}.shard_by")
        if not 0.0 <= self.holdout_fraction < 0.5:
            raise ConfigError(f"{where}.holdout_fraction: must be in [0, 0.5), got {self.holdout_fraction}")
        if self.max_record_bytes < 1:
            raise ConfigError(f"{where}.max_record_bytes: must be positive, got {self.max_record_bytes}")
        if self.prefetch < 0:
            raise ConfigError(f"{where}.prefetch: must be >= 0, got {self.prefetch}")
        if self.tokenize_chunk < 1:
            raise ConfigError(f"{where}.tokenize_chunk: must be positive, got {self.tokenize_chunk}")

    def validate(self, where: str = "data") -> None:
        """``check``, and real data needs at least one source."""
        if not self.synthetic and not self.sources:
            raise ConfigError(f"{where}.sources: no data sources; add e.g. "
                              f"sources: [{{path: 'corpus/*.jsonl'}}] or [{{name: my_tfds_dataset, data_dir: ...}}]")
        self.check(where)

    def text_field_of(self, source: SourceConfig) -> str:
        return source.text_field or self.text_field

    def messages_field_of(self, source: SourceConfig) -> str:
        return source.messages_field or self.messages_field


def _sources_from(items, where: str) -> tuple:
    if isinstance(items, (str, dict, SourceConfig)):
        items = [items]
    if not isinstance(items, (list, tuple)):
        raise ConfigError(f"{where}: expected a list, got {type(items).__name__}")
    return tuple(_source_from(item, f"{where}[{i}]") for i, item in enumerate(items))


def _source_from(item, where: str) -> SourceConfig:
    if isinstance(item, SourceConfig):
        return item
    if isinstance(item, str):
        return SourceConfig(path=item)
    return from_dict(SourceConfig, item, where)


def _one_of(value: str, choices: tuple, where: str) -> None:
    if value not in choices:
        raise ConfigError(f"{where}: {value!r} is not one of {', '.join(choices)}")


# --------------------------------------------------------------------------------------------
# The default job around training: the knowledge corpus before, the report after (jax_controlllm.experiment)
# --------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class KnowledgeConfig(Section):
    """The synthetic new-knowledge corpus of a run (see jax_controlllm.knowledge)."""
    n_new: int = 24
    n_revised: int = 0
    attributes: tuple[str, ...] = ("city", "company")
    max_frequency: int = 8
    frequency_exponent: float = 1.2
    held_out_phrasing: bool = False
    seed: int = 0
    replay_documents: int = 0        # the base model's own text mixed in (knowledge/replay.py); 0: none
    replay_weight: float = 0.5       # sampling weight of a replay document relative to a corpus document
    replay_lm_loss: bool = True      # false: replay text only anchors the divergence loss (no LM targets)
    replay_topics: bool = False      # true: replay openers on the corpus's attributes first (places, work, ...)

    def entities(self):
        """The corpus's ``jax_controlllm.knowledge.EntityConfig``."""
        from jax_controlllm.knowledge.entities import EntityConfig
        return EntityConfig(n_new=self.n_new, n_revised=self.n_revised, attributes=self.attributes,
                            max_frequency=self.max_frequency, frequency_exponent=self.frequency_exponent,
                            seed=self.seed)

    def validate(self) -> None:
        _check(bool(self.attributes), "knowledge.attributes", "expected at least one attribute, got none")
        try:
            self.entities().validate()
        except ValueError as err:
            raise ConfigError(f"knowledge: {err}") from None
        if self.replay_documents < 0 or not self.replay_weight > 0:
            raise ConfigError(f"knowledge: replay_documents must be >= 0 and replay_weight > 0, got "
                              f"{self.replay_documents} and {self.replay_weight}")


@dataclass(frozen=True)
class ReportConfig(Section):
    """What to measure after training (the default job's before/after report)."""
    knowledge_probes: bool = True
    retention_probes: bool = True
    kl_text: bool = True
    batch_size: int = 32
    export_hf: bool = True          # also write <run_dir>/hf (the release's Control LLM format)

    def validate(self) -> None:
        _check(self.batch_size >= 1, "report.batch_size", f"must be at least 1, got {self.batch_size}")


# --------------------------------------------------------------------------------------------
# The run
# --------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class RunConfig(Section):
    """A training run. ``model`` is the architecture of a fresh init and always the runtime policy (dtypes,
    remat, attention); what the run asks for (``train.mode``, ``train.trainable_layers``, ``expansion``,
    ``lora``) is resolved into the trained model's ``ModelConfig`` when the run starts."""
    model: ModelConfig = field(default_factory=ModelConfig)
    base: BaseModelConfig = field(default_factory=BaseModelConfig)
    expansion: Optional[ExpansionConfig] = None    # the requested expansion of the base (train.mode controlllm)
    lora: Optional[LoraConfig] = None              # train.mode lora (absent: LoraConfig's defaults)
    train: TrainConfig = field(default_factory=TrainConfig)
    data: DataConfig = field(default_factory=DataConfig)
    mesh: MeshConfig = field(default_factory=MeshConfig)
    knowledge: Optional[KnowledgeConfig] = None    # synthetic new-knowledge corpus (jax_controlllm.experiment)
    report: Optional[ReportConfig] = None          # before/after acquisition + retention report ({} = defaults)
    out_dir: Optional[str] = None

    def _check_distillation(self) -> None:
        """train.distill_weight reads the base as the frozen pretrained branches of concat Control LLM layers."""
        exp = self.expansion or ExpansionConfig()
        where = "train.distill_weight"
        _check(self.train.mode == "controlllm", where, f"distils from Control LLM's frozen pretrained branches; "
               f"train.mode {self.train.mode} has none (set train.mode: controlllm or {where}: 0)")
        _check(exp.expand_type == "concat", where, f"needs expansion.expand_type: concat (with {exp.expand_type} "
               "the inserted layers have no frozen branch to read the base from)")
        _check(exp.freeze_ori_layers, where, "needs expansion.freeze_ori_layers: true (the base must stay frozen)")

    def validate(self) -> None:
        self.model.validate()
        if self.expansion is not None:
            self.expansion.validate(self.model)
        self.train.validate()
        _check(self.train.mode in TRAIN_MODES, "train.mode",
               f"{self.train.mode!r} is not one of {', '.join(TRAIN_MODES)}")
        if self.lora is not None:
            _check(self.train.mode == "lora", "lora",
                   f"a lora section needs train.mode: lora (it is {self.train.mode}); set it or remove the section")
            self.lora.validate()
        if self.train.distill_weight > 0:
            self._check_distillation()
        _check(self.train.batch_size % self.train.grad_accum == 0, "train.grad_accum",
               f"batch_size {self.train.batch_size} is not divisible by grad_accum {self.train.grad_accum}")
        self.data.check("data")
        if self.knowledge is not None:
            self.knowledge.validate()
        if self.report is not None:
            self.report.validate()


# --------------------------------------------------------------------------------------------
# Loading: dicts / YAML -> dataclasses, with dotted overrides
# --------------------------------------------------------------------------------------------

def _check(ok: bool, where: str, message: str) -> None:
    if not ok:
        raise ConfigError(f"{where}: {message}")


def _check_int_list(values: Optional[tuple], where: str) -> None:
    if values is None:
        return
    _check(isinstance(values, (list, tuple)), where, f"expected a list of layer indices, got {_show(values)}")
    bad = [v for v in values if isinstance(v, bool) or not isinstance(v, int)]
    _check(not bad, where, f"expected a list of layer indices (integers), got {_show(values)}")


def unwrap_optional(tp):
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(args) == 1:
            return args[0]
    return tp


def _coerce(value, tp, where: str):
    """Coerce a YAML/CLI value to the annotated field type, or raise a ConfigError naming the field."""
    # Optional[X] and Optional[Union[X, Y]] (= Union[X, Y, None]) both accept null
    optional = typing.get_origin(tp) in (typing.Union, types.UnionType) and type(None) in typing.get_args(tp)
    tp = unwrap_optional(tp)
    if value is None and optional:
        return value
    if value is None:
        raise ConfigError(f"{where}: expected {_expected(tp)}, got null; remove the key to keep the default")
    if dataclasses.is_dataclass(tp):
        if dataclasses.is_dataclass(value):
            return value
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping, got {type(value).__name__} {_show(value)}")
        parse = getattr(tp, "parse", None)             # a section with its own parsing (DataConfig: sources)
        return parse(value, where) if parse is not None else from_dict(tp, value, where)
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):     # e.g. a list of layers or "auto": the section validates
        arms = typing.get_args(tp)
        return freeze(value) if isinstance(value, (list, tuple)) and any(map(_is_list_type, arms)) else value
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false", "yes", "no", "1", "0"):
            return value.lower() in ("true", "yes", "1")
        raise ConfigError(f"{where}: expected true/false, got {value!r}")
    if tp in (int, float):
        if isinstance(value, bool):
            raise ConfigError(f"{where}: expected a number, got {value!r}")
        try:
            number = float(value) if isinstance(value, str) else value
        except ValueError:
            raise ConfigError(f"{where}: expected a number, got {value!r}") from None
        if not isinstance(number, (int, float)):
            raise ConfigError(f"{where}: expected a number, got {type(value).__name__} {_show(value)}")
        if tp is int:
            if isinstance(number, float) and not (math.isfinite(number) and number == int(number)):
                raise ConfigError(f"{where}: expected an integer, got {value!r}")
            return int(number)
        try:
            return float(number)
        except OverflowError:  # an integer beyond float range
            raise ConfigError(f"{where}: {_show(value)} is out of range for a number") from None
    if tp is str:
        if not isinstance(value, (str, int, float)) or isinstance(value, bool):
            raise ConfigError(f"{where}: expected a string, got {type(value).__name__} {_show(value)}")
        return str(value)
    if _is_list_type(tp):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where}: expected a list, got {type(value).__name__} {_show(value)}")
        return freeze(value)
    if _is_mapping_type(tp):
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping, got {type(value).__name__} {_show(value)}")
        return freeze(value)
    return value


def _is_list_type(tp) -> bool:
    return tp in (list, tuple) or typing.get_origin(tp) in (list, tuple)


def _is_mapping_type(tp) -> bool:
    return (isinstance(tp, type) and issubclass(tp, dict)) or typing.get_origin(tp) is dict


def _expected(tp) -> str:
    if dataclasses.is_dataclass(tp) or _is_mapping_type(tp):
        return "a mapping"
    if _is_list_type(tp):
        return "a list"
    return {bool: "true/false", int: "an integer", float: "a number", str: "a string"}.get(tp, str(tp))


def _show(value, limit: int = 80) -> str:
    """repr of a value, cut short: an error message stays one readable line whatever the input."""
    text = repr(value)
    return text if len(text) <= limit else text[:limit - 3] + "..."


def from_dict(cls, data: dict, where: str = ""):
    """Build dataclass ``cls`` from a mapping; unknown keys are errors with a suggestion."""
    if not isinstance(data, dict):
        raise ConfigError(f"{where or cls.__name__}: expected a mapping, got {type(data).__name__}")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    kwargs = {}
    for key, value in data.items():
        path = f"{where}.{key}" if where else str(key)
        if key not in names:
            close = difflib.get_close_matches(str(key), names, n=1, cutoff=0.6)
            hint = f"; did you mean '{close[0]}'?" if close else f"; valid keys: {', '.join(names)}"
            raise ConfigError(f"unknown config key '{path}'{hint}")
        kwargs[key] = _coerce(value, hints[key], path)
    return cls(**kwargs)


def to_dict(obj) -> dict:
    """A config as plain data (lists and dicts): what YAML and JSON records hold, and compare with."""
    return plain(dataclasses.asdict(obj))


def _parse_scalar(text: str):
    try:
        return yaml.safe_load(text)
    except (yaml.YAMLError, RecursionError):
        return text


def apply_overrides(data: dict, overrides: list[str]) -> dict:
    """Apply ``a.b.c=value`` overrides (values parsed as YAML) to a nested dict, in place."""
    for item in overrides or []:
        if "=" not in item:
            raise ConfigError(f"override {item!r} must look like key.path=value")
        key, text = item.split("=", 1)
        node = data
        parts = key.strip().split(".")
        for part in parts[:-1]:
            if node.get(part) is None:
                node[part] = {}
            node = node[part]
            if not isinstance(node, dict):
                raise ConfigError(f"override {item!r}: '{part}' is not a mapping")
        # checked like a config file's data: a value such as '&a [*a]' refers to itself
        node[parts[-1]] = plain_copy({"value": _parse_scalar(text)}, f"override {item!r}")["value"]
    return data


def read_yaml(path: str | Path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {path} does not exist")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (yaml.YAMLError, UnicodeDecodeError) as err:
        raise ConfigError(f"config file {path} is not valid YAML: {err}") from None
    except RecursionError:
        raise ConfigError(f"config file {path}: nested more deeply than a config can be") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path}: the top level must be a mapping, got {type(data).__name__}")
    return data


MAX_CONFIG_VALUES, MAX_CONFIG_DEPTH = 100_000, 64     # far beyond any real config


def plain_copy(data: dict, where: str) -> dict:
    """A deep copy of config data as plain JSON types. Refuses data that expands past MAX_CONFIG_VALUES values
    or MAX_CONFIG_DEPTH levels (YAML aliases can repeat a node exponentially or refer to themselves) and values
    that are not plain data (dates, sets, binary), with a ConfigError."""
    count, stack = 0, [(data, 0)]
    while stack:                                   # iterative and bounded: cycles just hit the limit
        node, depth = stack.pop()
        count += 1
        if count > MAX_CONFIG_VALUES or depth > MAX_CONFIG_DEPTH:
            raise ConfigError(f"{where}: expands to more than {MAX_CONFIG_VALUES} values or {MAX_CONFIG_DEPTH} "
                              f"levels (YAML anchors that repeat or contain themselves?); write the values out")
        if isinstance(node, dict):
            stack.extend((child, depth + 1) for child in node.values())
        elif isinstance(node, (list, tuple)):
            stack.extend((child, depth + 1) for child in node)
    try:
        return json.loads(json.dumps(data))
    except (TypeError, ValueError) as err:
        raise ConfigError(f"{where}: holds a value that is not plain data ({err}); use numbers, strings, "
                          f"lists and mappings") from None


# Keys that earlier versions wrote into run records (RUN/config.yaml) and checkpoints' model configs but that are
# no settings any more: dropped when those are read back. A config that a person writes with them is refused.
RETIRED_MODEL_KEYS = ("expansion.freeze_ori_non_layers",)
RETIRED_RUN_KEYS = ("eval", "expansion.freeze_ori_non_layers", *(f"model.{k}" for k in RETIRED_MODEL_KEYS))


def without_retired(data: dict, retired: tuple = RETIRED_RUN_KEYS) -> dict:
    """A copy of ``data`` without the ``retired`` dotted keys (where present)."""
    data = dict(data)
    for key in retired:
        head, _, rest = key.partition(".")
        if not rest:
            data.pop(head, None)
        elif isinstance(data.get(head), dict):
            data[head] = without_retired(data[head], (rest,))
    return data


def load_config(path: str | Path | None = None, overrides: list[str] | None = None,
                data: dict | None = None) -> RunConfig:
    """YAML file (or dict) + dotted overrides -> validated RunConfig."""
    raw = read_yaml(path) if path is not None else dict(data or {})
    raw = plain_copy(raw, f"config file {path}" if path is not None else "config")
    apply_overrides(raw, overrides or [])
    config = from_dict(RunConfig, raw)
    config.validate()
    return config


def model_config_from_hf(hf: dict) -> ModelConfig:
    """Plain Llama fields of a Hugging Face ``config.json`` (unknown HF keys are ignored here)."""
    names = {f.name for f in dataclasses.fields(ModelConfig)} - {"expansion", "lora"}
    kwargs = {k: v for k, v in hf.items() if k in names and v is not None}
    rope = hf.get("rope_parameters")  # transformers >= 5 folds rope_theta and rope_scaling into one dict
    if isinstance(rope, dict):
        rope = dict(rope)
        if "rope_theta" in rope:
            kwargs["rope_theta"] = rope.pop("rope_theta")
        if rope.get("rope_type", "default") != "default":
            kwargs["rope_scaling"] = rope
    kwargs.pop("trainable_layers", None)
    return ModelConfig(**kwargs)


HF_LLAMA_KEYS = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                 "num_attention_heads", "num_key_value_heads", "head_dim", "max_position_embeddings",
                 "rms_norm_eps", "rope_theta", "rope_scaling", "tie_word_embeddings", "attention_bias",
                 "mlp_bias", "hidden_act", "bos_token_id", "eos_token_id", "pad_token_id")


def model_config_to_hf(config: ModelConfig) -> dict:
    hf = {k: plain(getattr(config, k)) for k in HF_LLAMA_KEYS}
    hf.update(model_type="llama", architectures=["LlamaForCausalLM"], attention_dropout=0.0,
              initializer_range=0.02, pretraining_tp=1, use_cache=True, torch_dtype="float32")
    return hf
