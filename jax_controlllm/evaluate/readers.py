"""Evaluation inputs: documents, knowledge probes and multiple-choice questions from JSONL / text files."""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

LETTERS = "ABCDEFGHIJKLMNOPQRSTUVWXYZ"


class EvalInputError(ValueError):
    """An evaluation file is empty or malformed; the message names the file, the line and the fix."""


@dataclass
class Probe:
    prompt: str
    answer: str
    id: str = ""
    extra: dict = field(default_factory=dict)      # any other fields of the record, kept for the report


@dataclass
class ChoiceQuestion:
    question: str
    choices: list[str]
    answer: int                                    # index into choices
    subject: str = ""


def read_jsonl(path: str | Path) -> list[tuple[int, dict]]:
    path = Path(path)
    if not path.is_file():
        raise EvalInputError(f"{path} does not exist")
    records = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as err:
            raise EvalInputError(f"{path}:{number}: not valid JSON ({err.msg}); write one JSON object per line"
                                 ) from None
        if not isinstance(record, dict):
            raise EvalInputError(f"{path}:{number}: expected a JSON object, got {type(record).__name__}")
        records.append((number, record))
    if not records:
        raise EvalInputError(f"{path} is empty; write one JSON object per line")
    return records


def required_text(path, number: int, record: dict, name: str, hint: str) -> str:
    value = record.get(name)
    if not isinstance(value, str) or not value.strip():
        what = "is missing" if name not in record else "is empty or not a string"
        raise EvalInputError(f"{path}:{number}: field {name!r} {what}; {hint}")
    return value


def read_documents(path: str | Path, text_field: str = "text", limit: Optional[int] = None) -> list[str]:
    """Documents of a JSONL file (field ``text_field``) or a text file (one document per non-empty line)."""
    path = Path(path)
    if path.suffix == ".jsonl":
        docs = [required_text(path, n, r, text_field, f"each line needs a {text_field!r} string "
                            "(or choose the field with --text-field)") for n, r in read_jsonl(path)]
    else:
        if not path.is_file():
            raise EvalInputError(f"{path} does not exist")
        docs = [line for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
        if not docs:
            raise EvalInputError(f"{path} has no text; give a text file with one document per line, or JSONL")
    return docs[:limit] if limit else docs


def read_probes(path: str | Path) -> list[Probe]:
    """Knowledge probes from JSONL: {"prompt": ..., "answer": ..., optional "id" and anything else}."""
    hint = 'each line needs {"prompt": "...", "answer": "..."}'
    probes = []
    for number, record in read_jsonl(path):
        prompt = required_text(path, number, record, "prompt", hint)
        answer = required_text(path, number, record, "answer", hint)
        extra = {k: v for k, v in record.items() if k not in ("prompt", "answer", "id")}
        probes.append(Probe(prompt, answer, str(record.get("id", number)), extra))
    return probes


def _answer_index(path, number: int, value, n_choices: int) -> int:
    if isinstance(value, str) and len(value.strip()) == 1 and value.strip().upper() in LETTERS:
        value = LETTERS.index(value.strip().upper())
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value < n_choices:
        raise EvalInputError(f"{path}:{number}: 'answer' must be a choice index (0..{n_choices - 1}) or letter "
                             f"(A..{LETTERS[n_choices - 1]}), got {value!r}")
    return value


def read_choice_questions(path: str | Path) -> list[ChoiceQuestion]:
    """MMLU-style JSONL: {"question", "choices": [...], "answer": index or letter, optional "subject"}."""
    hint = 'each line needs {"question": "...", "choices": ["...", ...], "answer": 0 or "A"}'
    questions = []
    for number, record in read_jsonl(path):
        question = required_text(path, number, record, "question", hint)
        choices = record.get("choices")
        if not isinstance(choices, list) or len(choices) < 2 or not all(isinstance(c, str) for c in choices):
            raise EvalInputError(f"{path}:{number}: 'choices' must be a list of at least 2 strings; {hint}")
        if len(choices) > len(LETTERS):
            raise EvalInputError(f"{path}:{number}: at most {len(LETTERS)} choices are supported")
        if "answer" not in record:
            raise EvalInputError(f"{path}:{number}: field 'answer' is missing; {hint}")
        answer = _answer_index(path, number, record["answer"], len(choices))
        questions.append(ChoiceQuestion(question, choices, answer, str(record.get("subject", ""))))
    return questions
