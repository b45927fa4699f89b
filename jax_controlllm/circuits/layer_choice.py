"""``expansion.layers: auto``: choose the layers to expand from the base model's knowledge circuits.

The corpus teaches new values of some relations ("{name} lives in the city of", "{name} works for"). Where does
the base model recall such a relation for people it already knows? For each of the corpus's attributes:

1. prompts: the corpus's query template about well-known people (``words.KNOWN_PEOPLE``); the label of each
   prompt is the base model's own greedy first answer token (what it "knows", right or wrong), kept when it is
   a capitalised word (a named answer, not " the" or " a"); a relation with too few named answers to pair is
   skipped (the base has no recall circuit for it to find), and with none at all the choice is refused;
2. clean/corrupted pairs of such prompts (``make_prompt_pairs``: same length, different labels);
3. EAP-IG edge scores on the base model, and its top-``top_n`` circuit (``top_n_circuit``).

A layer's share is the |score| mass of the circuit's edges that touch it, each edge counting half for the
layer of its source and half for the layer of its destination (the input embedding and the logits belong to
no layer). Shares are summed over the attributes, and the ``num_exp_layers`` layers with the largest share
are expanded (ties: the upper layer). The choice is made once, when a run starts, and written into the run's
saved config (config.yaml) as an explicit list, so a resumed run expands exactly the same layers.
"""
from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import yaml

from jax_controlllm.buckets import pad_rows
from jax_controlllm.circuits.attribute import Scores, attribute
from jax_controlllm.circuits.circuit import top_n_circuit
from jax_controlllm.config import ConfigError, ModelConfig, RunConfig
from jax_controlllm.knowledge import (
    QUERIES,
    Entity,
    PromptPairs,
    as_encoder,
    make_prompt_pairs,
)
from jax_controlllm.knowledge.words import KNOWN_PEOPLE
from jax_controlllm.model.stack import forward
from jax_controlllm.tokenizer import load_tokenizer, run_tokenizer_source
from jax_controlllm.train.setup import load_base_weights

AUTO = "auto"


@dataclass
class LayerChoice:
    layers: list                 # the chosen original-layer indices, ascending
    shares: list                 # per layer: share of the circuits' |edge score| (sums to 1 over layers)
    pairs: dict                  # attribute -> number of clean/corrupted pairs scored (0: skipped, no named answers)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def layer_shares(scores: Scores, top_n: int) -> np.ndarray:
    """[n_layers] the |score| mass of the top-n circuit's edges per layer (each edge half to the layer of its
    source, half to the layer of its destination), normalised to sum to 1 (all zeros for an empty circuit)."""
    graph = scores.graph
    circuit = top_n_circuit(scores, top_n)
    src, dst = np.nonzero(circuit.edge_mask)
    weight = np.abs(np.asarray(scores.matrix, np.float64)[src, dst]) / 2
    mass = np.zeros(graph.n_layers + 2)                # index 0: input (-1 + 1); last: logits (n_layers + 1)
    np.add.at(mass, graph.source_layer[src] + 1, weight)
    np.add.at(mass, graph.destination_layer[dst] + 1, weight)
    per_layer = mass[1:-1]
    total = per_layer.sum()
    return per_layer / total if total > 0 else per_layer


def top_layers(shares: Sequence[float], n: int) -> list[int]:
    """The n layers with the largest share, ascending; ties go to the upper layer."""
    shares = np.asarray(shares, np.float64)
    if not 1 <= n <= len(shares):
        raise ConfigError(f"expansion.num_exp_layers: {n} is not between 1 and the model's {len(shares)} layers")
    order = np.lexsort((-np.arange(len(shares)), -shares))
    return sorted(int(i) for i in order[:n])


def first_token_predictions(config: ModelConfig, params, prompts: Sequence[list[int]]) -> list[int]:
    """The greedy next token after each prompt (token ids, no special tokens)."""
    ids, mask = pad_rows(prompts, len(prompts))
    logits = np.asarray(forward(config, params, ids, mask))
    last = np.asarray([len(p) - 1 for p in prompts])
    return [int(t) for t in logits[np.arange(len(prompts)), last].argmax(-1)]


def named_answer(tokenizer, token: int) -> str | None:
    """The word a predicted answer token stands for, if it is a capitalised word that starts an answer (the
    token of " " + word is ``token``); None for anything else (" the", punctuation, a word piece)."""
    word = tokenizer.decode([token]).strip()
    if not (word[:1].isupper() and word.isalnum()):
        return None
    return word if as_encoder(tokenizer)(" " + word)[:1] == [token] else None


