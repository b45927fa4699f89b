"""Circuits: the top-n edges by |score|, dead-node pruning, and the circuit's edge entropy.

Selection follows the reference code: rank the valid edges by |score| (ties broken by the reference's
edge order, as its stable sort does), keep n, then prune in two passes over the nodes
(input, a0.h0, ..., m0, ..., logits):
  1. backwards (skipping logits): a node with no surviving outgoing edge is dropped with its incoming edges;
  2. forwards: a node other than input with no surviving incoming edge is dropped with its outgoing edges.
logits is in the circuit iff it keeps an incoming edge. A circuit can therefore have fewer than n edges.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import numpy as np

from jax_controlllm.circuits.graph import Graph


@dataclass
class Circuit:
    graph: Graph
    edge_mask: np.ndarray            # [n_src, n_dst] bool
    node_mask: np.ndarray            # [n_src + 1] bool: the sources, then logits
    scores: Optional[np.ndarray]     # [n_src, n_dst] the scores it was selected from (for the entropy)
    n_requested: int

    @property
    def n_edges(self) -> int:
        return int(self.edge_mask.sum())

    @property
    def n_nodes(self) -> int:
        return int(self.node_mask.sum())

    @property
    def is_empty(self) -> bool:
        """No path reaches the logits (the reference then reports the corrupted run)."""
        return not self.node_mask[-1]

    @property
    def nodes(self) -> list[str]:
        return [name for name, kept in zip(self.graph.node_names, self.node_mask) if kept]

    @property
    def edges(self) -> list[str]:
        src, dst = np.nonzero(self.edge_mask)
        order = np.argsort(self.graph.edge_order[src, dst])
        return [self.graph.edge_name(s, d) for s, d in zip(src[order], dst[order])]

    @property
    def entropy(self) -> Optional[float]:
        """Shannon entropy of the circuit's normalised |edge scores| (None for an empty circuit)."""
        if self.scores is None or self.n_edges == 0:
            return None
        weights = np.abs(self.scores[self.edge_mask].astype(np.float64))
        if weights.sum() == 0:
            return None
        p = weights / weights.sum()
        p = p[p > 0]
        return float(-(p * np.log(p)).sum())

    def to_dict(self) -> dict:
        return {"n_requested": self.n_requested, "n_edges": self.n_edges, "n_nodes": self.n_nodes,
                "edge_entropy": self.entropy, "nodes": self.nodes, "edges": self.edges}


def rank_edges(graph: Graph, matrix: np.ndarray, absolute: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """(src, dst) index arrays of the valid edges, best first. Scores are ranked as float32, as the reference
    ranks its float32 round-tripped scores."""
    src, dst = np.nonzero(graph.valid)
    values = np.asarray(matrix, np.float32)[src, dst]
    key = np.abs(values) if absolute else values
    order = np.lexsort((graph.edge_order[src, dst], -key.astype(np.float64)))
    return src[order], dst[order]


def _columns_of_nodes(graph: Graph) -> list[np.ndarray]:
    """For each node (sources then logits), the destination columns where it reads its input."""
    node = graph.destination_node
    return [np.nonzero(node == i)[0] for i in range(graph.n_sources + 1)]


def prune_dead_nodes(graph: Graph, edge_mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The reference's two pruning passes; returns (edge_mask, node_mask), both new arrays."""
    edges = edge_mask.copy()
    columns = _columns_of_nodes(graph)
    n = graph.n_sources
    nodes = np.zeros(n + 1, bool)
    nodes[n] = edges[:, graph.logits].any()
    for u in range(n - 1, -1, -1):                 # backwards: drop nodes nothing reads
        nodes[u] = edges[u].any()
        if not nodes[u]:
            edges[:, columns[u]] = False
    for u in range(1, n + 1):                      # forwards: drop nodes that read nothing (not input)
        if nodes[u] and not edges[:, columns[u]].any():
            nodes[u] = False
            if u < n:
                edges[u] = False
    return edges, nodes


def touched_nodes(graph: Graph, edges: np.ndarray) -> np.ndarray:
    """[n_src + 1] nodes with at least one edge in ``edges`` (no pruning)."""
    nodes = np.zeros(graph.n_sources + 1, bool)
    nodes[:-1] = edges.any(1)
    reads = edges.any(0)
    np.logical_or.at(nodes, graph.destination_node, reads)
    return nodes


def edge_count(graph: Graph, size) -> int:
    """A circuit size as a number of edges: an int is a count, a float in (0, 1) a fraction of the graph's
    edges (as the knowledge-circuits paper sizes its circuits: 6.7-25% of the edges)."""
    if isinstance(size, (float, np.floating)) and not float(size).is_integer():
        if not 0 < size < 1:
            raise ValueError(f"a circuit size given as a fraction of the edges must lie in (0, 1), got {size}")
        return max(1, int(round(float(size) * graph.n_edges)))
    if size < 0:
        raise ValueError(f"n must be non-negative, got {size}")
    return int(size)


def top_n_circuit(scores, n, absolute: bool = True, prune: bool = True) -> Circuit:
    """The top ``n`` edges by |score| (``absolute=False``: by signed score), then dead-node pruning.
    ``n``: a count, or a fraction of the graph's edges (``edge_count``). ``scores``: a ``Scores`` from
    ``attribute`` (or anything with ``graph`` and ``matrix``)."""
    n = edge_count(scores.graph, n)
    graph, matrix = scores.graph, np.asarray(scores.matrix, np.float32)
    src, dst = rank_edges(graph, matrix, absolute)
    edges = np.zeros(graph.valid.shape, bool)
    edges[src[:n], dst[:n]] = True
    edges, nodes = prune_dead_nodes(graph, edges) if prune else (edges, touched_nodes(graph, edges))
    return Circuit(graph, edges, nodes, matrix, n)


def full_circuit(graph: Graph) -> Circuit:
    """Every edge of the graph (the whole model)."""
    return Circuit(graph, graph.valid.copy(), np.ones(graph.n_sources + 1, bool), None, graph.n_edges)


def circuit_from_edges(graph: Graph, edge_mask: np.ndarray, prune: bool = True) -> Circuit:
    """A circuit from an explicit [n_src, n_dst] edge mask (restricted to valid edges)."""
    edges = np.asarray(edge_mask, bool) & graph.valid
    edges, nodes = prune_dead_nodes(graph, edges) if prune else (edges, touched_nodes(graph, edges))
    return Circuit(graph, edges, nodes, None, int(edges.sum()))
