"""How a knowledge circuit evolves over training checkpoints.

For each checkpoint: EAP(-IG) scores on the prompt pairs (timed: prompts/s), the top-n circuit (n a count
or a fraction of the graph's edges), its faithfulness and Hit@k (and the full model's Hit@k), the same two
for a range of circuit sizes (the *size curve*: the smallest faithful circuit), edge entropy, the per-layer
edge activation ratio, the class of every head in the circuit (mover / relation / mixture, see heads.py),
the logit lens of the target token and, given probes, the acquisition of each knowledge type (the first
answer token ranked first / in the top k by the full model). Across checkpoints: node and edge Jaccard
similarity with the final checkpoint's circuit, and the *phase change*: the first checkpoint from which the
edge Jaccard similarity with the final circuit stays at or above ``stable_jaccard`` (the circuit's topology
has formed; later training only tunes it).
"""
from __future__ import annotations

import gc
import time
from dataclasses import asdict, dataclass, field
from typing import Callable, Iterable, Optional

import numpy as np

from jax_controlllm.circuits.attribute import attribute
from jax_controlllm.circuits.checkpoints import checkpoint_refs
from jax_controlllm.circuits.circuit import Circuit, edge_count, top_n_circuit
from jax_controlllm.circuits.evaluate import hit_at_k, size_curve
from jax_controlllm.circuits.graph import Graph
from jax_controlllm.circuits.heads import classify_heads, head_dla
from jax_controlllm.circuits.lens import logit_lens
from jax_controlllm.circuits.nodes import circuit_model

# The paper's circuits keep 6.7% (TinyLlama-1.1B) to 25% (GPT-2 small) of the edges; 10% sits in that range
# for graphs of ~100k-1M edges (SmolLM2-135M: ~123k).
DEFAULT_TOP_N = 0.1
DEFAULT_CURVE = (0.005, 0.01, 0.02, 0.05, 0.1, 0.2)


@dataclass
class EvolutionSettings:
    top_n: float = DEFAULT_TOP_N      # edges kept before pruning: a count, or a fraction of the graph's edges
    curve: tuple = DEFAULT_CURVE      # circuit sizes (counts or fractions) of the size curve
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
    n_pairs: int
    graph_edges: int                          # edges of the whole graph
    n_edges: int                              # the circuit's, after pruning
    circuit_fraction: float                   # n_edges / graph_edges
    n_nodes: int
    edge_entropy: Optional[float]
    faithfulness: float
    metric_clean: float
    metric_corrupted: float
    hit_at_k: Optional[float]                 # the circuit's, other edges zero-ablated (None: empty circuit)
    hit_at_k_mean: Optional[float]            # the circuit's, other edges mean-ablated (evaluate.py)
    model_hit_at_k: float                     # the full model's
    size_curve: list                          # per size: requested, n_edges, fraction, faithfulness, hit_at_k,
                                              # hit_at_k_mean
    acquisition: dict                         # knowledge type -> {"n", "hit@1", "hit@k"} (full model, probes)
    attribution_seconds: float
    attribution_prompts_per_s: float
    layer_activation_ratio: list              # per block (then logits): circuit edges / valid edges into it
    head_classes: dict                        # head name -> {"class", "subject_share", "relation_share"}
    lens_probability: list                    # per block: mean target probability (logit lens)
    lens_top1: list                           # per block: fraction of prompts with the target ranked first
    nodes: list = field(repr=False)
    edges: list = field(repr=False)
    source: str = ""                          # where the checkpoint was loaded from (checkpoints.CheckpointRef)

    @classmethod
    def from_dict(cls, record: dict) -> "CheckpointAnalysis":
        """The inverse of ``asdict`` after a JSON round trip (evolution.json)."""
        return cls(**record)


@dataclass
class Evolution:
    settings: EvolutionSettings
    checkpoints: list                         # CheckpointAnalysis, in training order
    node_jaccard: list                        # with the final checkpoint's circuit
    edge_jaccard: list
    phase_change: int                         # index of the checkpoint where the topology has formed

    @classmethod
    def of(cls, settings: EvolutionSettings, analyses: list) -> "Evolution":
        """The cross-checkpoint summaries of ``analyses`` (oldest first; the last one is the reference)."""
        final = analyses[-1]
        nodes = [jaccard(a.nodes, final.nodes) for a in analyses]
        edges = [jaccard(a.edges, final.edges) for a in analyses]
        return cls(settings, list(analyses), nodes, edges, phase_change(edges, settings.stable_jaccard))

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


def acquisition_by_kind(config, model, probes, settings: EvolutionSettings) -> dict:
    """Per knowledge type of the probes (a PromptPairs' clean side: ``clean_ids``, ``clean_label_ids``,
    ``lengths``, ``clean`` queries with ``kind``): how often the full model ranks the answer's first token
    first (hit@1) and in the top k."""
    _, ranks = hit_at_k(config, model, None, probes.clean_ids, probes.clean_label_ids, probes.lengths,
                        settings.hit_k, settings.batch_size, settings.dtype)
    kinds = np.array([str(q.kind) for q in probes.clean])
    return {kind: {"n": int((kinds == kind).sum()), "hit@1": float(np.mean(ranks[kinds == kind] == 0)),
                   f"hit@{settings.hit_k}": float(np.mean(ranks[kinds == kind] < settings.hit_k))}
            for kind in sorted(set(kinds.tolist()))}


