"""Biography documents, held-out query probes, and the JSONL files the training and evaluation code read.

    corpus.jsonl     {"text": "..."}                       one biography per line, entity e in frequency(e) docs
    probes.jsonl     {"prompt", "answer", "entity", "attribute", "kind", "frequency"}
    entities.jsonl   the entities with their attributes (to rebuild queries / prompt pairs for any tokenizer)

Answers start with a space ("Mara Velkaris lives in the city of" -> " Lisbon"), so their first token is
the one a model predicts right after the prompt.
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Iterable, Optional

import numpy as np

from jax_controlllm.files import write_text_atomic
from jax_controlllm.knowledge.entities import Entity, EntityConfig, generate_entities
from jax_controlllm.knowledge.templates import OPENINGS, QUERIES, paraphrases


@dataclass(frozen=True)
class Query:
    prompt: str
    answer: str                      # leading space, e.g. " Lisbon"
    entity: str
    attribute: str
    kind: str
    frequency: int

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class CorpusConfig:
    entities: EntityConfig = field(default_factory=EntityConfig)
    held_out_phrasing: bool = False  # True: the query wording never appears in a document
    seed: int = 0


def biography(entity: Entity, rng: np.random.Generator, held_out_phrasing: bool = False) -> str:
    """One document: an optional opening, then one random paraphrase per attribute in random order."""
    sentences = [str(rng.choice(paraphrases(a, held_out_phrasing))).format(name=entity.name, **{a: v})
                 for a, v in entity.attributes.items()]
    order = rng.permutation(len(sentences))
    opening = str(rng.choice(OPENINGS)).format(name=entity.name)
    return " ".join(([opening] if opening else []) + [sentences[i] for i in order])


def documents(entities: Iterable[Entity], seed: int = 0, held_out_phrasing: bool = False) -> list[str]:
    """frequency(e) independently paraphrased biographies per entity, shuffled."""
    rng = np.random.default_rng(seed)
    docs = [biography(e, rng, held_out_phrasing) for e in entities for _ in range(e.frequency)]
    return [docs[i] for i in rng.permutation(len(docs))]


def queries(entities: Iterable[Entity], attributes: Optional[Iterable[str]] = None) -> list[Query]:
    """The probe set: one query per entity and attribute."""
    out = []
    for e in entities:
        for a in (attributes or e.attributes):
            out.append(Query(QUERIES[a].format(name=e.name), " " + e.attributes[a], e.name, a, e.kind, e.frequency))
    return out


def write_jsonl(path, rows: Iterable[dict]) -> Path:
    """One JSON object per line, written whole or not at all."""
    return write_text_atomic(path, "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows))


def read_jsonl(path) -> list[dict]:
    with Path(path).open(encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def write_corpus_jsonl(path, docs: Iterable[str]) -> Path:
    return write_jsonl(path, ({"text": d} for d in docs))


def write_probes_jsonl(path, probes: Iterable[Query]) -> Path:
    return write_jsonl(path, (q.to_dict() for q in probes))


def load_entities(path) -> list[Entity]:
    return [Entity.from_dict(d) for d in read_jsonl(path)]


def build_knowledge_dataset(out_dir, config: CorpusConfig = CorpusConfig()) -> dict[str, Path]:
    """Write corpus.jsonl, probes.jsonl and entities.jsonl under ``out_dir``; returns their paths."""
    out_dir = Path(out_dir)
    entities = generate_entities(config.entities)
    return {"corpus": write_corpus_jsonl(out_dir / "corpus.jsonl",
                                         documents(entities, config.seed, config.held_out_phrasing)),
            "probes": write_probes_jsonl(out_dir / "probes.jsonl", queries(entities)),
            "entities": write_jsonl(out_dir / "entities.jsonl", (e.to_dict() for e in entities))}
