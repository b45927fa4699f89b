"""The train step: loss over ``grad_accum`` scanned micro-batches, gradients of the trainable leaves only,
clipped AdamW update, skipped when the loss or gradients are not finite. Compiled with ``jax.jit`` with
explicit in/out shardings and the state donated.

Loss of one step (so that splitting a batch into micro-batches does not change it):

    loss = sum_a nll_a / sum_a tokens_a  +  mean_a divergence_a

where micro-batch ``a`` holds rows a, a + A, a + 2A, ... of the global batch: every device keeps its own
rows, so accumulation needs no data movement.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import jax
import jax.numpy as jnp
import optax

from jax_controlllm.config import ModelConfig, TrainConfig
from jax_controlllm.losses import controlllm_loss, next_token_targets, untargeted_positions
from jax_controlllm.model.fp8 import quantize_frozen_kernels
from jax_controlllm.model.layout import controlled_indices
from jax_controlllm.model.params import param_shardings
from jax_controlllm.model.stack import token_mask_for
from jax_controlllm.sharding import activation_sharding, batch_sharding, replicated
from jax_controlllm.train.state import TrainState, combine, partition

BATCH_KEYS = ("input_ids", "labels", "segment_ids", "positions")


@dataclass
class TrainShardings:
    """NamedShardings of everything the step reads and writes."""
    params: dict             # the full parameter tree
    trainable: dict
    frozen: dict
    state: TrainState        # shardings of a TrainState (step replicated, opt state like its parameter)
    batch: dict              # {name: NamedSharding} for BATCH_KEYS
    replicated: Any


def opt_state_shardings(tx: optax.GradientTransformation, trainable_abstract: dict, trainable_shardings: dict,
                        mesh) -> Any:
    """Moments shard like their parameters; scalars (counts) are replicated. A moment is recognised by
    its path ending with a trainable parameter's path (optax keeps the parameter tree inside its state)."""
    by_path = {tuple(_key(k) for k in path): s
               for path, s in jax.tree_util.tree_flatten_with_path(trainable_shardings)[0]}
    shapes = jax.eval_shape(tx.init, trainable_abstract)

    def pick(path, leaf):
        keys = tuple(_key(k) for k in path)
        for start in range(len(keys)):
            if keys[start:] in by_path and by_path[keys[start:]] is not None:
                return by_path[keys[start:]]
        return replicated(mesh)
    return jax.tree_util.tree_map_with_path(pick, shapes)


def _key(k) -> Any:
    for attr in ("key", "name", "idx"):
        if hasattr(k, attr):
            return getattr(k, attr)
    return str(k)


def train_shardings(config: ModelConfig, mask: dict, tx, mesh, rules: dict, abstract: dict) -> TrainShardings:
    params = param_shardings(config, mesh, rules)
    trainable, frozen = partition(params, mask)
    trainable_abstract, _ = partition(abstract, mask)
    rep = replicated(mesh)
    state = TrainState(rep, trainable, opt_state_shardings(tx, trainable_abstract, trainable, mesh))
    batch = {k: batch_sharding(mesh, rules) for k in BATCH_KEYS}
    return TrainShardings(params, trainable, frozen, state, batch, rep)


# ----------------------------------------------------------------------------------------------
# Loss over micro-batches
# ----------------------------------------------------------------------------------------------

