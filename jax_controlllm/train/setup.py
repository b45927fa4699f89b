"""From a RunConfig and a mesh to a ready train step: model config per training mode, starting weights placed
directly into their shards, optimizer state, and the compiled step (``build_trainer``; the loop and the
benchmarks both start here).

Starting weights, in order: this run's latest checkpoint, else the base model (``base.path``) expanded per
``expansion``, else a fresh random init. No path ever gathers the whole model on one device: init and
expansion run under ``jit`` with ``out_shardings``, and host weights are cut per device.
"""
from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional

import jax
import numpy as np
import optax

from jax_controlllm.config import ConfigError, ExpansionConfig, LoraConfig, ModelConfig, RunConfig, selected_layers
from jax_controlllm.model.expand import cast_to_specs, expand, expanded_config
from jax_controlllm.model.lora import add_lora, lora_config, merge_lora
from jax_controlllm.model.params import abstract_params, init_params, param_shardings, relayout, trainable_mask
from jax_controlllm.sharding import batch_axes, data_parallel_size, mesh_rules
from jax_controlllm.train.state import (
    TrainState,
    count_params,
    learning_rate_schedule,
    make_optimizer,
    new_state,
    partition,
)
from jax_controlllm.train.step import (
    TrainShardings,
    eval_step_fn,
    jit_eval_step,
    jit_train_step,
    train_shardings,
    train_step_fn,
)

# ModelConfig fields that are runtime policy: always taken from the run config, also for a base model.
RUNTIME_FIELDS = ("param_dtype", "frozen_dtype", "compute_dtype", "remat", "attention_impl", "scan_layers",
                  "loss_chunk", "frozen_matmul")


# ----------------------------------------------------------------------------------------------
# Which model trains: mode + expansion on top of the base architecture
# ----------------------------------------------------------------------------------------------

def mode_fields(run: RunConfig, base: ModelConfig) -> dict:
    """trainable_layers / train_embeddings for train.mode (controlllm: expansion decides instead)."""
    mode, num_layers = run.train.mode, base.num_hidden_layers
    if base.expansion is not None:
        return continued_fields(run, base)
    if mode == "controlllm":
        if run.expansion is None:
            raise ConfigError("expansion: train.mode controlllm needs an expansion section, e.g. expansion: "
                              "{expand_type: concat, num_exp_layers: 8, merge_method: dlerp}; for plain "
                              "fine-tuning set train.mode: full or partial")
        return {"trainable_layers": None, "train_embeddings": False}
    if run.expansion is not None:
        raise ConfigError(f"expansion: train.mode {mode} tunes the plain model; remove the expansion section "
                          f"or set train.mode: controlllm")
    if mode == "full":
        return {"trainable_layers": list(range(num_layers)), "train_embeddings": True}
    if mode == "lora":   # the whole base frozen; the adapters are the trainable leaves
        return {"trainable_layers": None, "train_embeddings": False}
    layers = run.train.trainable_layers
    if not layers:
        raise ConfigError(f"train.trainable_layers: train.mode partial needs the layer indices to tune, "
                          f"e.g. trainable_layers: [{num_layers - 2}, {num_layers - 1}]")
    bad = [i for i in layers if not 0 <= int(i) < num_layers]
    if bad:
        raise ConfigError(f"train.trainable_layers: {bad} out of range for {num_layers} layers "
                          f"(valid: 0..{num_layers - 1})")
    return {"trainable_layers": sorted(int(i) for i in layers), "train_embeddings": False}


def continued_fields(run: RunConfig, base: ModelConfig) -> dict:
    """Continuing from an expanded (Control LLM) checkpoint: only train.mode controlllm is defined there, and it
    trains exactly what a fresh expansion of the checkpoint's expansion trains."""
    if run.train.mode != "controlllm":
        raise ConfigError(
            f"train.mode: {run.train.mode} is not defined for base.path {run.base.path}, an expanded Control LLM "
            "checkpoint; set train.mode: controlllm to continue its Control LLM training, or fold it into a plain "
            "Llama first (python -m launch.convert orbax-to-hf --merge-back) and tune that")
    check_expansion_agrees(run.expansion, base.expansion, run.base.path)
    return {"trainable_layers": None, "train_embeddings": False}


