"""Knowledge circuits: edge attribution (EAP, EAP-IG), circuit selection, faithfulness, Hit@k, and their
evolution across checkpoints. See docs/circuits.md."""
from jax_controlllm.circuits.attribute import Scores, attribute
from jax_controlllm.circuits.circuit import Circuit, circuit_from_edges, full_circuit, prune_dead_nodes, top_n_circuit
from jax_controlllm.circuits.evaluate import CircuitEvaluation, evaluate_circuit, faithfulness, hit_at_k
from jax_controlllm.circuits.graph import Graph
from jax_controlllm.circuits.nodes import CircuitModel, circuit_model

__all__ = ["attribute", "Scores", "top_n_circuit", "Circuit", "full_circuit", "circuit_from_edges",
           "prune_dead_nodes", "faithfulness", "evaluate_circuit", "CircuitEvaluation", "hit_at_k", "Graph",
           "CircuitModel", "circuit_model"]
