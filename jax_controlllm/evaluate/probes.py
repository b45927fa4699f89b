"""Knowledge probes (exact match of the greedy answer, answer log-likelihood and rank) and retention of a
trained model against its base on the same probes."""
from __future__ import annotations

from typing import Optional, Sequence

import numpy as np

from jax_controlllm.config import ModelConfig
from jax_controlllm.evaluate.batches import progress_bar
from jax_controlllm.evaluate.readers import EvalInputError, Probe
from jax_controlllm.evaluate.scoring import encode_pair, kl_from_base, score_continuations, split_for_scoring
from jax_controlllm.generate import GREEDY, generate_ids
from jax_controlllm.tokenizer import chat_prompt, encode, eos_ids_of, pad_id_of


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
    pad = pad_id_of(config, tokenizer)
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
    eos, pad = eos_ids_of(config, tokenizer), pad_id_of(config, tokenizer)
    outputs: list[str] = [""] * len(prompts)
    starts = range(0, len(order), batch_size)
    for start in progress_bar(starts, progress, "greedy answers", len(starts)):
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
