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

Modules by job: ``readers`` (input files), ``batches`` (token windows, padding), ``scoring`` (perplexity, KL,
continuation log-likelihoods), ``probes`` (knowledge probes, retention), ``choice`` (multiple choice),
``report`` (tables, JSON).
"""
from jax_controlllm.evaluate.batches import text_batches
from jax_controlllm.evaluate.choice import few_shot_prompt, format_question, multiple_choice_accuracy
from jax_controlllm.evaluate.probes import probe_accuracy, retention_report
from jax_controlllm.evaluate.readers import (
    LETTERS,
    ChoiceQuestion,
    EvalInputError,
    Probe,
    read_choice_questions,
    read_documents,
    read_probes,
)
from jax_controlllm.evaluate.report import format_table, summary_table, to_json
from jax_controlllm.evaluate.scoring import (
    ContinuationScore,
    encode_pair,
    kl_from_base,
    perplexity,
    score_continuations,
    split_for_scoring,
)

__all__ = ["text_batches", "few_shot_prompt", "format_question", "multiple_choice_accuracy", "probe_accuracy",
           "retention_report", "LETTERS", "ChoiceQuestion", "EvalInputError", "Probe", "read_choice_questions",
           "read_documents", "read_probes", "format_table", "summary_table", "to_json", "ContinuationScore",
           "encode_pair", "kl_from_base", "perplexity", "score_continuations", "split_for_scoring"]