def check_expansion_agrees(given: Optional[ExpansionConfig], stored: ExpansionConfig, path) -> None:
    """An ``expansion:`` section beside an expanded checkpoint may only restate the checkpoint's expansion."""
    if given is None:
        return
    theirs, ours = _effective_expansion(stored, stored), _effective_expansion(given, stored)
    differing = [k for k in theirs if theirs[k] != ours[k]]
    if differing:
        shown = ", ".join(f"{k} ({ours[k]} here, {theirs[k]} in the checkpoint)" for k in differing)
        raise ConfigError(f"expansion: contradicts the expanded checkpoint base.path {path} in {shown}; remove the "
                          "expansion section (the checkpoint's is used) or make it match")


def _effective_expansion(exp: ExpansionConfig, stored: ExpansionConfig) -> dict:
    """The expansion's settings, with the layer rule replaced by the original layers it selects."""
    fields = {k: v for k, v in dataclasses.asdict(exp).items() if k not in ("num_exp_layers", "num_ori_layers")}
    try:
        fields["layers"] = selected_layers(exp, stored.num_ori_layers)
    except (ConfigError, TypeError, ValueError):
        fields["layers"] = exp.layers if exp.layers is not None else f"num_exp_layers {exp.num_exp_layers}"
    return fields


def runtime_fields(run: RunConfig) -> dict:
    return {name: getattr(run.model, name) for name in RUNTIME_FIELDS}


def base_policy(run: RunConfig, base: ModelConfig) -> dict:
    return {**runtime_fields(run), **mode_fields(run, base)}


def base_model_config(run: RunConfig) -> ModelConfig:
    """The base architecture with the run's policy, read without loading weights where the format allows."""
    if run.base.path is None:
        config = run.model
    else:
        config = _read_base_config(run.base.path, run.base.format)
    return dataclasses.replace(config, **base_policy(run, config))


def _read_base_config(path: str, fmt: str) -> ModelConfig:
    from jax_controlllm.convert.auto import detect_format
    kind = detect_format(path) if fmt == "auto" else fmt
    if kind == "hf":
        from jax_controlllm.convert.hf import config_from_hf_dict
        file = Path(path) / "config.json"
        return config_from_hf_dict(json.loads(file.read_text()), str(file))
    if kind == "orbax":
        from jax_controlllm.checkpoint import model_config_from_json, resolve_model_dir
        _, file = resolve_model_dir(path)
        # a LoRA run as the base: its adapters are merged in when the weights load
        return dataclasses.replace(model_config_from_json(json.loads(file.read_text()), str(file)), lora=None)
    from jax_controlllm.convert.gguf import gguf_model_config
    return gguf_model_config(path)  # metadata and tensor shapes only: the weights are read once, later


def run_lora(run: RunConfig) -> LoraConfig:
    """The adapters of a lora run: its lora section, or the defaults."""
    return run.lora if run.lora is not None else LoraConfig()


def trained_model_config(run: RunConfig, base: ModelConfig) -> ModelConfig:
    """The model that trains: the base with its mode policy, expanded in controlllm mode (unless the base is an
    expanded checkpoint already: its training then continues), with adapters in lora mode."""
    if needs_expansion(run, base):
        config = expanded_config(base, run.expansion)
    elif run.train.mode == "lora":
        config = lora_config(base, run_lora(run))
    else:
        config = base
    config.validate()
    return config


def adapt(run: RunConfig, base: ModelConfig, params: dict, rng) -> dict:
    """The base's params turned into the trained model's: expanded (controlllm on a plain base), with fresh
    adapters (lora)."""
    if needs_expansion(run, base):
        return expand(base, params, run.expansion, rng)[1]
    if run.train.mode == "lora":
        return add_lora(base, params, run_lora(run), rng)[1]
    return params


# ----------------------------------------------------------------------------------------------
# Checks that must fail before anything is created or loaded
# ----------------------------------------------------------------------------------------------

def needs_expansion(run: RunConfig, base: ModelConfig) -> bool:
    return run.train.mode == "controlllm" and base.expansion is None