def split_micro_batches(batch: dict, accum: int) -> dict:
    """[B, S] -> [accum, B // accum, S]; micro-batch a takes rows a, a + accum, ... (device-local)."""
    def split(x):
        return jnp.swapaxes(x.reshape(x.shape[0] // accum, accum, *x.shape[1:]), 0, 1)
    return {k: split(v) for k, v in batch.items()}


def scored_tokens(batch: dict) -> jax.Array:
    _, valid = next_token_targets(batch["labels"], batch.get("segment_ids"))
    return jnp.sum(valid)


def untargeted_tokens(batch: dict) -> jax.Array:
    """How many positions of the whole batch the distillation term averages over (like ``scored_tokens``, so
    that gradient accumulation does not change it)."""
    labels = batch.get("labels", batch["input_ids"])
    token_mask = token_mask_for(batch["input_ids"], batch.get("attention_mask"), batch.get("segment_ids"))
    return jnp.sum(untargeted_positions(labels, token_mask, batch.get("segment_ids")))


def _micro_loss(config: ModelConfig, totals: tuple, accum: int, poison, divergence_scale, distill_weight: float):
    """The micro-batch's share of the step loss, as a function of the trainable leaves."""
    def loss(trainable, frozen, micro, lora_rng):
        out = controlllm_loss(config, combine(trainable, frozen), micro, lora_rng, distill=distill_weight > 0)
        shares = _metrics_share(out, totals, accum)
        share = shares["ce"] + divergence_scale * shares["divergence"]
        if distill_weight > 0:
            share = share + distill_weight * shares["distill"]
        return share * poison, out
    return loss


def _metrics_share(out: dict, totals: tuple, accum: int) -> dict:
    """The micro-batch's share of each step metric. ``totals``: (scored tokens, untargeted positions) of the
    whole batch: CE and the distillation are means over tokens, the divergence a mean over micro-batches."""
    total_tokens, total_untargeted = totals
    share = {"ce": out["ce"] * out["tokens"] / total_tokens,
             "divergence": out["divergence"] / accum,
             "divergence_per_layer": out["divergence_per_layer"] / accum,
             "merge_weight_per_layer": out["merge_weight_per_layer"] / accum}
    if "distill" in out:
        share["distill"] = out["distill"] * out["distill_tokens"] / total_untargeted
    return share


def frozen_for_forward(config: ModelConfig, frozen: dict) -> dict:
    """The frozen leaves as the forward reads them: with ``model.frozen_matmul: fp8 | fp8_backward`` the block
    kernels are quantised to FP8 here, once per step (a read of the frozen weights; the same values every step)."""
    if config.frozen_matmul == "compute":
        return frozen
    return quantize_frozen_kernels(frozen, forward=config.frozen_matmul == "fp8")


def loss_and_grads(config: ModelConfig, trainable: dict, frozen: dict, batch: dict, accum: int, poison,
                   lora_rng=None, divergence_scale=1.0, distill_weight: float = 0.0):
    """(metrics, gradients w.r.t. ``trainable``) summed over ``accum`` micro-batches, gradients in fp32.
    ``lora_rng``: the step's LoRA dropout key (None: no dropout), folded with the micro-batch index.
    ``divergence_scale``: the λ schedule's factor at this step (metrics keep the unscaled divergence).
    ``distill_weight``: ``train.distill_weight`` (> 0 adds the KL from the base on untargeted tokens; metric
    ``distill``)."""
    totals = (jnp.maximum(scored_tokens(batch), 1.0),
              jnp.maximum(untargeted_tokens(batch), 1.0) if distill_weight > 0 else None)
    frozen = frozen_for_forward(config, frozen)
    grad_fn = jax.grad(_micro_loss(config, totals, accum, poison, divergence_scale, distill_weight), has_aux=True)
    if accum == 1:
        grads, out = grad_fn(trainable, frozen, batch, lora_rng)
        return _metrics_share(out, totals, 1), grads

    micro = split_micro_batches(batch, accum)

    def body(carry, xs):
        grad_sum, metric_sum = carry
        micro_batch, index = xs
        rng = None if lora_rng is None else jax.random.fold_in(lora_rng, index)
        grads, out = grad_fn(trainable, frozen, micro_batch, rng)
        grad_sum = jax.tree.map(lambda s, g: s + g.astype(jnp.float32), grad_sum, grads)
        metric_sum = jax.tree.map(jnp.add, metric_sum, _metrics_share(out, totals, accum))
        return (grad_sum, metric_sum), None

    zeros = jax.tree.map(lambda x: jnp.zeros(x.shape, jnp.float32), trainable)
    n = len(controlled_indices(config))
    metric_zeros = {"ce": jnp.float32(0), "divergence": jnp.float32(0),
                    "divergence_per_layer": jnp.zeros((n,), jnp.float32),
                    "merge_weight_per_layer": jnp.zeros((n,), jnp.float32)}
    if distill_weight > 0:
        metric_zeros["distill"] = jnp.float32(0)
    (grads, metrics), _ = jax.lax.scan(body, (zeros, metric_zeros), (micro, jnp.arange(accum)))
    return metrics, grads


# ----------------------------------------------------------------------------------------------
# Step functions
# ----------------------------------------------------------------------------------------------

LORA_DROPOUT_STREAM = 2   # fold_in index off the run seed (train/setup.py: 1 initialises expansions and adapters)


def lora_dropout_rng(config: ModelConfig, train: TrainConfig, step: jax.Array):
    """The LoRA dropout key of training step ``step`` (deterministic from ``train.seed``: a resumed run draws the
    same masks), or None when the model has no LoRA dropout."""
    if config.lora is None or config.lora.dropout == 0:
        return None
    return jax.random.fold_in(jax.random.fold_in(jax.random.key(train.seed), LORA_DROPOUT_STREAM), step)


def divergence_scale(train: TrainConfig, step: jax.Array) -> jax.Array:
    """The λ schedule: 1 at the first step, ``train.divergence_scale_end`` at the last, linear in between
    (by batches consumed, so a resumed run continues the same schedule)."""
    progress = jnp.clip(step.astype(jnp.float32) / max(train.steps - 1, 1), 0.0, 1.0)
    return 1.0 + (train.divergence_scale_end - 1.0) * progress


def train_step_fn(config: ModelConfig, train: TrainConfig, tx: optax.GradientTransformation,
                  schedule: Callable, mesh, rules: dict) -> Callable:
    """The un-jitted step: (state, frozen, batch) -> (new state, metrics)."""
    accum = train.grad_accum
    inject = train.inject_nan_at_step

    def step(state: TrainState, frozen: dict, batch: dict):
        with activation_sharding(mesh, rules):
            poison = jnp.float32(1.0)
            if inject >= 0:  # testing aid: this step's loss (and so its gradients) become NaN
                poison = jnp.where(state.step + 1 == inject, jnp.float32(jnp.nan), poison)
            scale = divergence_scale(train, state.step)
            metrics, grads = loss_and_grads(config, state.trainable, frozen, batch, accum, poison,
                                            lora_dropout_rng(config, train, state.step), scale,
                                            train.distill_weight)
        loss = (metrics["ce"] + scale * metrics["divergence"] + train.distill_weight * metrics.get("distill", 0.0))
        loss = loss * poison
        grad_norm = optax.global_norm(grads)
        # A non-finite loss or gradient leaves weights and optimizer untouched (the loop decides whether
        # to stop or to skip); the batch still counts as consumed. A cond, not a select over the results:
        # the update then runs in place on the donated state, without reading old and new copies of every
        # master weight and moment (~10 ms per step for the 8B recipe's 1.7B trainable parameters).
        finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)

        def update(operands):
            trainable, opt_state, grads = operands
            updates, opt_state = tx.update(grads, opt_state, trainable)
            return optax.apply_updates(trainable, updates), opt_state

        trainable, opt_state = jax.lax.cond(finite, update, lambda operands: operands[:2],
                                            (state.trainable, state.opt_state, grads))
        new_state = TrainState(state.step + 1, trainable, opt_state)
        metrics = {**metrics, "loss": loss, "grad_norm": grad_norm, "lr": schedule(applied_updates(state)),
                   "divergence_scale": scale, "finite": finite}
        return new_state, metrics

    return step


def applied_updates(state: TrainState) -> jax.Array:
    """How many updates the optimizer has applied: its schedule's step, which lags ``state.step`` (batches
    consumed) by the number of skipped non-finite steps. The logged lr is the one this step uses."""
    counts = [c for path, c in optax.tree_utils.tree_get_all_with_path(state.opt_state, "count")
              if "ScaleBySchedule" in str(path)]
    return counts[0] if counts else state.step


def jit_train_step(step: Callable, shardings: TrainShardings) -> Callable:
    return jax.jit(step, in_shardings=(shardings.state, shardings.frozen, shardings.batch),
                   out_shardings=(shardings.state, shardings.replicated), donate_argnums=(0,))


def eval_step_fn(config: ModelConfig, mesh, rules: dict) -> Callable:
    """(trainable, frozen, batch) -> metrics of the loss (no gradients)."""
    def evaluate(trainable: dict, frozen: dict, batch: dict):
        with activation_sharding(mesh, rules):
            out = controlllm_loss(config, combine(trainable, frozen_for_forward(config, frozen)), batch)
        return {"loss": out["total"], "ce": out["ce"], "divergence": out["divergence"], "tokens": out["tokens"]}
    return evaluate


def jit_eval_step(evaluate: Callable, shardings: TrainShardings) -> Callable:
    return jax.jit(evaluate, in_shardings=(shardings.trainable, shardings.frozen, shardings.batch),
                   out_shardings=shardings.replicated)
