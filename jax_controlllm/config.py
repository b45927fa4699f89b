"""Typed configuration: dataclasses, YAML loading, dotted overrides and validation.

Every knob a user can set lives in one of the dataclasses below. ``load_config`` reads a YAML
file, applies ``--set a.b=c`` overrides and returns a validated ``RunConfig``. Unknown keys are
errors that name the key and suggest the closest valid one, because a silently ignored typo in a
training config costs a TPU-day.
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
from typing import Any, Optional, Union

import yaml


class ConfigError(ValueError):
    """A configuration value is missing, unknown or out of range; the message says which and how to fix it."""


# --------------------------------------------------------------------------------------------
# Model
# --------------------------------------------------------------------------------------------

POSITIVE_MODEL_FIELDS = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                        "num_key_value_heads", "head_dim", "max_position_embeddings")


REMAT_POLICIES = ("none", "selective", "full", "save_dots", "save_dots_no_batch")


@dataclass
class ModelConfig:
    """A Llama-family decoder, with Hugging Face field names so ``config.json`` maps 1:1."""
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
    rope_scaling: Optional[dict] = None            # {"rope_type": "llama3"|"linear", ...}
    tie_word_embeddings: bool = False
    attention_bias: bool = False
    mlp_bias: bool = False
    hidden_act: str = "silu"
    bos_token_id: Optional[int] = 1
    eos_token_id: Any = 2                          # int or list of ints (Llama 3 instruct)
    pad_token_id: Optional[int] = None
    # --- runtime policy (not part of HF config.json) ---
    param_dtype: str = "float32"                   # dtype of trainable (master) weights
    frozen_dtype: str = "float32"                  # dtype of frozen weights (bf16 for training)
    compute_dtype: str = "float32"                 # activations / matmul inputs
    remat: str = "none"                            # none | selective | full | save_dots | save_dots_no_batch
    attention_impl: str = "xla"                    # xla (masked softmax) | cudnn (fused, GPU)
    scan_layers: bool = True
    loss_chunk: int = 0                            # sequence positions per LM-head + CE chunk (0: all at once);
                                                   # chunking keeps [B, S, V] float32 logits out of memory
    # --- which layers train (full / partial tuning); Control LLM uses `expansion` instead ---
    trainable_layers: Optional[list] = None        # block indices; None = none (frozen base)
    train_embeddings: bool = False                 # full tuning: embeddings, final norm, LM head
    expansion: Optional["ExpansionConfig"] = None
    lora: Optional["LoraConfig"] = None            # low-rank adapters on a frozen plain model (train.mode lora)

    def __hash__(self):  # static argument of jax.jit: the config decides shapes and code, not values
        return hash(json.dumps(dataclasses.asdict(self), sort_keys=True, default=str))

    def __post_init__(self):
        if self.num_key_value_heads is None:
            self.num_key_value_heads = self.num_attention_heads
        if self.head_dim is None and self.num_attention_heads:   # 0 heads: validate() says so
            self.head_dim = self.hidden_size // self.num_attention_heads

    def validate(self) -> None:
        for name in POSITIVE_MODEL_FIELDS:
            _check(getattr(self, name) >= 1, f"model.{name}", f"must be at least 1, got {getattr(self, name)}")
        _check(self.hidden_act == "silu", "model.hidden_act",
               f"only 'silu' (SwiGLU) is supported, got {self.hidden_act!r}")
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


@dataclass
class ExpansionConfig:
    """How a plain Llama is expanded. Field names follow the release's ``expansion`` dict."""
    expand_type: str = "concat"
    num_exp_layers: int = 8
    layers: Optional[Union[list, str]] = None      # explicit original-layer indices (overrides the rule), or
                                                   # "auto": chosen from the base's knowledge circuits at setup
    merge_method: str = "dlerp"
    interpolation_factor: float = 0.0
    interpolation_loss_alpha: float = 1.0          # λ; 0 disables; -1 weights tokens by the gate
    interpolation_loss_type: str = "mse"
    interpolation_norm_alpha: float = 0.0          # relaxed norm in expanded layers: 0, (0,1], or -1
    freeze_interpolation_factor: bool = True
    freeze_ori_layers: bool = True
    freeze_ori_non_layers: bool = True
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
        _check(self.num_exp_layers >= 1, "expansion.num_exp_layers",
               f"must be at least 1, got {self.num_exp_layers}")
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
    layers = [i for i in range(num_ori_layers) if (i + 1) % split == 0]
    if len(layers) != n:
        raise ConfigError(
            f"expansion.num_exp_layers: the release's rule (every {split}-th layer) selects {len(layers)} "
            f"layers, not {n}, for {num_ori_layers} layers; choose a divisor of {num_ori_layers} or pass the "
            f"exact indices as expansion.layers, e.g. layers: {layers[:n]}")
    return layers


# --------------------------------------------------------------------------------------------
# LoRA (the baseline most users reach for): W x + (alpha / rank) B A dropout(x) on chosen projections
# --------------------------------------------------------------------------------------------

LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@dataclass
class LoraConfig:
    """Low-rank adapters on a frozen plain Llama (Hu et al. 2021; PEFT's conventions). The default targets every
    attention and MLP projection, not PEFT's q and v: LoRA is the baseline whose acquisition Control LLM is
    compared with, so it gets its strongest common setting (QLoRA needed all linear layers to match full tuning)."""
    rank: int = 16
    alpha: float = 32.0                            # the update is scaled by alpha / rank
    targets: list = field(default_factory=lambda: list(LORA_TARGETS))
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

