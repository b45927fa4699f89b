"""Scoring token batches: perplexity, KL from a base model, and log-likelihoods of continuations.

The jitted pieces take the (frozen, hashable) ModelConfig as a static argument, so each (config, batch
bucket) compiles once; the LM head runs over sequence chunks, so full [B, S, V] logits never exist.
"""
from __future__ import annotations

import dataclasses
import functools
import math
from dataclasses import dataclass
from typing import Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from jax_controlllm.buckets import batch_bucket, pad_rows
from jax_controlllm.config import ModelConfig
from jax_controlllm.evaluate.batches import as_batch, progress_bar
from jax_controlllm.evaluate.readers import EvalInputError
from jax_controlllm.losses import cross_entropy_sum
from jax_controlllm.model.stack import final_hidden, logits_from_hidden
from jax_controlllm.tokenizer import encode


@functools.partial(jax.jit, static_argnums=0)
def _nll(config: ModelConfig, params, ids, mask):
    h = final_hidden(config, params, ids, mask)
    return cross_entropy_sum(config, params, h, jnp.where(mask > 0, ids, -100))


@functools.partial(jax.jit, static_argnums=0)
def _target_scores(config: ModelConfig, params, ids, mask):
    """Per position t: log p(ids[t+1] | ids[:t+1]) and the rank of ids[t+1] (1 = argmax). [B, S-1] each."""
    logits = logits_from_hidden(config, params, final_hidden(config, params, ids, mask)[:, :-1])
    targets = ids[:, 1:, None]
    target_logit = jnp.take_along_axis(logits, targets, axis=-1)
    logprob = target_logit[..., 0] - jax.nn.logsumexp(logits, axis=-1)
    rank = 1 + jnp.sum(logits > target_logit, axis=-1)
    return logprob, rank


@functools.partial(jax.jit, static_argnums=0)
def next_token_logprobs(config: ModelConfig, params, ids, mask, last, candidates):
    """log p(candidate | row up to ``last``) for candidates [B, C] at each row's last real position."""
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
def kl_sum(config: ModelConfig, base_config: ModelConfig, params, base_params, ids, mask):
    """(sum over real positions of KL(base || model), number of positions)."""
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
    config = dataclasses.replace(config, loss_chunk=config.loss_chunk or SCORE_CHUNK)
    total, count = 0.0, 0.0
    for batch in progress_bar(batches, progress, "perplexity"):
        nll, n = _nll(config, params, *as_batch(batch))
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
    total, count = 0.0, 0.0
    for batch in progress_bar(token_batches, progress, "KL from base"):
        kl, n = kl_sum(config, base_config, params, base_params, *as_batch(batch))
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
    order = sorted(range(len(pairs)), key=lambda i: len(pairs[i][0]) + len(pairs[i][1]))  # similar lengths
    scores: list[Optional[ContinuationScore]] = [None] * len(pairs)
    starts = range(0, len(order), batch_size)
    for start in progress_bar(starts, progress, "log-likelihood", len(starts)):
        chunk = order[start:start + batch_size]
        rows = [list(pairs[i][0]) + list(pairs[i][1]) for i in chunk]
        ids, mask = pad_rows(rows, batch_bucket(len(rows), batch_size), pad_id)
        logprob, rank = (np.asarray(x) for x in _target_scores(config, params, jnp.asarray(ids), jnp.asarray(mask)))
        for row, i in enumerate(chunk):
            n_ctx, n_cont = len(pairs[i][0]), len(pairs[i][1])
            span = slice(n_ctx - 1, n_ctx - 1 + n_cont)      # position t scores token t + 1
            scores[i] = ContinuationScore(float(logprob[row, span].sum()), n_cont, int(rank[row, n_ctx - 1]),
                                          bool((rank[row, span] == 1).all()))
    return scores
