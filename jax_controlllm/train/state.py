"""Training state: the trainable/frozen split of the parameters, the optimizer, and the state pytree.

Only trainable leaves get fp32 master weights, gradients and AdamW moments; the frozen base (most of the
model in Control LLM) stays in the compute dtype and is passed to the step separately, never donated or
updated. Both halves are nested dicts shaped like the full parameter tree with the other half's leaves
left out, so ``combine(trainable, frozen)`` is just a deep merge and checkpoints keep the familiar paths.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable

import jax
import jax.numpy as jnp
import optax

from jax_controlllm.config import TrainConfig

# ----------------------------------------------------------------------------------------------
# Trainable / frozen split
# ----------------------------------------------------------------------------------------------

def partition(params: dict, mask: dict) -> tuple[dict, dict]:
    """(trainable, frozen): two nested dicts holding the leaves where ``mask`` is True / False."""
    trainable, frozen = {}, {}
    for key, value in params.items():
        if isinstance(value, dict):
            t, f = partition(value, mask[key])
            if t:
                trainable[key] = t
            if f:
                frozen[key] = f
        elif mask[key]:
            trainable[key] = value
        else:
            frozen[key] = value
    return trainable, frozen


def combine(a: dict, b: dict) -> dict:
    """Deep merge of two dicts with disjoint leaves (the inverse of ``partition``)."""
    out = dict(a)
    for key, value in b.items():
        if key in out:
            if not (isinstance(out[key], dict) and isinstance(value, dict)):
                raise ValueError(f"combine: leaf {key!r} is in both trees")
            out[key] = combine(out[key], value)
        else:
            out[key] = value
    return out


def count_params(tree) -> int:
    return sum(int(x.size) for x in jax.tree.leaves(tree))


# ----------------------------------------------------------------------------------------------
# Optimizer: AdamW with warm-up + cosine decay, global-norm clipping (the paper's recipe by default)
# ----------------------------------------------------------------------------------------------

def learning_rate_schedule(train: TrainConfig) -> Callable:
    """Linear warm-up from 0 to ``lr`` over ``warmup_steps``, then cosine decay to ``min_lr`` at ``steps``."""
    warmup = min(train.warmup_steps, max(train.steps - 1, 0))
    return optax.warmup_cosine_decay_schedule(init_value=0.0, peak_value=train.lr, warmup_steps=warmup,
                                              decay_steps=max(train.steps, warmup + 1), end_value=train.min_lr)


def weight_decay_mask(params) -> Any:
    """Decay matrices (kernels, embeddings, LoRA adapters) only; norms, biases and merge factors are not decayed,
    as in Hugging Face's Trainer, which the paper used (and PEFT's LoRA runs under)."""
    def decays(path, _):
        return getattr(path[-1], "key", None) in ("kernel", "embedding", "lora_a", "lora_b")
    return jax.tree_util.tree_map_with_path(decays, params)


def make_optimizer(train: TrainConfig) -> optax.GradientTransformation:
    schedule = learning_rate_schedule(train)
    adamw = optax.adamw(schedule, b1=train.adam_b1, b2=train.adam_b2, eps=train.adam_eps,
                        weight_decay=train.weight_decay, mask=weight_decay_mask)
    if train.clip_grad_norm > 0:
        return optax.chain(optax.clip_by_global_norm(train.clip_grad_norm), adamw)
    return adamw


# ----------------------------------------------------------------------------------------------
# The state pytree
# ----------------------------------------------------------------------------------------------

@jax.tree_util.register_dataclass
@dataclasses.dataclass
class TrainState:
    """What the train step updates (and donates): batches consumed, trainable weights, optimizer state."""
    step: jax.Array          # int32 scalar: number of completed steps (= batches consumed)
    trainable: dict          # fp32 master weights of the trainable leaves
    opt_state: Any           # optax state over ``trainable``

    def replace(self, **changes) -> "TrainState":
        return dataclasses.replace(self, **changes)


def new_state(trainable: dict, opt_state, step: int = 0) -> TrainState:
    return TrainState(jnp.asarray(step, jnp.int32), trainable, opt_state)