def check_batch(run: RunConfig, mesh, rules: dict) -> None:
    train = run.train
    micro = train.batch_size // train.grad_accum
    dp = data_parallel_size(mesh, rules)
    if micro % dp:
        axes = " x ".join(f"{a}={mesh.shape[a]}" for a in batch_axes(mesh, rules))
        raise ConfigError(f"train.batch_size: {train.batch_size} sequences in {train.grad_accum} micro-batch(es) of "
                          f"{micro} do not split over the {dp} data-parallel devices ({axes}); use a batch_size "
                          f"that is a multiple of {dp * train.grad_accum} (--set train.batch_size="
                          f"{dp * train.grad_accum * max(micro // dp, 1)}) or a mesh with fewer batch devices")


# ----------------------------------------------------------------------------------------------
# The compiled step for a model config on a mesh (no weights needed: also used ahead of time)
# ----------------------------------------------------------------------------------------------

@dataclass
class StepPlan:
    model_config: ModelConfig
    mask: dict
    tx: optax.GradientTransformation
    schedule: Callable
    shardings: TrainShardings
    step_fn: Callable        # jitted: (state, frozen, batch) -> (state, metrics); state donated
    eval_fn: Callable        # jitted: (trainable, frozen, batch) -> metrics


def plan_step(run: RunConfig, model_config: ModelConfig, mesh, rules: dict) -> StepPlan:
    mask = trainable_mask(model_config)
    if not any(jax.tree.leaves(mask)):
        raise ConfigError("train: no parameter is trainable; use train.mode controlllm with an expansion, "
                          "full, or partial with train.trainable_layers")
    tx = make_optimizer(run.train)
    schedule = learning_rate_schedule(run.train)
    shardings = train_shardings(model_config, mask, tx, mesh, rules, abstract_params(model_config))
    step_fn = jit_train_step(train_step_fn(model_config, run.train, tx, schedule, mesh, rules), shardings)
    eval_fn = jit_eval_step(eval_step_fn(model_config, mesh, rules), shardings)
    return StepPlan(model_config, mask, tx, schedule, shardings, step_fn, eval_fn)


# ----------------------------------------------------------------------------------------------
# Starting weights, placed into their shards
# ----------------------------------------------------------------------------------------------

def put_sharded(host: np.ndarray, sharding) -> jax.Array:
    """A host array cut into its shards: each device receives only its own slice."""
    return jax.make_array_from_callback(host.shape, sharding, lambda index: host[index])


def fresh_params(run: RunConfig, base: ModelConfig, model_config: ModelConfig, mesh, rules: dict) -> dict:
    """Random init of the base, expanded in controlllm mode, computed directly in the final shards."""
    rng = jax.random.key(run.train.seed)

    def init():
        return adapt(run, base, init_params(base, rng), jax.random.fold_in(rng, 1))
    return jax.jit(init, out_shardings=param_shardings(model_config, mesh, rules))()


def pretrained_params(run: RunConfig, base: ModelConfig, host: dict, model_config: ModelConfig, mesh,
                      rules: dict) -> dict:
    """The base model's host weights cut into shards, then expanded (controlllm) or given adapters (lora) under
    jit."""
    params = jax.tree.map(put_sharded, host, param_shardings(base, mesh, rules))
    if not (needs_expansion(run, base) or run.train.mode == "lora"):
        return params
    rng = jax.random.fold_in(jax.random.key(run.train.seed), 1)
    adapt_fn = jax.jit(lambda p: adapt(run, base, p, rng), out_shardings=param_shardings(model_config, mesh, rules))
    return adapt_fn(params)


def load_base_weights(run: RunConfig) -> tuple[ModelConfig, dict]:
    """(config with the run's policy, numpy params) of ``base.path``, in host memory."""
    from jax_controlllm.convert.auto import detect_format, load_pretrained
    path, fmt = run.base.path, run.base.format
    kind = detect_format(path) if fmt == "auto" else fmt
    if kind == "orbax":  # our own checkpoints and exports
        from jax_controlllm.checkpoint import load_model
        config, params = merge_lora(*load_model(path, as_numpy=True))   # a LoRA run's adapters folded in
    elif kind == "hf":   # the depth is in config.json: read the tensors once, straight in their dtypes
        return load_pretrained(path, kind, allow_pickle=run.base.allow_pickle, as_numpy=True,
                               **base_policy(run, _read_base_config(path, kind)))
    else:                # GGUF: the depth comes with the tensors; read at master precision, then cast
        config, params = load_pretrained(path, kind, as_numpy=True, dtype=run.model.param_dtype)
    trained = dataclasses.replace(config, **base_policy(run, config))
    return trained, cast_to_specs(trained, relayout(config, trained, params))


