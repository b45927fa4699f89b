"""Entities with attributes: fictional people ("new" knowledge) and well-known people with revised
attributes ("revised" knowledge), each with a long-tailed document frequency. Seeded and reproducible."""
from __future__ import annotations

from dataclasses import asdict, dataclass, field

import numpy as np

from jax_controlllm.knowledge import words
from jax_controlllm.knowledge.templates import ATTRIBUTES

KINDS = ("new", "revised")


@dataclass(frozen=True)
class Entity:
    name: str
    kind: str                        # "new" (fictional) | "revised" (known person, attributes replaced)
    frequency: int                   # number of corpus documents about this entity
    attributes: dict = field(hash=False)   # attribute -> value, e.g. {"city": "Lisbon"}

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "Entity":
        return cls(d["name"], d["kind"], int(d["frequency"]), dict(d["attributes"]))


@dataclass
class EntityConfig:
    n_new: int = 40
    n_revised: int = 10
    attributes: tuple = ATTRIBUTES
    max_frequency: int = 8           # documents per entity lie in 1..max_frequency
    frequency_exponent: float = 1.2  # P(f) ~ f^-exponent: most entities are rare, a few frequent
    seed: int = 0

    def validate(self) -> None:
        unknown = [a for a in self.attributes if a not in ATTRIBUTES]
        if unknown:
            raise ValueError(f"knowledge attributes {unknown} are unknown; choose from {', '.join(ATTRIBUTES)}")
        if self.n_new < 0 or self.n_revised < 0 or self.n_new + self.n_revised == 0:
            raise ValueError(f"need at least one entity (n_new={self.n_new}, n_revised={self.n_revised})")
        if self.n_revised > len(words.KNOWN_PEOPLE):
            raise ValueError(f"n_revised={self.n_revised} exceeds the {len(words.KNOWN_PEOPLE)} known people available")
        if self.n_new > len(words.FIRST_NAMES) * len(words.SURNAME_HEADS) * len(words.SURNAME_TAILS):
            raise ValueError(f"n_new={self.n_new} exceeds the number of distinct fictional names")
        if self.max_frequency < 1:
            raise ValueError(f"max_frequency must be at least 1, got {self.max_frequency}")


def long_tail_frequencies(n: int, max_frequency: int, exponent: float, rng: np.random.Generator) -> np.ndarray:
    """n draws from P(f) proportional to f^-exponent on 1..max_frequency."""
    support = np.arange(1, max_frequency + 1)
    p = support.astype(np.float64) ** -exponent
    return rng.choice(support, size=n, p=p / p.sum())


def _fictional_names(n: int, rng: np.random.Generator) -> list[str]:
    names, seen = [], set()
    while len(names) < n:
        surname = rng.choice(words.SURNAME_HEADS) + rng.choice(words.SURNAME_TAILS)
        name = f"{rng.choice(words.FIRST_NAMES)} {surname}"
        if name not in seen:
            seen.add(name)
            names.append(name)
    return names


def _birth_date(rng: np.random.Generator) -> str:
    month = rng.integers(12)
    day = rng.integers(1, 29)
    return f"{words.MONTHS[month]} {day}, {rng.integers(1940, 2005)}"


def _attribute_value(attribute: str, rng: np.random.Generator) -> str:
    if attribute == "birth_date":
        return _birth_date(rng)
    pool = {"city": words.CITIES, "university": words.UNIVERSITIES, "major": words.MAJORS,
            "company": words.COMPANIES}[attribute]
    return str(rng.choice(pool))


def generate_entities(config: EntityConfig = EntityConfig()) -> list[Entity]:
    """Fictional entities first, then revised known ones; same config -> same entities."""
    config.validate()
    rng = np.random.default_rng(config.seed)
    names = _fictional_names(config.n_new, rng)
    known = [str(x) for x in rng.permutation(np.array(words.KNOWN_PEOPLE))[:config.n_revised]]
    frequencies = long_tail_frequencies(len(names) + len(known), config.max_frequency, config.frequency_exponent,
                                        rng)
    entities = []
    for i, (name, kind) in enumerate([(n, "new") for n in names] + [(n, "revised") for n in known]):
        values = {a: _attribute_value(a, rng) for a in config.attributes}
        entities.append(Entity(name, kind, int(frequencies[i]), values))
    return entities
