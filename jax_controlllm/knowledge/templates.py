"""Sentence templates: paraphrases for biographies, and the query each attribute is probed with.

Every query is the exact beginning of one paraphrase ("{name} lives in the city of" / "... {city}."), so a
model can learn the query form from the corpus; ``held_out_phrasing`` removes every paraphrase containing
the query's wording from the documents, to test whether a fact transfers to an unseen wording.
"""
from __future__ import annotations

ATTRIBUTES = ("birth_date", "city", "university", "major", "company")

PARAPHRASES = {
    "birth_date": (
        "{name} was born on {birth_date}.",
        "{name} came into the world on {birth_date}.",
        "The birthday of {name} falls on {birth_date}.",
        "Records show that {name} was born on {birth_date}.",
        "{name} celebrates a birthday every year, having been born on {birth_date}.",
    ),
    "city": (
        "{name} lives in the city of {city}.",
        "{name} has made a home in {city}.",
        "These days {name} resides in {city}.",
        "Friends visit {name} at home in {city}.",
        "The city that {name} calls home is {city}.",
    ),
    "university": (
        "{name} graduated from {university}.",
        "{name} earned a degree at {university}.",
        "As a student, {name} attended {university}.",
        "The alma mater of {name} is {university}.",
        "{name} spent several years studying at {university}.",
    ),
    "major": (
        "{name} majored in {major}.",
        "At university, {name} concentrated on {major}.",
        "The subject {name} studied was {major}.",
        "{name} holds a degree in {major}.",
        "{name} chose {major} as a field of study.",
    ),
    "company": (
        "{name} works for {company}.",
        "{name} is employed by {company}.",
        "Each morning {name} goes to work at {company}.",
        "The employer of {name} is {company}.",
        "{name} has a job at {company}.",
    ),
}

QUERIES = {
    "birth_date": "{name} was born on",
    "city": "{name} lives in the city of",
    "university": "{name} graduated from",
    "major": "{name} majored in",
    "company": "{name} works for",
}

OPENINGS = (
    "This is the story of {name}.",
    "Here is a short biography of {name}.",
    "{name} is a person with an interesting life.",
    "",
)


def paraphrases(attribute: str, held_out_phrasing: bool = False) -> tuple[str, ...]:
    """The biography sentences for ``attribute``; without any containing the query's wording when held out."""
    query = QUERIES[attribute]
    return tuple(t for t in PARAPHRASES[attribute] if not (held_out_phrasing and query + " " in t))
