"""How a knowledge circuit evolves over training checkpoints.

For each checkpoint: EAP(-IG) scores on the prompt pairs, the top-n circuit, its faithfulness and Hit@k
(and the full model's Hit@k), edge entropy, the per-layer edge activation ratio, the class of every head in
the circuit (mover / relation / mixture, see heads.py) and the logit lens of the target token. Across
checkpoints: node and edge Jaccard similarity with the final checkpoint's circuit, and the *phase change*:
the first checkpoint from which the edge Jaccard similarity with the final circuit stays at or above
``stable_jaccard`` (the circuit's topology has formed; later training only tunes it).
"""
from __future__ import annotations

import gc
from dataclasses import asdict, dataclass, field
from typing import Callable, Iterable, Optional

import numpy as np

from jax_controlllm.circuits.attribute import attribute
from jax_controlllm.circuits.checkpoints import checkpoint_refs
from jax_controlllm.circuits.circuit import Circuit, top_n_circuit
from jax_controlllm.circuits.evaluate import evaluate_circuit, hit_at_k
from jax_controlllm.circuits.graph import Graph
from jax_controlllm.circuits.heads import classify_heads, head_dla
from jax_controlllm.circuits.lens import logit_lens
from jax_controlllm.circuits.nodes import circuit_model


@dataclass
class EvolutionSettings:
    top_n: int = 200
    method: str = "EAP-IG"
    ig_steps: int = 5
    batch_size: int = 16              # the reference's batch (normalisation); computation chunks the same
    hit_k: int = 10
    head_threshold: float = 0.6
    stable_jaccard: float = 0.7
    dtype: str = "float32"


@dataclass
class CheckpointAnalysis:
    name: str
    n_edges: int
    n_nodes: int
    edge_entropy: Optional[float]
    faithfulness: float
    metric_clean: float
    metric_corrupted: float
    metric_circuit: float
    hit_at_k: Optional[float]                 # the circuit's (None for an empty circuit)
    model_hit_at_k: float                     # the full model's
    layer_activation_ratio: list              # per block (then logits): circuit edges / valid edges into it
    head_classes: dict                        # head name -> {"class", "subject_share", "relation_share"}
    lens_probability: list                    # per block: mean target probability (logit lens)
    lens_top1: list                           # per block: fraction of prompts with the target ranked first
    nodes: list = field(repr=False)
    edges: list = field(repr=False)


@dataclass
class Evolution:
    settings: EvolutionSettings
    checkpoints: list                         # CheckpointAnalysis, in training order
    node_jaccard: list                        # with the final checkpoint's circuit
    edge_jaccard: list
    phase_change: int                         # index of the checkpoint where the topology has formed

    def to_dict(self) -> dict:
        return {"settings": asdict(self.settings), "phase_change": self.phase_change,
                "phase_change_checkpoint": self.checkpoints[self.phase_change].name,
                "node_jaccard": self.node_jaccard, "edge_jaccard": self.edge_jaccard,
                "checkpoints": [asdict(c) for c in self.checkpoints]}


def jaccard(a: Iterable, b: Iterable) -> float:
    a, b = set(a), set(b)
    return 1.0 if not a and not b else len(a & b) / len(a | b)


def layer_activation_ratio(circuit: Circuit) -> list:
    """For each block (and finally the logits): the fraction of the edges into it that are in the circuit."""
    graph: Graph = circuit.graph
    layer = np.broadcast_to(graph.destination_layer[None, :], graph.valid.shape)
    ratios = []
    for l in range(graph.n_layers + 1):
        valid = graph.valid & (layer == l)
        ratios.append(float((circuit.edge_mask & valid).sum() / max(valid.sum(), 1)))
    return ratios


def phase_change(edge_jaccard: list, stable: float) -> int:
    """First index from which every later value is >= stable (the last index at worst)."""
    index = len(edge_jaccard) - 1
    while index > 0 and edge_jaccard[index - 1] >= stable:
        index -= 1
    return index


def analyze_checkpoint(name: str, config, params, pairs, settings: EvolutionSettings) -> CheckpointAnalysis:
    """Everything for one checkpoint; ``pairs`` is a knowledge.PromptPairs (or anything with ``args()``,
    ``subject_mask()`` and ``relation_mask()``)."""
    s = settings
    model = circuit_model(config, params, s.dtype)
    args = pairs.args()
    clean_ids, _, clean_labels, _, lengths = args
    scores = attribute(config, model, *args, method=s.method, ig_steps=s.ig_steps, batch_size=s.batch_size,
                       dtype=s.dtype)
    circuit = top_n_circuit(scores, s.top_n)
    evaluation = evaluate_circuit(config, model, circuit, *args, batch_size=s.batch_size, dtype=s.dtype)
    circuit_hits = None
    if not circuit.is_empty:
        circuit_hits = hit_at_k(config, model, circuit, clean_ids, clean_labels, lengths, s.hit_k, s.batch_size,
                                s.dtype)[0]
    model_hits = hit_at_k(config, model, None, clean_ids, clean_labels, lengths, s.hit_k, s.batch_size, s.dtype)[0]
    dla = head_dla(config, model, clean_ids, clean_labels, lengths, s.batch_size, s.dtype)
    head_names = [n for n, is_head in zip(model.graph.sources, model.graph.is_head) if is_head]
    classes = classify_heads(dla, pairs.subject_mask(), pairs.relation_mask(), s.head_threshold)
    in_circuit = set(circuit.nodes)
    head_classes = {n: c for n, c in zip(head_names, classes) if n in in_circuit}
    lens = logit_lens(config, model, clean_ids, clean_labels, lengths, s.batch_size, s.dtype)
    return CheckpointAnalysis(
        name=name, n_edges=circuit.n_edges, n_nodes=circuit.n_nodes, edge_entropy=circuit.entropy,
        faithfulness=evaluation.faithfulness, metric_clean=evaluation.metric_clean,
        metric_corrupted=evaluation.metric_corrupted, metric_circuit=evaluation.metric_circuit,
        hit_at_k=circuit_hits, model_hit_at_k=model_hits, layer_activation_ratio=layer_activation_ratio(circuit),
        head_classes=head_classes, lens_probability=lens.probability.mean(0).tolist(),
        lens_top1=(lens.rank == 0).mean(0).tolist(), nodes=circuit.nodes, edges=circuit.edges)


def analyze_evolution(checkpoints: Iterable, pairs, settings: EvolutionSettings = EvolutionSettings(),
                      progress: Optional[Callable[[str], None]] = None) -> Evolution:
    """Analyse a series of checkpoints (oldest first; see checkpoints.checkpoint_refs for what an item may be).
    ``pairs`` may also be a function (config -> pairs), e.g. to re-tokenise per checkpoint."""
    analyses = []
    for ref in checkpoint_refs(checkpoints, settings.dtype):
        if progress:
            progress(f"analysing {ref.name}")
        config, params = ref.load()
        prompt_pairs = pairs(config) if callable(pairs) else pairs
        analyses.append(analyze_checkpoint(ref.name, config, params, prompt_pairs, settings))
        del params
        gc.collect()
    final = analyses[-1]
    nodes = [jaccard(a.nodes, final.nodes) for a in analyses]
    edges = [jaccard(a.edges, final.edges) for a in analyses]
    return Evolution(settings, analyses, nodes, edges, phase_change(edges, settings.stable_jaccard))
