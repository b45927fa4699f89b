"""Evaluation: perplexity, knowledge probes, multiple choice, and retention against a base model.

Everything here is a plain function of (config, params, tokenizer, data) returning JSON-ready dicts, so the
CLI (``python -m launch.eval``) and the demo job share it. Sequences are batched with right padding and an
attention mask; batch and length are padded to fixed buckets so each (batch, length) bucket compiles once.

Conventions:
* the log-likelihood of an answer is scored as lm-eval-harness does: encode ``context + continuation`` whole
  and score the tokens after the context's own encoding; a space separates a plain prompt from its answer
  unless one of them already has it (chat prompts: the answer follows the template directly);
* ``first_token_rank`` is 1 when the answer's first token is the model's top choice;
* KL is KL(base || model) of next-token distributions, averaged over real (non-padding) positions.
"""
from __future__ import annotations

import dataclasses
import functools
import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from jax_controlllm.config import ModelConfig
from jax_controlllm.generate import GREEDY, Static, _pad_id, chat_prompt, encode, eos_ids_of, generate_ids
from jax_controlllm.losses import cross_entropy_sum
from jax_controlllm.model.llama import final_hidden, logits_from_hidden

LETTERS = "ABCDEFGHIJKLMNOPQRSTUVWXYZ"


class EvalInputError(ValueError):
    """An evaluation file is empty or malformed; the message names the file, the line and the fix."""


# ----------------------------------------------------------------------------------------------
# Input files
# ----------------------------------------------------------------------------------------------

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


def _read_jsonl(path: str | Path) -> list[tuple[int, dict]]:
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


def _text_field(path, number: int, record: dict, name: str, hint: str) -> str:
    value = record.get(name)
    if not isinstance(value, str) or not value.strip():
        what = "is missing" if name not in record else "is empty or not a string"
        raise EvalInputError(f"{path}:{number}: field {name!r} {what}; {hint}")
    return value


def read_documents(path: str | Path, text_field: str = "text", limit: Optional[int] = None) -> list[str]:
    """Documents of a JSONL file (field ``text_field``) or a text file (one document per non-empty line)."""
    path = Path(path)
    if path.suffix == ".jsonl":
        docs = [_text_field(path, n, r, text_field, f"each line needs a {text_field!r} string "
                            "(or choose the field with --text-field)") for n, r in _read_jsonl(path)]
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
    for number, record in _read_jsonl(path):
        prompt = _text_field(path, number, record, "prompt", hint)
        answer = _text_field(path, number, record, "answer", hint)
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
    for number, record in _read_jsonl(path):
        question = _text_field(path, number, record, "question", hint)
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


# ----------------------------------------------------------------------------------------------
# Batching
# ----------------------------------------------------------------------------------------------

