"""Circuit evaluation by edge patching: faithfulness and Hit@k.

Each destination reads ``x_v = sum_{u->v in circuit} a_u(this run) + sum_{u->v not in circuit} a_u(reference)``
on the clean prompts; patches propagate, since a_u(this run) comes from the patched run itself.

- Faithfulness: reference = the corrupted run;
  faithfulness = (mean LD_circuit - mean LD_corrupted) / (mean LD_clean - mean LD_corrupted).
  An empty circuit (no edge reaches the logits) gives the corrupted run, i.e. 0.
- Hit@k: no corrupted run, edges outside the circuit are ablated; the rank of the clean label among the
  full-vocabulary logits at the last real position (0 = top); Hit@k = fraction with rank < k.
  ``ablation="zero"`` (the knowledge-circuits code): an ablated edge carries 0.
  ``ablation="mean"``: an ablated edge carries its source's mean output over the evaluated clean prompts at the
  same position (each position averaged over the prompts that reach it). Zero is far off the distribution of
  a modern LLM's residual stream (the first MLPs write large constant features, e.g. at the BOS position, that
  later attention relies on); the mean keeps what every prompt shares and removes what is prompt-specific, so
  it measures whether the circuit carries the *knowledge* rather than whether it carries the whole stream.

Controlled blocks hold their merge coefficients at the clean run's values in the corrupted and patched runs
(nodes.py), so that all edges give the clean run and no edge the corrupted run exactly.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from functools import partial
from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np

from jax_controlllm.circuits.attribute import matmul_precision, plain_run
from jax_controlllm.circuits.batching import chunks, prepare
from jax_controlllm.circuits.circuit import Circuit
from jax_controlllm.circuits.nodes import (
    RunOutput,
    circuit_model,
    final_logits,
    last_position,
    logit_difference,
    model_graph,
    run,
)
from jax_controlllm.circuits.readers import PatchReader
from jax_controlllm.config import ModelConfig
from jax_controlllm.model.stack import embed


@dataclass
class CircuitEvaluation:
    faithfulness: float
    metric_circuit: float            # mean logit difference with the circuit (clean prompts, patched)
    metric_clean: float
    metric_corrupted: float
    circuit_per_item: np.ndarray = field(repr=False)
    clean_per_item: np.ndarray = field(repr=False)
    corrupted_per_item: np.ndarray = field(repr=False)

    def to_dict(self) -> dict:
        return {"faithfulness": self.faithfulness, "metric_circuit": self.metric_circuit,
                "metric_clean": self.metric_clean, "metric_corrupted": self.metric_corrupted}


@partial(jax.jit, static_argnames=("config",))
def patched_logit_difference(config: ModelConfig, weights: dict, clean_ids, corrupted_ids, keep, labels, last):
    """(LD with the circuit, LD clean, LD corrupted), each [B]."""
    clean = plain_run(config, weights, clean_ids)
    corrupted = plain_run(config, weights, corrupted_ids, clean.merges)
    reader = PatchReader(model_graph(config), keep, corrupted)
    patched = run(config, weights, embed(config, weights, clean_ids), reader, clean.merges)
    return tuple(logit_difference(config, weights, last_position(r.resid, last), labels)
                 for r in (patched, clean, corrupted))


ABLATIONS = ("zero", "mean")


@partial(jax.jit, static_argnames=("config",))
def _node_output_sums(config: ModelConfig, weights: dict, ids, last, weight):
    """Each node output as read (reads, raw_heads) summed over the chunk's real items at each position it
    reaches ([n, 1, T, D] per group), and how many items reach each position [T]."""
    out = plain_run(config, weights, ids)
    reach = (weight[:, None] > 0) & (jnp.arange(ids.shape[1])[None] <= last[:, None])
    m = reach.astype(jnp.float32)[None, :, :, None]
    sums = jax.tree.map(lambda x: jnp.sum(x * m.astype(x.dtype), axis=1, keepdims=True), (out.reads, out.raw_heads))
    return sums, reach.sum(axis=0)


def mean_reference(config: ModelConfig, weights: dict, prompts, batch_size: int) -> RunOutput:
    """The reference of ``ablation="mean"``: node outputs averaged over the clean prompts per position, with a
    batch axis of 1 (``broadcast_reference`` widens it). The chunks are those the evaluation uses."""
    sums, counts = None, 0
    for chunk in chunks(prompts, np.ones(prompts.n_items), batch_size):
        s, c = _node_output_sums(config, weights, chunk["clean"], chunk["last"], chunk["weight"])
        sums, counts = (s, c) if sums is None else (jax.tree.map(jnp.add, sums, s), counts + c)
    scale = 1.0 / jnp.maximum(counts, 1).astype(jnp.float32)[None, None, :, None]
    reads, raw_heads = jax.tree.map(lambda x: x * scale.astype(x.dtype), sums)
    return RunOutput(reads, raw_heads, {}, None, [])


def broadcast_reference(reference: Optional[RunOutput], batch: int) -> Optional[RunOutput]:
    if reference is None:
        return None
    widen = lambda x: jnp.broadcast_to(x, x.shape[:1] + (batch,) + x.shape[2:])   # noqa: E731
    return RunOutput(jax.tree.map(widen, reference.reads), jax.tree.map(widen, reference.raw_heads), {}, None, [])


def _reference_for(ablation: str, config, weights, prompts, batch_size: int) -> Optional[RunOutput]:
    if ablation not in ABLATIONS:
        raise ValueError(f"ablation {ablation!r} is not one of {', '.join(ABLATIONS)}")
    return mean_reference(config, weights, prompts, batch_size) if ablation == "mean" else None


@partial(jax.jit, static_argnames=("config", "ablate"))
def label_ranks(config: ModelConfig, weights: dict, ids, keep, label, last, ablate: bool = True,
                reference: Optional[RunOutput] = None):
    """Rank (0 = best) of ``label`` among the logits at the last real position, [B]; ``ablate``: edges outside
    ``keep`` ablated (to ``reference``, batch axis 1, or zero), else the full model."""
    out = plain_run(config, weights, ids)
    if ablate:
        reader = PatchReader(model_graph(config), keep, broadcast_reference(reference, ids.shape[0]))
        out = run(config, weights, embed(config, weights, ids), reader, out.merges)
    logits = final_logits(config, weights, last_position(out.resid, last))
    target = jnp.take_along_axis(logits, label[:, None], axis=1)
    return jnp.sum(logits > target, axis=1)


@partial(jax.jit, static_argnames=("config",))
def size_curve_step(config: ModelConfig, weights: dict, clean_ids, corrupted_ids, keeps, labels, last,
                    mean: RunOutput):
    """For a stack of circuits ``keeps`` [C, n_src, n_dst]: (patched LD [C, B], rank of the clean label with
    edges outside each circuit ablated [C, 2, B] (zero, then to ``mean``), clean LD [B], corrupted LD [B], the
    model's rank [B]). The clean and corrupted runs are computed once for all circuits."""
    graph = model_graph(config)
    mean = broadcast_reference(mean, clean_ids.shape[0])
    clean = plain_run(config, weights, clean_ids)
    corrupted = plain_run(config, weights, corrupted_ids, clean.merges)
    embeds = embed(config, weights, clean_ids)

    def rank(resid):
        logits = final_logits(config, weights, last_position(resid, last))
        return jnp.sum(logits > jnp.take_along_axis(logits, labels[:, :1], axis=1), axis=1)

    def one(keep):
        patched = run(config, weights, embeds, PatchReader(graph, keep, corrupted), clean.merges)
        ranks = [rank(run(config, weights, embeds, PatchReader(graph, keep, reference), clean.merges).resid)
                 for reference in (None, mean)]
        return logit_difference(config, weights, last_position(patched.resid, last), labels), jnp.stack(ranks)

    lds, ranks = jax.lax.map(one, keeps)
    ld = [logit_difference(config, weights, last_position(r.resid, last), labels) for r in (clean, corrupted)]
    return lds, ranks, ld[0], ld[1], rank(clean.resid)


def size_curve(config, params, circuits: list, clean_ids, corrupted_ids, clean_label_ids, corrupted_label_ids,
               lengths=None, k: int = 10, batch_size: int = 16, dtype: str = "float32") -> dict:
    """Faithfulness and Hit@k of each circuit (e.g. the top-n circuits of a range of sizes) and the model's
    Hit@k, on the same prompts: {"faithfulness": [C], "hit_at_k": [C] (zero ablation; None for an empty
    circuit), "hit_at_k_mean": [C] (mean ablation), "model_hit_at_k", "metric_clean", "metric_corrupted",
    "model_ranks": [N]}."""
    model = circuit_model(config, params, dtype)
    for circuit in circuits:
        _check_graph(model.graph, circuit)
    prompts = prepare(clean_ids, corrupted_ids, clean_label_ids, corrupted_label_ids, lengths,
                      model.config.vocab_size)
    keeps = jnp.asarray(np.stack([c.edge_mask for c in circuits]), jnp.float32)
    n = prompts.n_items
    lds, ranks = np.zeros((len(circuits), n)), np.zeros((len(circuits), 2, n), np.int64)
    clean, corrupted, model_ranks = np.zeros(n), np.zeros(n), np.zeros(n, np.int64)
    with matmul_precision(dtype):
        mean = mean_reference(model.config, model.weights, prompts, batch_size)
        results = [(chunk["items"], size_curve_step(model.config, model.weights, chunk["clean"], chunk["corrupted"],
                                                    keeps, chunk["labels"], chunk["last"], mean))
                   for chunk in chunks(prompts, np.ones(n), batch_size)]
    for items, (ld, rank, ld_clean, ld_corrupted, model_rank) in results:
        m = len(items)
        lds[:, items], ranks[:, :, items] = np.asarray(ld)[:, :m], np.asarray(rank)[:, :, :m]
        clean[items], corrupted[items] = np.asarray(ld_clean)[:m], np.asarray(ld_corrupted)[:m]
        model_ranks[items] = np.asarray(model_rank)[:m]
    denominator = clean.mean() - corrupted.mean()
    if denominator == 0:
        raise ValueError("faithfulness is undefined: the clean and corrupted prompts give the same mean logit "
                         "difference; check that the corrupted prompts and labels differ from the clean ones")
    faith = [0.0 if c.is_empty else float((ld.mean() - corrupted.mean()) / denominator) for c, ld in zip(circuits, lds)]
    hits = [[None if c.is_empty else float(np.mean(r < k)) for c, r in zip(circuits, ranks[:, a])] for a in (0, 1)]
    return {"faithfulness": faith, "hit_at_k": hits[0], "hit_at_k_mean": hits[1],
            "model_hit_at_k": float(np.mean(model_ranks < k)),
            "metric_clean": float(clean.mean()), "metric_corrupted": float(corrupted.mean()),
            "model_ranks": model_ranks}


def evaluate_circuit(config, params, circuit: Circuit, clean_ids, corrupted_ids, clean_label_ids,
                     corrupted_label_ids, lengths=None, batch_size: int = 16, dtype: str = "float32",
                     pad_multiple: int = 8) -> CircuitEvaluation:
    """Faithfulness with all its parts (see the module docstring)."""
    model = circuit_model(config, params, dtype)
    _check_graph(model.graph, circuit)
    prompts = prepare(clean_ids, corrupted_ids, clean_label_ids, corrupted_label_ids, lengths,
                      model.config.vocab_size)
    if prompts.corrupted is None:
        raise ValueError("corrupted_ids: faithfulness needs the corrupted prompts")
    keep = jnp.asarray(circuit.edge_mask, jnp.float32)
    per_item = np.zeros((3, prompts.n_items))
    with matmul_precision(dtype):
        results = [(chunk["items"], patched_logit_difference(model.config, model.weights, chunk["clean"],
                                                             chunk["corrupted"], keep, chunk["labels"],
                                                             chunk["last"]))
                   for chunk in chunks(prompts, np.ones(prompts.n_items), batch_size, pad_multiple)]
    for items, lds in results:
        for row, ld in enumerate(lds):
            per_item[row, items] = np.asarray(ld)[:len(items)]
    circuit_ld, clean_ld, corrupted_ld = per_item
    if circuit.is_empty:  # as the reference: nothing reaches the logits, report the corrupted run
        circuit_ld = corrupted_ld.copy()
    clean, corrupted, patched = clean_ld.mean(), corrupted_ld.mean(), circuit_ld.mean()
    denominator = clean - corrupted
    if denominator == 0:
        raise ValueError("faithfulness is undefined: the clean and corrupted prompts give the same mean logit "
                         "difference; check that the corrupted prompts and labels differ from the clean ones")
    return CircuitEvaluation(float((patched - corrupted) / denominator), float(patched), float(clean),
                             float(corrupted), circuit_ld, clean_ld, corrupted_ld)


def faithfulness(config, params, circuit: Circuit, clean_ids, corrupted_ids, clean_label_ids, corrupted_label_ids,
                 lengths=None, batch_size: int = 16, dtype: str = "float32") -> float:
    """(mean LD_circuit - mean LD_corrupted) / (mean LD_clean - mean LD_corrupted); 1 = the circuit recovers the
    whole model's behaviour, 0 = none of it."""
    return evaluate_circuit(config, params, circuit, clean_ids, corrupted_ids, clean_label_ids,
                            corrupted_label_ids, lengths, batch_size, dtype).faithfulness


def hit_at_k(config, params, circuit: Optional[Circuit], clean_ids, clean_label_ids, lengths=None, k: int = 10,
             batch_size: int = 16, dtype: str = "float32", ablation: str = "zero") -> tuple[float, np.ndarray]:
    """(fraction of prompts whose clean label ranks in the top k, ranks [N]) with edges outside the circuit
    ablated (``ablation``: zero or mean, see the module docstring). ``circuit=None``: the full model."""
    model = circuit_model(config, params, dtype)
    if circuit is not None:
        _check_graph(model.graph, circuit)
        if circuit.is_empty:
            raise ValueError("hit_at_k: the circuit is empty (no edge reaches the logits); choose a larger n")
    prompts = prepare(clean_ids, None, clean_label_ids, None, lengths, model.config.vocab_size)
    keep = jnp.asarray(circuit.edge_mask if circuit is not None else model.graph.valid, jnp.float32)
    ranks = np.zeros(prompts.n_items, np.int64)
    with matmul_precision(dtype):
        reference = _reference_for(ablation, model.config, model.weights, prompts, batch_size)
        results = [(chunk["items"], label_ranks(model.config, model.weights, chunk["clean"], keep,
                                                chunk["labels"][:, 0], chunk["last"], circuit is not None,
                                                reference))
                   for chunk in chunks(prompts, np.ones(prompts.n_items), batch_size)]
    for items, r in results:
        ranks[items] = np.asarray(r)[:len(items)]
    return float(np.mean(ranks < k)), ranks


def _check_graph(graph, circuit: Circuit) -> None:
    if circuit.graph != graph:
        raise ValueError(f"the circuit was selected on a different graph ({circuit.graph.n_sources} sources, "
                         f"blocks {circuit.graph.block_kinds}) than this model's ({graph.n_sources} sources, "
                         f"blocks {graph.block_kinds})")
