"""Multiple-choice accuracy (MMLU-style) by log-likelihood, zero- or few-shot."""
from __future__ import annotations

from typing import Optional, Sequence

import jax.numpy as jnp
import numpy as np

from jax_controlllm.buckets import batch_bucket, pad_rows
from jax_controlllm.config import ModelConfig
from jax_controlllm.evaluate.batches import progress_bar
from jax_controlllm.evaluate.readers import LETTERS, ChoiceQuestion, EvalInputError
from jax_controlllm.evaluate.scoring import encode_pair, next_token_logprobs, score_continuations, split_for_scoring
from jax_controlllm.tokenizer import encode, pad_id_of


def format_question(q: ChoiceQuestion, with_answer: bool) -> str:
    lines = [q.question.strip(), *(f"{LETTERS[i]}. {c.strip()}" for i, c in enumerate(q.choices))]
    lines.append("Answer:" + (f" {LETTERS[q.answer]}" if with_answer else ""))
    return "\n".join(lines)


def few_shot_prompt(q: ChoiceQuestion, shots: Sequence[ChoiceQuestion]) -> str:
    subject = f" about {q.subject.replace('_', ' ')}" if q.subject else ""
    header = f"The following are multiple choice questions (with answers){subject}.\n\n"
    return header + "".join(format_question(s, True) + "\n\n" for s in shots) + format_question(q, False)


def _shots_for(index: int, q: ChoiceQuestion, pool: Sequence[ChoiceQuestion], k: int, exclude_self: bool):
    """The first k examples of the pool, same subject first; never the question itself."""
    candidates = [(j, s) for j, s in enumerate(pool) if not (exclude_self and j == index)]
    same = [s for _, s in candidates if s.subject == q.subject]
    other = [s for _, s in candidates if s.subject != q.subject]
    return (same + other)[:k]


def multiple_choice_accuracy(config: ModelConfig, params: dict, tokenizer, questions: Sequence[ChoiceQuestion],
                             few_shot: int = 0, dev: Optional[Sequence[ChoiceQuestion]] = None,
                             score: str = "letter", batch_size: int = 16, progress: bool = False) -> dict:
    """Accuracy by log-likelihood. ``score="letter"``: the answer letter after "Answer:" (MMLU); ``"text"``:
    each choice's text as the continuation (also reports accuracy normalised by the choice's length in
    characters). Few-shot examples come from ``dev``, else from the other questions."""
    if score not in ("letter", "text"):
        raise EvalInputError(f"score must be 'letter' or 'text', got {score!r}")
    questions = list(questions)
    if not questions:
        raise EvalInputError("no questions given")
    pool, exclude = (list(dev), False) if dev else (questions, True)
    prompts = [few_shot_prompt(q, _shots_for(i, q, pool, few_shot, exclude)) for i, q in enumerate(questions)]
    if score == "letter":
        choice_scores = _letter_scores(config, params, tokenizer, questions, prompts, batch_size, progress)
        norm_scores = choice_scores
    else:
        pairs, owners = [], []
        for i, (q, prompt) in enumerate(zip(questions, prompts)):
            for choice in q.choices:
                pairs.append(encode_pair(tokenizer, *split_for_scoring(prompt, choice)))
                owners.append(i)
        flat = score_continuations(config, params, pairs, batch_size, pad_id_of(config, tokenizer), progress)
        choice_scores = [[] for _ in questions]
        norm_scores = [[] for _ in questions]
        for owner, s, (_, cont) in zip(owners, flat, pairs):
            choice_scores[owner].append(s.logprob)
            norm_scores[owner].append(s.logprob / max(len(tokenizer.decode(cont)), 1))
    items = [{"question": q.question, "subject": q.subject, "answer": LETTERS[q.answer],
              "predicted": LETTERS[int(np.argmax(s))], "correct": int(np.argmax(s)) == q.answer,
              "choice_logprobs": [float(x) for x in s]} for q, s in zip(questions, choice_scores)]
    summary = {"questions": len(items), "few_shot": few_shot, "score": score,
               "accuracy": sum(it["correct"] for it in items) / len(items)}
    if score == "text":
        summary["accuracy_norm"] = float(np.mean([int(np.argmax(s)) == q.answer
                                                  for q, s in zip(questions, norm_scores)]))
    by_subject: dict[str, list[bool]] = {}
    for it in items:
        by_subject.setdefault(it["subject"] or "-", []).append(it["correct"])
    summary["by_subject"] = {k: sum(v) / len(v) for k, v in sorted(by_subject.items())}
    return {"summary": summary, "items": items}


def _letter_scores(config, params, tokenizer, questions, prompts, batch_size, progress) -> list[list[float]]:
    """One forward per question: the log-probabilities of " A", " B", ... after the prompt (when each letter
    is one token, as in Llama and SmolLM vocabularies)."""
    n_choices = max(len(q.choices) for q in questions)
    letter_ids = [encode(tokenizer, " " + LETTERS[i], templated=True) for i in range(n_choices)]
    pad = pad_id_of(config, tokenizer)
    if any(len(ids) != 1 for ids in letter_ids):   # " A" is several tokens: score each letter as a continuation
        pairs = [encode_pair(tokenizer, p, " " + LETTERS[c]) for q, p in zip(questions, prompts)
                 for c in range(len(q.choices))]
        flat = iter(score_continuations(config, params, pairs, batch_size, pad, progress))
        return [[next(flat).logprob for _ in q.choices] for q in questions]
    candidates = np.array([ids[0] for ids in letter_ids], np.int32)
    rows = [encode(tokenizer, p) for p in prompts]
    order = sorted(range(len(rows)), key=lambda i: len(rows[i]))
    out: list[list[float]] = [[] for _ in rows]
    starts = range(0, len(order), batch_size)
    for start in progress_bar(starts, progress, "multiple choice", len(starts)):
        chunk = order[start:start + batch_size]
        ids, mask = pad_rows([rows[i] for i in chunk], batch_bucket(len(chunk), batch_size), pad)
        last = np.zeros(len(ids), np.int32)
        last[:len(chunk)] = [len(rows[i]) - 1 for i in chunk]
        lp = np.asarray(next_token_logprobs(config, params, jnp.asarray(ids), jnp.asarray(mask), jnp.asarray(last),
                                             jnp.asarray(np.broadcast_to(candidates, (len(ids), n_choices)))))
        for row, i in enumerate(chunk):
            out[i] = [float(x) for x in lp[row, :len(questions[i].choices)]]
    return out