def known_subject_pairs(config: ModelConfig, params, tokenizer, attribute_name: str,
                        people: Sequence[str] = KNOWN_PEOPLE, seed: int = 0) -> PromptPairs:
    """Clean/corrupted pairs for one attribute: the corpus's query about known people, labelled with the base
    model's own answer (see the module docstring)."""
    encode = as_encoder(tokenizer)
    prompts = [encode(QUERIES[attribute_name].format(name=p)) for p in people]
    entities = []
    for person, token in zip(people, first_token_predictions(config, params, prompts)):
        word = named_answer(tokenizer, token)
        if word is not None:
            entities.append(Entity(person, "revised", 1, {attribute_name: word}))
    return make_prompt_pairs(entities, attribute_name, tokenizer, bos_id=None, pad_id=config.pad_token_id or 0,
                             seed=seed)


def choose_layers(config: ModelConfig, params, tokenizer, attributes: Sequence[str], n: int, top_n: int = 300,
                  ig_steps: int = 5, batch_size: int = 16,
                  pairs_for: Callable[[str], PromptPairs] | None = None) -> LayerChoice:
    """The ``n`` layers that carry most of the base model's circuits for ``attributes``."""
    pairs_for = pairs_for or (lambda a: known_subject_pairs(config, params, tokenizer, a))
    shares, counts = np.zeros(config.num_hidden_layers), {}
    for name in attributes:
        try:
            pairs = pairs_for(name)
        except ValueError:               # the base names too few answers for this relation: it has no circuit
            counts[name] = 0
            continue
        scores = attribute(config, params, *pairs.args(), method="EAP-IG", ig_steps=ig_steps, batch_size=batch_size)
        shares += layer_shares(scores, top_n)
        counts[name] = len(pairs)
    used = sum(1 for c in counts.values() if c)
    if not used:
        raise ConfigError(f"expansion.layers: auto found no relation of {', '.join(attributes)} that the base model "
                          f"answers with named answers for known people; list the layers instead")
    shares /= used
    return LayerChoice(top_layers(shares, n), [round(float(s), 6) for s in shares], counts)


def saved_layers(run_dir: str | Path) -> list | None:
    """The explicit expansion layers a run directory's config.yaml recorded (None when there is none)."""
    path = Path(run_dir) / "config.yaml"
    if not path.is_file():
        return None
    layers = ((yaml.safe_load(path.read_text(encoding="utf-8")) or {}).get("expansion") or {}).get("layers")
    return layers if isinstance(layers, list) else None


def resolve_auto_layers(run: RunConfig, run_dir: str | Path, progress: Callable[[str], None] = print) -> RunConfig:
    """``run`` with ``expansion.layers: auto`` replaced by explicit layers: those the run directory already
    recorded (a resume), else the circuit-guided choice on the base model. Other runs come back unchanged."""
    exp = run.expansion
    if exp is None or exp.layers != AUTO:
        return run
    layers = saved_layers(run_dir)
    if layers is None:
        layers = circuit_choice(run, run_dir, progress).layers
    elif len(layers) != exp.num_exp_layers:
        raise ConfigError(f"expansion.num_exp_layers: {exp.num_exp_layers}, but the run in {run_dir} expanded "
                          f"{len(layers)} layers {layers}; resume with the same setting or use a new --out")
    return dataclasses.replace(run, expansion=dataclasses.replace(exp, layers=list(layers)))


def circuit_choice(run: RunConfig, run_dir: str | Path, progress: Callable[[str], None] = print) -> LayerChoice:
    """Load the run's base model and tokenizer and choose its layers from the knowledge corpus's relations."""
    spec = run.knowledge
    if spec is None or run.base.path is None:
        raise ConfigError("expansion.layers: auto needs a pretrained base (base.path) and a knowledge corpus "
                          "(the knowledge section) to find the circuits of its relations; list the layers instead")
    config, params = load_base_weights(run)
    tokenizer = load_tokenizer(run_tokenizer_source(run, Path(run_dir)))
    choice = choose_layers(config, params, tokenizer, spec.attributes, run.expansion.num_exp_layers)
    progress(f"expansion.layers: auto -> {choice.layers} (knowledge circuits of {', '.join(spec.attributes)}; "
             f"pairs {choice.pairs})")
    return choice
