"""Edge attribution scores by EAP and EAP-IG.

With a_u the output of source u, delta_u = a_u(corrupted) - a_u(clean) and x_v the input of destination v,

    EAP:     S[u, v] = sum_i w_i sum_{t,d} delta_u[i,t,d] * dL_i/dx_v[i,t,d]                (clean run)
    EAP-IG:  the gradient is averaged over the clean tokens run with the input embedding replaced by
             e_k = e_corr + (k/m) (e_clean - e_corr), k = 1..m (a right Riemann sum: clean point included)

where L_i = -(logit[c_i] - logit[k_i]) at the last real position and w_i the item weight (see
batching.item_weights: by default the reference's 1 / (N * |batch|)). A positive score means replacing the
edge's clean contribution by its corrupted one is predicted to lower the logit difference.

Controlled blocks hold their merge coefficients at the clean run's values in every run (nodes.py).

Implementation: one jitted step per fixed-shape chunk runs the clean and corrupted prompts (delta), then
m forward+backward passes in a ``fori_loop`` (memory stays that of one pass). Every destination's input
carries a zero-valued tap whose gradient is the score (readers.tap), so the backward pass itself contracts
the destination gradients with the deltas of all their sources: no per-edge loop.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from functools import partial
from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np

from jax_controlllm.circuits.batching import chunks, item_weights, prepare
from jax_controlllm.circuits.graph import Graph
from jax_controlllm.circuits.nodes import RunOutput, circuit_model, last_position, logit_difference, model_graph, run
from jax_controlllm.circuits.readers import PlainReader, TapReader, assemble_scores, tap_coefficients, tap_deltas
from jax_controlllm.config import ModelConfig
from jax_controlllm.model.stack import embed

METHODS = ("EAP", "EAP-IG")


@dataclass
class Scores:
    """Edge scores of one attribution run. ``matrix[u, v]`` is the score of edge sources[u] -> destinations[v]
    (0 where there is no edge, see ``valid``)."""
    graph: Graph
    matrix: np.ndarray                      # [n_src, n_dst] float32
    method: str
    ig_steps: int
    normalization: str
    n_items: int
    metric_clean_per_item: np.ndarray = field(repr=False)       # [N] logit difference on the clean prompts
    metric_corrupted_per_item: np.ndarray = field(repr=False)   # [N] on the corrupted prompts, same labels

    @property
    def sources(self) -> tuple[str, ...]:
        return self.graph.sources

    @property
    def destinations(self) -> tuple[str, ...]:
        return self.graph.destinations

    @property
    def valid(self) -> np.ndarray:
        return self.graph.valid

    @property
    def metric_clean(self) -> float:
        return float(np.mean(self.metric_clean_per_item))

    @property
    def metric_corrupted(self) -> float:
        return float(np.mean(self.metric_corrupted_per_item))

    def edges(self) -> dict[str, float]:
        """{"src->dst": score} for every valid edge, in the reference's edge order."""
        src, dst = np.nonzero(self.valid)
        order = np.argsort(self.graph.edge_order[src, dst])
        return {self.graph.edge_name(s, d): float(self.matrix[s, d]) for s, d in zip(src[order], dst[order])}

    def save(self, path) -> None:
        np.savez(path, matrix=self.matrix, sources=np.array(self.sources), destinations=np.array(self.destinations),
                 valid=self.valid, n_heads=self.graph.n_heads, block_kinds=np.array(self.graph.block_kinds),
                 method=self.method, ig_steps=self.ig_steps, normalization=self.normalization,
                 n_items=self.n_items, metric_clean_per_item=self.metric_clean_per_item,
                 metric_corrupted_per_item=self.metric_corrupted_per_item)

    @classmethod
    def load(cls, path) -> "Scores":
        d = np.load(path)
        graph = Graph(int(d["n_heads"]), tuple(str(k) for k in d["block_kinds"]))
        return cls(graph, d["matrix"], str(d["method"]), int(d["ig_steps"]), str(d["normalization"]),
                   int(d["n_items"]), d["metric_clean_per_item"], d["metric_corrupted_per_item"])


def plain_run(config: ModelConfig, weights: dict, ids: jax.Array, held: Optional[dict] = None) -> RunOutput:
    return run(config, weights, embed(config, weights, ids), PlainReader(), held)