def analyze_checkpoint(name: str, config, params, pairs, settings: EvolutionSettings,
                       probes=None) -> CheckpointAnalysis:
    """Everything for one checkpoint; ``pairs`` is a knowledge.PromptPairs (or anything with ``args()``,
    ``subject_mask()`` and ``relation_mask()``); ``probes`` (optional, e.g. the pairs of every entity): for the
    acquisition per knowledge type."""
    s = settings
    model = circuit_model(config, params, s.dtype)
    args = pairs.args()
    clean_ids, _, clean_labels, _, lengths = args
    start = time.perf_counter()
    # all pairs in one chunk, padded to the longest prompt only: one compiled shape, no padded positions
    scores = attribute(config, model, *args, method=s.method, ig_steps=s.ig_steps, batch_size=s.batch_size,
                       compute_batch_size=len(lengths), dtype=s.dtype, pad_multiple=1)
    seconds = time.perf_counter() - start
    graph = model.graph
    sizes = sorted({edge_count(graph, n) for n in s.curve} | {edge_count(graph, s.top_n)})
    circuits = [top_n_circuit(scores, n) for n in sizes]
    curve = size_curve(config, model, circuits, *args, k=s.hit_k, batch_size=s.batch_size, dtype=s.dtype)
    chosen = sizes.index(edge_count(graph, s.top_n))
    circuit = circuits[chosen]
    dla = head_dla(config, model, clean_ids, clean_labels, lengths, s.batch_size, s.dtype)
    head_names = [n for n, is_head in zip(graph.sources, graph.is_head) if is_head]
    classes = classify_heads(dla, pairs.subject_mask(), pairs.relation_mask(), s.head_threshold)
    in_circuit = set(circuit.nodes)
    head_classes = {n: c for n, c in zip(head_names, classes) if n in in_circuit}
    lens = logit_lens(config, model, clean_ids, clean_labels, lengths, s.batch_size, s.dtype)
    return CheckpointAnalysis(
        name=name, n_pairs=len(lengths), graph_edges=graph.n_edges, n_edges=circuit.n_edges,
        circuit_fraction=circuit.n_edges / graph.n_edges, n_nodes=circuit.n_nodes, edge_entropy=circuit.entropy,
        faithfulness=curve["faithfulness"][chosen], metric_clean=curve["metric_clean"],
        metric_corrupted=curve["metric_corrupted"], hit_at_k=curve["hit_at_k"][chosen],
        hit_at_k_mean=curve["hit_at_k_mean"][chosen], model_hit_at_k=curve["model_hit_at_k"],
        size_curve=[{"requested": n, "n_edges": c.n_edges, "fraction": c.n_edges / graph.n_edges, "faithfulness": f,
                     "hit_at_k": h, "hit_at_k_mean": hm}
                    for n, c, f, h, hm in zip(sizes, circuits, curve["faithfulness"], curve["hit_at_k"],
                                              curve["hit_at_k_mean"])],
        acquisition={} if probes is None else acquisition_by_kind(config, model, probes, s),
        attribution_seconds=seconds, attribution_prompts_per_s=len(lengths) / seconds,
        layer_activation_ratio=layer_activation_ratio(circuit), head_classes=head_classes,
        lens_probability=lens.probability.mean(0).tolist(), lens_top1=(lens.rank == 0).mean(0).tolist(),
        nodes=circuit.nodes, edges=circuit.edges)


def analyze_evolution(checkpoints: Iterable, pairs, settings: EvolutionSettings = EvolutionSettings(),
                      progress: Optional[Callable[[str], None]] = None, probes=None, done: Iterable = (),
                      on_checkpoint: Optional[Callable[[Evolution], None]] = None) -> Evolution:
    """Analyse a series of checkpoints (oldest first; see checkpoints.checkpoint_refs for what an item may be).
    ``pairs`` and ``probes`` may also be functions (config -> pairs), e.g. to tokenise once a config is known.
    ``done``: analyses made earlier with the same settings and pairs; a checkpoint with the same name and
    (non-empty) source is taken from them instead of analysed again. ``on_checkpoint`` receives the evolution
    so far (its last checkpoint as the reference) after each checkpoint, e.g. to save partial results."""
    reusable = {(a.name, a.source): a for a in done if a.source}
    analyses = []
    for ref in checkpoint_refs(checkpoints, settings.dtype):
        analysis = reusable.get((ref.name, ref.source)) if ref.source else None
        if progress:
            progress(f"analysing {ref.name}" if analysis is None else f"{ref.name}: reusing the earlier analysis")
        if analysis is None:
            analysis = _analyze_ref(ref, pairs, probes, settings)
            if progress:
                progress(f"  {analysis.n_edges} edges ({analysis.circuit_fraction:.1%}), faithfulness "
                         f"{analysis.faithfulness:.3f}, EAP-IG {analysis.attribution_prompts_per_s:.2f} prompts/s, "
                         f"acquisition {analysis.acquisition}")
        analyses.append(analysis)
        if on_checkpoint:
            on_checkpoint(Evolution.of(settings, analyses))
    return Evolution.of(settings, analyses)


def _analyze_ref(ref, pairs, probes, settings: EvolutionSettings) -> CheckpointAnalysis:
    """Load one checkpoint, analyse it and let its weights go before the next one loads."""
    config, params = ref.load()
    prompt_pairs = pairs(config) if callable(pairs) else pairs
    probe_pairs = probes(config) if callable(probes) else probes
    analysis = analyze_checkpoint(ref.name, config, params, prompt_pairs, settings, probe_pairs)
    analysis.source = ref.source
    del params
    gc.collect()
    return analysis