# ----------------------------------------------------------------------------------------------
# The trainer: everything the loop (or a benchmark) needs
# ----------------------------------------------------------------------------------------------

@dataclass
class Trainer:
    run: RunConfig
    mesh: Any
    rules: dict
    plan: StepPlan
    state: TrainState                # donated to each step: always use the returned one
    frozen: dict
    start_step: int = 0
    data_state: Optional[dict] = None    # the restored data iterator state (None: start of the stream)
    source: str = "random init"          # or "checkpoint step N", "base model PATH"

    @property
    def model_config(self) -> ModelConfig:
        return self.plan.model_config

    @property
    def step_fn(self) -> Callable:
        return self.plan.step_fn

    @property
    def shardings(self) -> TrainShardings:
        return self.plan.shardings

    def params(self) -> dict:
        from jax_controlllm.train.state import combine
        return combine(self.state.trainable, self.frozen)

    def describe(self) -> str:
        trainable, frozen = count_params(self.state.trainable), count_params(self.frozen)
        mesh = " x ".join(f"{n}={s}" for n, s in self.mesh.shape.items())
        return (f"{trainable / 1e6:.2f}M trainable + {frozen / 1e6:.2f}M frozen parameters from {self.source}, "
                f"mesh {mesh}, starting at step {self.start_step}")


def build_trainer(run: RunConfig, mesh, checkpoints=None) -> Trainer:
    """State, frozen weights and the compiled step for ``run`` on ``mesh``.

    ``checkpoints`` (a ``jax_controlllm.checkpoint.RunCheckpoints``): resume from its latest step if any.
    Call the step as ``state, metrics = trainer.step_fn(trainer.state, trainer.frozen, batch)`` inside
    ``jax.set_mesh(trainer.mesh)``; ``batch`` holds int32 [batch_size, seq_len] arrays (BATCH_KEYS) placed
    with ``trainer.shardings.batch``.
    """
    rules = mesh_rules(run.mesh.rules)
    check_batch(run, mesh, rules)
    latest = checkpoints.latest_step() if checkpoints is not None else None
    with jax.set_mesh(mesh):
        if latest is not None:
            return _resume(run, mesh, rules, checkpoints, latest)
        host = None
        if run.base.path is not None:
            base, host = load_base_weights(run)
        else:
            base = base_model_config(run)
        model_config = trained_model_config(run, base)
        plan = plan_step(run, model_config, mesh, rules)
        if host is not None:
            params = pretrained_params(run, base, host, model_config, mesh, rules)
            source = f"base model {run.base.path}"
        else:
            params, source = fresh_params(run, base, model_config, mesh, rules), "random init"
        trainable, frozen = partition(params, plan.mask)
        opt_state = jax.jit(plan.tx.init, out_shardings=plan.shardings.state.opt_state)(trainable)
        return Trainer(run, mesh, rules, plan, new_state(trainable, opt_state), frozen, 0, None, source)


def _resume(run: RunConfig, mesh, rules: dict, checkpoints, step: int) -> Trainer:
    model_config = checkpoints.read_model_config(step)
    plan = plan_step(run, model_config, mesh, rules)
    params_target = _with_shardings(abstract_params(model_config), plan.shardings.params)
    trainable_abstract, _ = partition(abstract_params(model_config), plan.mask)
    opt_shapes = jax.eval_shape(plan.tx.init, trainable_abstract)
    opt_target = _with_shardings(opt_shapes, plan.shardings.state.opt_state)
    restored = checkpoints.restore(step, params_target, opt_target)
    trainable, frozen = partition(restored.params, plan.mask)
    state = new_state(trainable, restored.opt_state, step)
    return Trainer(run, mesh, rules, plan, state, frozen, step, restored.data_state, f"checkpoint step {step}")


def _with_shardings(shapes, shardings):
    return jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh), shapes, shardings)