@dataclass
class TrainConfig:
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
    trainable_layers: Optional[list] = None        # partial mode: original layer indices
    peak_flops_per_device: float = 0.0             # for the MFU estimate; 0: from the device kind (none on CPU)
    prefetch: int = 2                              # batches prepared ahead in a background thread

    def validate(self) -> None:
        for name, least in TRAIN_MINIMUMS.items():
            value = getattr(self, name)
            _check(value >= least, f"train.{name}", f"must be at least {least}, got {value}")
        _check_int_list(self.trainable_layers, "train.trainable_layers")


# Integer train settings and their smallest valid value (0 where 0 means "off" or "none").
TRAIN_MINIMUMS = {"steps": 0, "batch_size": 1, "grad_accum": 1, "seq_len": 1, "warmup_steps": 0, "log_every": 1,
                  "eval_every": 0, "eval_batches": 0, "save_every": 0, "keep_last": 1, "keep_every": 0,
                  "skip_nonfinite_steps": 0, "prefetch": 0}


TRAIN_MODES = ("controlllm", "full", "partial", "lora")


@dataclass
class MeshConfig:
    shape: str = "1"                               # "4x8", "2x2x8", "-1x8"
    axes: Optional[list] = None                    # names, default by rank (see sharding.py)
    rules: Optional[dict] = None                   # logical axis -> mesh axis / list / null


@dataclass
class BaseModelConfig:
    """Where the starting weights come from: HF directory, GGUF file, Orbax checkpoint or fresh init."""
    path: Optional[str] = None                     # None: fresh random init from `model`
    format: str = "auto"                           # auto | hf | gguf | orbax | smollm2
    allow_pickle: bool = False


@dataclass
class RunConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    base: BaseModelConfig = field(default_factory=BaseModelConfig)
    expansion: Optional[ExpansionConfig] = None
    lora: Optional[LoraConfig] = None              # train.mode lora (absent: LoraConfig's defaults)
    train: TrainConfig = field(default_factory=TrainConfig)
    data: dict = field(default_factory=dict)       # parsed by jax_controlllm.data.DataConfig
    mesh: MeshConfig = field(default_factory=MeshConfig)
    eval: dict = field(default_factory=dict)
    knowledge: Optional[dict] = None               # synthetic new-knowledge corpus (jax_controlllm.experiment)
    report: Optional[dict] = None                  # before/after acquisition + retention report ({} = defaults)
    out_dir: Optional[str] = None

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
        _check(self.train.batch_size % self.train.grad_accum == 0, "train.grad_accum",
               f"batch_size {self.train.batch_size} is not divisible by grad_accum {self.train.grad_accum}")


# --------------------------------------------------------------------------------------------
# Loading: dicts / YAML -> dataclasses, with dotted overrides
# --------------------------------------------------------------------------------------------

def _check(ok: bool, where: str, message: str) -> None:
    if not ok:
        raise ConfigError(f"{where}: {message}")


def _check_int_list(values: Optional[list], where: str) -> None:
    if values is None:
        return
    _check(isinstance(values, (list, tuple)), where, f"expected a list of layer indices, got {_show(values)}")
    bad = [v for v in values if isinstance(v, bool) or not isinstance(v, int)]
    _check(not bad, where, f"expected a list of layer indices (integers), got {_show(values)}")


def _unwrap_optional(tp):
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(args) == 1:
            return args[0]
    return tp


def _coerce(value, tp, where: str):
    """Coerce a YAML/CLI value to the annotated field type, or raise a ConfigError naming the field."""
    # Optional[X] and Optional[Union[X, Y]] (= Union[X, Y, None]) both accept null
    optional = typing.get_origin(tp) in (typing.Union, types.UnionType) and type(None) in typing.get_args(tp)
    tp = _unwrap_optional(tp)
    if tp is Any or (value is None and optional):
        return value
    if value is None:
        raise ConfigError(f"{where}: expected {_expected(tp)}, got null; remove the key to keep the default")
    if dataclasses.is_dataclass(tp):
        if dataclasses.is_dataclass(value):
            return value
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping, got {type(value).__name__} {_show(value)}")
        return from_dict(tp, value, where)
    origin = typing.get_origin(tp)
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
    if tp in (list, dict) or origin in (list, dict):
        want = origin or tp
        if want is list and isinstance(value, tuple):
            value = list(value)
        if not isinstance(value, want):
            raise ConfigError(f"{where}: expected a {want.__name__}, got {type(value).__name__} {_show(value)}")
        return value
    return value


def _expected(tp) -> str:
    if dataclasses.is_dataclass(tp) or tp is dict or typing.get_origin(tp) is dict:
        return "a mapping"
    if tp is list or typing.get_origin(tp) is list:
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
    return dataclasses.asdict(obj)


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
        node[parts[-1]] = _parse_scalar(text)
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
    hf = {k: getattr(config, k) for k in HF_LLAMA_KEYS}
    hf.update(model_type="llama", architectures=["LlamaForCausalLM"], attention_dropout=0.0,
              initializer_range=0.02, pretraining_tp=1, use_cache=True, torch_dtype="float32")
    return hf