def length_bucket(n: int) -> int:
    """Padded length for n tokens: a power of two from 16 up to 512, then multiples of 512. Few buckets (few
    compilations) at at most 2x padding for short rows."""
    if n <= 512:
        return max(16, 1 << max(n - 1, 0).bit_length())
    return -(-n // 512) * 512


def batch_bucket(n: int, batch_size: int) -> int:
    """Rows to pad a chunk of n to: the next power of two, at most batch_size (a small last chunk or a small
    evaluation set does not pay for a full batch)."""
    return min(batch_size, 1 << max(n - 1, 0).bit_length())


def pad_rows(rows: Sequence[Sequence[int]], batch_size: int, pad_id: int = 0,
             length: Optional[int] = None) -> tuple[np.ndarray, np.ndarray]:
    """Right-pad token rows into ([batch_size, L] ids, mask); L is ``length`` or ``length_bucket`` of the longest."""
    length = length or length_bucket(max(len(r) for r in rows))
    ids = np.full((batch_size, length), pad_id, np.int32)
    mask = np.zeros((batch_size, length), np.int32)
    for i, row in enumerate(rows):
        ids[i, :len(row)], mask[i, :len(row)] = row, 1
    return ids, mask


def text_batches(tokenizer, texts: Sequence[str], seq_len: int = 512, batch_size: int = 8,
                 max_tokens: Optional[int] = None) -> list[dict]:
    """Documents -> {"input_ids", "attention_mask"} batches of at most [batch_size, seq_len]. Each document is
    tokenised (with the tokenizer's BOS, if it adds one) and cut into non-overlapping windows of ``seq_len``;
    windows are grouped by length and padded to buckets, so short documents do not pay for ``seq_len``."""
    windows, total = [], 0
    for text in texts:
        ids = encode(tokenizer, text)
        for start in range(0, len(ids), seq_len):
            window = ids[start:start + seq_len]
            if len(window) >= 2:                 # a lone token has nothing to predict
                windows.append(window)
                total += len(window)
        if max_tokens and total >= max_tokens:
            break
    if not windows:
        raise EvalInputError("no text to evaluate: every document is empty or a single token")
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    windows.sort(key=len)                        # sums over tokens do not depend on the order
    batches = []
    for i in range(0, len(windows), batch_size):
        chunk = windows[i:i + batch_size]
        length = min(length_bucket(len(chunk[-1])), seq_len)
        ids, mask = pad_rows(chunk, batch_bucket(len(chunk), batch_size), pad, length=length)
        batches.append({"input_ids": ids, "attention_mask": mask})
    return batches


def _as_batch(batch) -> tuple[jax.Array, jax.Array]:
    if isinstance(batch, dict):
        ids = np.asarray(batch["input_ids"])
        mask = batch.get("attention_mask")
        mask = np.ones_like(ids) if mask is None else np.asarray(mask)
    else:
        ids = np.asarray(batch)
        mask = np.ones_like(ids)
    return jnp.asarray(ids, jnp.int32), jnp.asarray(mask, jnp.int32)


def _progress(items, progress: bool, desc: str, total: Optional[int] = None):
    if not progress:
        return items
    from tqdm.auto import tqdm
    return tqdm(items, desc=desc, total=total, leave=False)


# ----------------------------------------------------------------------------------------------
# Jitted scoring pieces
# ----------------------------------------------------------------------------------------------

@functools.partial(jax.jit, static_argnums=0)
def _nll(static: Static, params, ids, mask):
    config = static.value
    h = final_hidden(config, params, ids, mask)
    return cross_entropy_sum(config, params, h, jnp.where(mask > 0, ids, -100))


@functools.partial(jax.jit, static_argnums=0)
def _target_scores(static: Static, params, ids, mask):
    """Per position t: log p(ids[t+1] | ids[:t+1]) and the rank of ids[t+1] (1 = argmax). [B, S-1] each."""
    config = static.value
    logits = logits_from_hidden(config, params, final_hidden(config, params, ids, mask)[:, :-1])
    targets = ids[:, 1:, None]
    target_logit = jnp.take_along_axis(logits, targets, axis=-1)
    logprob = target_logit[..., 0] - jax.nn.logsumexp(logits, axis=-1)
    rank = 1 + jnp.sum(logits > target_logit, axis=-1)
    return logprob, rank


@functools.partial(jax.jit, static_argnums=0)
def _next_token_logprobs(static: Static, params, ids, mask, last, candidates):
    """log p(candidate | row up to ``last``) for candidates [B, C] at each row's last real position."""
    config = static.value
    h = final_hidden(config, params, ids, mask)
    h_last = jnp.take_along_axis(h, last[:, None, None], axis=1)
    logprobs = jax.nn.log_softmax(logits_from_hidden(config, params, h_last)[:, 0], axis=-1)
    return jnp.take_along_axis(logprobs, candidates, axis=-1)


SCORE_CHUNK = 128   # positions per LM-head chunk when scoring long rows: full [B, S, V] logits never exist


def _over_chunks(fn, chunk: int, *xs):
    """Sum ``fn`` over sequence chunks of [B, S, ...] arrays (S padded to a multiple of ``chunk``, padding
    masked by the caller's mask being 0 there)."""
    s = xs[0].shape[1]
    if s <= chunk:
        return fn(*xs)
    pad = -s % chunk
    xs = [jnp.pad(x, [(0, 0), (0, pad)] + [(0, 0)] * (x.ndim - 2)) for x in xs]
    split = [jnp.moveaxis(x.reshape(x.shape[0], -1, chunk, *x.shape[2:]), 1, 0) for x in xs]
    return jax.tree.map(lambda y: jnp.sum(y, axis=0), jax.lax.map(lambda c: fn(*c), split))


@functools.partial(jax.jit, static_argnums=(0, 1))
def _kl_sum(static: Static, base_static: Static, params, base_params, ids, mask):
    """(sum over real positions of KL(base || model), number of positions)."""
    config, base_config = static.value, base_static.value
    h = final_hidden(config, params, ids, mask)
    hb = final_hidden(base_config, base_params, ids, mask)

    def chunk_kl(h, hb, valid):
        lp = jax.nn.log_softmax(logits_from_hidden(config, params, h), -1)
        lb = jax.nn.log_softmax(logits_from_hidden(base_config, base_params, hb), -1)
        return jnp.sum(jnp.sum(jnp.exp(lb) * (lb - lp), axis=-1) * valid)

    valid = mask.astype(jnp.float32)
    return _over_chunks(chunk_kl, SCORE_CHUNK, h, hb, valid), jnp.sum(valid)


# ----------------------------------------------------------------------------------------------
# Perplexity and KL
# ----------------------------------------------------------------------------------------------

def perplexity(config: ModelConfig, params: dict, batches: Sequence, progress: bool = False) -> dict:
    """Mean next-token loss over real tokens of ``batches`` (see ``text_batches``) and its exponential."""
    static = Static(dataclasses.replace(config, loss_chunk=config.loss_chunk or SCORE_CHUNK))
    total, count = 0.0, 0.0
    for batch in _progress(batches, progress, "perplexity"):
        nll, n = _nll(static, params, *_as_batch(batch))
        total, count = total + float(nll), count + float(n)
    if count == 0:
        raise EvalInputError("no tokens to score: every row has fewer than 2 real tokens")
    loss = total / count
    return {"loss": loss, "perplexity": math.exp(min(loss, 700.0)), "tokens": int(count)}


def kl_from_base(config: ModelConfig, params: dict, base_config: ModelConfig, base_params: dict,
                 token_batches: Sequence, progress: bool = False) -> dict:
    """Mean KL(base || model) of the next-token distributions over the real positions of ``token_batches``
    (``text_batches`` dicts or [B, S] id arrays). 0 means the model predicts exactly like its base."""
    if config.vocab_size != base_config.vocab_size:
        raise EvalInputError(f"the model's vocabulary ({config.vocab_size}) differs from the base's "
                             f"({base_config.vocab_size}); KL needs the same tokenizer")
    static, base_static, total, count = Static(config), Static(base_config), 0.0, 0.0
    for batch in _progress(token_batches, progress, "KL from base"):
        kl, n = _kl_sum(static, base_static, params, base_params, *_as_batch(batch))
        total, count = total + float(kl), count + float(n)
    return {"kl": total / max(count, 1.0), "tokens": int(count)}


# ----------------------------------------------------------------------------------------------
# Log-likelihood of continuations
# ----------------------------------------------------------------------------------------------

@dataclass
class ContinuationScore:
    logprob: float                 # total log-likelihood of the continuation tokens
    tokens: int                    # how many continuation tokens
    first_token_rank: int          # rank of the first continuation token (1 = the model's top choice)
    greedy: bool                   # every continuation token is the argmax


def split_for_scoring(prompt: str, answer: str, chat: bool = False) -> tuple[str, str]:
    """(context, continuation) with the separating space on the continuation, where BPE vocabularies
    expect it (" Paris", not "Paris" after "is ")."""
    if chat:
        return prompt, answer
    stripped = prompt.rstrip(" ")
    if stripped != prompt or (prompt and not prompt[-1].isspace() and not answer[:1].isspace()):
        return stripped, " " + answer.lstrip(" ")
    return prompt, answer


def encode_pair(tokenizer, context: str, continuation: str, templated: bool = False) -> tuple[list[int], list[int]]:
    """Token ids of (context, continuation): the whole string encoded at once, split after the context's
    own tokens (falls back to separate encodings when a merge crosses the boundary)."""
    ctx = encode(tokenizer, context, templated)
    whole = encode(tokenizer, context + continuation, templated)
    if whole[:len(ctx)] == ctx and len(whole) > len(ctx):
        return ctx, whole[len(ctx):]
    return ctx, encode(tokenizer, continuation, templated=True)


def score_continuations(config: ModelConfig, params: dict, pairs: Sequence[tuple[Sequence[int], Sequence[int]]],
                        batch_size: int = 16, pad_id: int = 0, progress: bool = False) -> list[ContinuationScore]:
    """Log-likelihood, first-token rank and greediness of each (context ids, continuation ids) pair."""
    for i, (ctx, cont) in enumerate(pairs):
        if not ctx or not cont:
            raise EvalInputError(f"pair {i}: context and continuation both need at least one token")
    static = Static(config)
    order = sorted(range(len(pairs)), key=lambda i: len(pairs[i][0]) + len(pairs[i][1]))  # similar lengths
    scores: list[Optional[ContinuationScore]] = [None] * len(pairs)
    starts = range(0, len(order), batch_size)
    for start in _progress(starts, progress, "log-likelihood", len(starts)):
        chunk = order[start:start + batch_size]
        rows = [list(pairs[i][0]) + list(pairs[i][1]) for i in chunk]
        ids, mask = pad_rows(rows, batch_bucket(len(rows), batch_size), pad_id)
        logprob, rank = (np.asarray(x) for x in _target_scores(static, params, jnp.asarray(ids), jnp.asarray(mask)))
        for row, i in enumerate(chunk):
            n_ctx, n_cont = len(pairs[i][0]), len(pairs[i][1])
            span = slice(n_ctx - 1, n_ctx - 1 + n_cont)      # position t scores token t + 1
            scores[i] = ContinuationScore(float(logprob[row, span].sum()), n_cont, int(rank[row, n_ctx - 1]),
                                          bool((rank[row, span] == 1).all()))
    return scores


# ----------------------------------------------------------------------------------------------
# Knowledge probes
# ----------------------------------------------------------------------------------------------

def _matches(output: str, answer: str, case_sensitive: bool, match: str) -> bool:
    out, ans = output.strip(), answer.strip()
    if not case_sensitive:
        out, ans = out.lower(), ans.lower()
    return ans in out if match == "contains" else out.startswith(ans)


def probe_accuracy(config: ModelConfig, params: dict, tokenizer, probes: Sequence[Probe], chat: bool = False,
                   batch_size: int = 32, max_new_tokens: Optional[int] = None, case_sensitive: bool = True,
                   match: str = "prefix", progress: bool = False) -> dict:
    """Score knowledge probes two ways: exact match of the greedy continuation (the answer must be a prefix
    of the stripped output; ``match="contains"`` relaxes that) and the answer's log-likelihood / first-token
    rank. Returns {"summary": {...}, "items": [per-probe dicts]}."""
    if match not in ("prefix", "contains"):
        raise EvalInputError(f"match must be 'prefix' or 'contains', got {match!r}")
    probes = list(probes)
    if not probes:
        raise EvalInputError("no probes given")
    contexts = [chat_prompt(tokenizer, p.prompt) if chat else p.prompt for p in probes]
    pairs = [encode_pair(tokenizer, *split_for_scoring(c, p.answer, chat), templated=chat)
             for c, p in zip(contexts, probes)]
    pad = _pad_id(config, tokenizer)
    scores = score_continuations(config, params, pairs, batch_size, pad, progress)
    prompts = [encode(tokenizer, c, templated=chat) for c in contexts]
    outputs = _greedy_outputs(config, params, tokenizer, prompts, [len(cont) for _, cont in pairs], batch_size,
                              max_new_tokens, progress)
    items = []
    for probe, score, output in zip(probes, scores, outputs):
        items.append({"id": probe.id, "prompt": probe.prompt, "answer": probe.answer, "output": output,
                      "exact_match": _matches(output, probe.answer, case_sensitive, match),
                      "first_token_rank": score.first_token_rank, "answer_logprob": score.logprob,
                      "answer_tokens": score.tokens, "answer_is_greedy": score.greedy, **probe.extra})
    return {"summary": _probe_summary(items), "items": items}


def _greedy_outputs(config, params, tokenizer, prompts, answer_lengths, batch_size, max_new_tokens, progress):
    """Greedy continuations, in batches of prompts with similar answer lengths (so short answers stop early)."""
    order = sorted(range(len(prompts)), key=lambda i: (answer_lengths[i], len(prompts[i])))
    eos, pad = eos_ids_of(config, tokenizer), _pad_id(config, tokenizer)
    outputs: list[str] = [""] * len(prompts)
    starts = range(0, len(order), batch_size)
    for start in _progress(starts, progress, "greedy answers", len(starts)):
        chunk = order[start:start + batch_size]
        budget = max_new_tokens or max(answer_lengths[i] for i in chunk) + 2
        generated = generate_ids(config, params, [prompts[i] for i in chunk], budget, GREEDY, eos, pad)
        for i, gen in zip(chunk, generated):
            outputs[i] = tokenizer.decode(gen.tokens, skip_special_tokens=True)
    return outputs


def _probe_summary(items: list[dict]) -> dict:
    n = len(items)
    ranks = np.array([it["first_token_rank"] for it in items])
    return {"probes": n,
            "exact_match": sum(it["exact_match"] for it in items) / n,
            "hit@1": float(np.mean(ranks <= 1)), "hit@10": float(np.mean(ranks <= 10)),
            "mean_first_token_rank": float(ranks.mean()),
            "mean_answer_logprob": float(np.mean([it["answer_logprob"] for it in items]))}


# ----------------------------------------------------------------------------------------------
# Multiple choice (MMLU-style)
# ----------------------------------------------------------------------------------------------

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
        flat = score_continuations(config, params, pairs, batch_size, _pad_id(config, tokenizer), progress)
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
    static, pad = Static(config), _pad_id(config, tokenizer)
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
    for start in _progress(starts, progress, "multiple choice", len(starts)):
        chunk = order[start:start + batch_size]
        ids, mask = pad_rows([rows[i] for i in chunk], batch_bucket(len(chunk), batch_size), pad)
        last = np.zeros(len(ids), np.int32)
        last[:len(chunk)] = [len(rows[i]) - 1 for i in chunk]
        lp = np.asarray(_next_token_logprobs(static, params, jnp.asarray(ids), jnp.asarray(mask), jnp.asarray(last),
                                             jnp.asarray(np.broadcast_to(candidates, (len(ids), n_choices)))))
        for row, i in enumerate(chunk):
            out[i] = [float(x) for x in lp[row, :len(questions[i].choices)]]
    return out


# ----------------------------------------------------------------------------------------------
# Retention: a trained model against its base
# ----------------------------------------------------------------------------------------------

def retention_report(config: ModelConfig, params: dict, base_config: ModelConfig, base_params: dict, tokenizer,
                     probes: Sequence[Probe], kl_batches: Optional[Sequence] = None, chat: bool = False,
                     batch_size: int = 32, base_results: Optional[dict] = None, progress: bool = False,
                     **probe_options) -> dict:
    """What a trained model kept, lost and gained on the same probes as its base (by exact match), how the
    answers' log-likelihood moved, and (with ``kl_batches``) the mean KL(base || model) on general text.
    ``base_results`` reuses an earlier ``probe_accuracy`` of the base."""
    base = base_results or probe_accuracy(base_config, base_params, tokenizer, probes, chat, batch_size,
                                          progress=progress, **probe_options)
    model = probe_accuracy(config, params, tokenizer, probes, chat, batch_size, progress=progress, **probe_options)
    groups = {"kept": [], "lost": [], "gained": [], "never": []}
    items = []
    for b, m in zip(base["items"], model["items"]):
        group = {(True, True): "kept", (True, False): "lost", (False, True): "gained",
                 (False, False): "never"}[(b["exact_match"], m["exact_match"])]
        groups[group].append(m["id"])
        items.append({"id": m["id"], "prompt": m["prompt"], "answer": m["answer"], "status": group,
                      "base_output": b["output"], "output": m["output"],
                      "base_rank": b["first_token_rank"], "rank": m["first_token_rank"],
                      "logprob_change": m["answer_logprob"] - b["answer_logprob"]})
    base_correct = len(groups["kept"]) + len(groups["lost"])
    summary = {"probes": len(items), "base_exact_match": base["summary"]["exact_match"],
               "exact_match": model["summary"]["exact_match"],
               **{k: len(v) for k, v in groups.items()},
               "retention": len(groups["kept"]) / base_correct if base_correct else None,
               "mean_logprob_change": float(np.mean([it["logprob_change"] for it in items]))}
    if kl_batches is not None:
        summary["kl_from_base"] = kl_from_base(config, params, base_config, base_params, kl_batches, progress)["kl"]
    return {"summary": summary, "groups": groups, "items": items,
            "base_summary": base["summary"], "model_summary": model["summary"]}


# ----------------------------------------------------------------------------------------------
# Reporting
# ----------------------------------------------------------------------------------------------

def _cell(value: Any, width: int) -> str:
    if isinstance(value, float):
        text = f"{value:.4g}"
    else:
        text = str(value).replace("\n", "\\n")
    return text if len(text) <= width else text[:width - 1] + "…"


def format_table(rows: Sequence[dict], columns: Optional[Sequence[str]] = None, max_width: int = 40) -> str:
    """A plain-text table of ``rows`` (dicts) over ``columns`` (default: the first row's keys)."""
    if not rows:
        return "(no rows)"
    columns = list(columns or rows[0].keys())
    cells = [[_cell(r.get(c, ""), max_width) for c in columns] for r in rows]
    widths = [max(len(c), *(len(row[k]) for row in cells)) for k, c in enumerate(columns)]
    line = lambda values: "  ".join(v.ljust(w) for v, w in zip(values, widths)).rstrip()  # noqa: E731
    return "\n".join([line(columns), line(["-" * w for w in widths]), *(line(row) for row in cells)])


def summary_table(summary: dict) -> str:
    rows = [{"metric": k, "value": v} for k, v in summary.items() if not isinstance(v, (dict, list))]
    return format_table(rows, ["metric", "value"])


def to_json(result: Any) -> str:
    def default(obj):
        if hasattr(obj, "__dataclass_fields__"):
            return asdict(obj)
        if isinstance(obj, (np.integer, np.floating, np.bool_)):
            return obj.item()
        raise TypeError(f"cannot serialise {type(obj).__name__}")
    return json.dumps(result, indent=2, default=default, ensure_ascii=False)