@partial(jax.jit, static_argnames=("config", "method", "ig_steps"))
def attribution_step(config: ModelConfig, weights: dict, clean_ids, corrupted_ids, labels, last, item_weight,
                     method: str = "EAP-IG", ig_steps: int = 5):
    """One chunk: (score contribution [n_src, n_dst], clean LD [B], corrupted LD [B])."""
    graph = model_graph(config)
    clean = plain_run(config, weights, clean_ids)
    held = jax.lax.stop_gradient(clean.merges)
    corrupted = plain_run(config, weights, corrupted_ids, held)
    ld_clean = logit_difference(config, weights, last_position(clean.resid, last), labels)
    ld_corrupted = logit_difference(config, weights, last_position(corrupted.resid, last), labels)
    delta = jax.lax.stop_gradient(tap_deltas(corrupted, clean))
    coeffs = tap_coefficients(graph)

    def loss(coeffs, embeds):
        out = run(config, weights, embeds, TapReader(graph, coeffs, delta), held)
        ld = logit_difference(config, weights, last_position(out.resid, last), labels)
        return -jnp.sum(item_weight * ld)

    grad = jax.grad(loss)
    e_clean, e_corrupted = embed(config, weights, clean_ids), embed(config, weights, corrupted_ids)
    if method == "EAP":
        pieces = grad(coeffs, e_clean)
    else:
        def ig_step(k, total):
            alpha = (k + 1).astype(jnp.float32) / ig_steps
            e = (e_corrupted.astype(jnp.float32)
                 + alpha * (e_clean.astype(jnp.float32) - e_corrupted.astype(jnp.float32))).astype(e_clean.dtype)
            return jax.tree.map(jnp.add, total, grad(coeffs, e))

        total = jax.lax.fori_loop(0, ig_steps, ig_step, jax.tree.map(jnp.zeros_like, coeffs))
        pieces = jax.tree.map(lambda g: g / ig_steps, total)
    return assemble_scores(graph, pieces), ld_clean, ld_corrupted


def matmul_precision(dtype: str, precision: Optional[str] = None):
    """The matmul precision for a run: ``precision`` if given ("default", "high", "highest"), else exact float32
    matmuls for float32 runs (no TF32 on GPUs, so scores match the reference) and the default otherwise."""
    if precision is None:
        precision = "highest" if jnp.dtype(dtype) == jnp.float32 else None
    return jax.default_matmul_precision(precision) if precision else contextlib.nullcontext()


def attribute(config, params, clean_ids, corrupted_ids, clean_label_ids, corrupted_label_ids, lengths=None,
              method: str = "EAP-IG", ig_steps: int = 5, batch_size: int = 16, normalization: str = "dkc",
              compute_batch_size: Optional[int] = None, dtype: str = "float32", pad_multiple: int = 8,
              precision: Optional[str] = None) -> Scores:
    """Edge scores for prompt pairs (see the module docstring).

    clean_ids, corrupted_ids: [N, T] right-padded token ids, pairs of equal length; lengths: [N] real lengths
    (None: all T). Labels: one token id per prompt (the answer's first token). ``batch_size`` is the batch of
    the reference code's mean-over-batch metric and so matters for ``normalization="dkc"``; the chunk actually
    computed at once is ``compute_batch_size`` (default: batch_size), which never changes the result.
    ``params``: our parameter tree (any model the trainer makes), a dict of Hugging Face tensors, or a
    CircuitModel. ``dtype``: the compute
    dtype (float32 or bfloat16); ``precision``: matmul precision (see ``matmul_precision``).
    """
    if method not in METHODS:
        raise ValueError(f"method {method!r} is not one of {', '.join(METHODS)}")
    if method == "EAP-IG" and ig_steps < 1:
        raise ValueError(f"ig_steps must be at least 1, got {ig_steps}")
    model = circuit_model(config, params, dtype)
    prompts = prepare(clean_ids, corrupted_ids, clean_label_ids, corrupted_label_ids, lengths,
                      model.config.vocab_size)
    if prompts.corrupted is None:
        raise ValueError("corrupted_ids: attribution needs corrupted prompts (delta = corrupted - clean)")
    weights = item_weights(prompts.n_items, batch_size, normalization)
    steps = ig_steps if method == "EAP-IG" else 1
    total, metrics = None, []
    with matmul_precision(dtype, precision):
        # results stay on the device until the end: chunks are dispatched back to back, no host round trip
        for chunk in chunks(prompts, weights, compute_batch_size or batch_size, pad_multiple):
            part, ld_c, ld_k = attribution_step(model.config, model.weights, chunk["clean"], chunk["corrupted"],
                                                chunk["labels"], chunk["last"], chunk["weight"], method, steps)
            total = part if total is None else total + part
            metrics.append((chunk["items"], ld_c, ld_k))
    clean_ld, corrupted_ld = np.zeros(prompts.n_items), np.zeros(prompts.n_items)
    for items, ld_c, ld_k in metrics:
        clean_ld[items] = np.asarray(ld_c)[:len(items)]
        corrupted_ld[items] = np.asarray(ld_k)[:len(items)]
    matrix = np.where(model.graph.valid, np.asarray(total, np.float32), np.float32(0))
    return Scores(model.graph, matrix, method, steps, normalization, prompts.n_items, clean_ld, corrupted_ld)
