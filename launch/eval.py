"""Evaluate a model: perplexity, knowledge probes, multiple choice, retention against a base model.

    python -m launch.eval perplexity --model smollm2 --data docs.jsonl
    python -m launch.eval probes     --model runs/demo --probes probes.jsonl
    python -m launch.eval mc         --model smollm2 --data mmlu.jsonl --few-shot 5
    python -m launch.eval retention  --model runs/demo --base smollm2 --probes probes.jsonl --kl-data docs.jsonl

Models are HF directories, .gguf files, 'smollm2' or our checkpoints. Results print as tables; --out writes
the full JSON (per-item results included).
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from launch.generate import one_line_errors


def parse_args(argv=None) -> argparse.Namespace:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--model", required=True, help="HF directory, .gguf file, 'smollm2' or one of our checkpoints")
    common.add_argument("--tokenizer", help="tokenizer source if not beside the model")
    common.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    common.add_argument("--batch-size", type=int, default=16)
    common.add_argument("--out", help="write the full results as JSON here")
    common.add_argument("--show", type=int, default=20, help="per-item rows to print (0: none, -1: all)")
    common.add_argument("--traceback", action="store_true", help="show the full traceback on errors")

    ap = argparse.ArgumentParser(prog="python -m launch.eval", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="task", required=True)
    ppl = sub.add_parser("perplexity", parents=[common], help="mean token loss / perplexity on documents")
    _add_text_data(ppl, "--data", required=True)

    probes = sub.add_parser("probes", parents=[common], help="knowledge probes: exact match + answer likelihood")
    _add_probe_options(probes)

    mc = sub.add_parser("mc", parents=[common], help="multiple choice (MMLU-style JSONL) by log-likelihood")
    mc.add_argument("--data", required=True, help='JSONL: {"question", "choices": [...], "answer": 0 or "A"}')
    mc.add_argument("--dev", help="few-shot examples (same format); default: the other questions")
    mc.add_argument("--few-shot", type=int, default=0)
    mc.add_argument("--score", choices=["letter", "text"], default="letter")

    ret = sub.add_parser("retention", parents=[common], help="kept / lost / gained probes and KL against a base")
    ret.add_argument("--base", required=True, help="the base model to compare with (same forms as --model)")
    _add_probe_options(ret)
    _add_text_data(ret, "--kl-data", required=False)
    return ap.parse_args(argv)


def _add_probe_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--probes", required=True, help='JSONL: {"prompt": "...", "answer": "..."} per line')
    p.add_argument("--chat", action="store_true", help="wrap prompts in the chat template")
    p.add_argument("--max-new-tokens", type=int, help="greedy budget (default: answer length + 2)")
    p.add_argument("--ignore-case", action="store_true")
    p.add_argument("--match", choices=["prefix", "contains"], default="prefix")


def _add_text_data(p: argparse.ArgumentParser, flag: str, required: bool) -> None:
    p.add_argument(flag, required=required, help="documents: JSONL (--text-field) or text, one per line")
    p.add_argument("--text-field", default="text")
    p.add_argument("--seq-len", type=int, default=512)
    p.add_argument("--max-docs", type=int, help="use only the first N documents")
    p.add_argument("--max-tokens", type=int, help="stop adding documents after about N tokens")


def main(argv=None) -> None:
    args = parse_args(argv)
    with one_line_errors(args.traceback):
        run(args)


def run(args: argparse.Namespace) -> None:
    from jax_controlllm import evaluate as ev
    from jax_controlllm.generate import load_for_inference

    data = _read_inputs(args)                         # bad files fail before any model is loaded
    started = time.perf_counter()
    config, params, tokenizer = _load(args.model, args.tokenizer, args.dtype, load_for_inference, "--model")
    options = dict(batch_size=args.batch_size, progress=True)
    if args.task == "perplexity":
        batches = _text_batches(ev, tokenizer, data["docs"], args)
        result = {"summary": ev.perplexity(config, params, batches, progress=True)}
    elif args.task == "probes":
        result = ev.probe_accuracy(config, params, tokenizer, data["probes"], **_probe_kwargs(args), **options)
    elif args.task == "mc":
        result = ev.multiple_choice_accuracy(config, params, tokenizer, data["questions"], args.few_shot,
                                             data.get("dev"), args.score, **options)
    else:
        base_config, base_params, _ = _load(args.base, args.tokenizer or _tokenizer_hint(args), args.dtype,
                                            load_for_inference, "--base")
        batches = _text_batches(ev, tokenizer, data["docs"], args) if "docs" in data else None
        result = ev.retention_report(config, params, base_config, base_params, tokenizer, data["probes"], batches,
                                     **_probe_kwargs(args), **options)
    result["summary"]["seconds"] = round(time.perf_counter() - started, 2)
    _print(ev, args, result)
    if args.out:
        Path(args.out).write_text(ev.to_json({"task": args.task, "model": args.model, **result}) + "\n",
                                  encoding="utf-8")
        print(f"results written to {args.out}", file=sys.stderr)


def _read_inputs(args) -> dict:
    from jax_controlllm import evaluate as ev
    data = {}
    if args.task in ("probes", "retention"):
        data["probes"] = ev.read_probes(args.probes)
    if args.task == "mc":
        data["questions"] = ev.read_choice_questions(args.data)
        if args.dev:
            data["dev"] = ev.read_choice_questions(args.dev)
    text = args.data if args.task == "perplexity" else getattr(args, "kl_data", None)
    if text:
        data["docs"] = ev.read_documents(text, args.text_field, args.max_docs)
    return data


def _load(model, tokenizer, dtype, load_for_inference, flag):
    print(f"loading {model} ...", file=sys.stderr, flush=True)
    start = time.perf_counter()
    loaded = load_for_inference(model, tokenizer, dtype, flag)
    print(f"loaded {model} in {time.perf_counter() - start:.1f}s", file=sys.stderr, flush=True)
    return loaded


def _tokenizer_hint(args):
    """The base model loads its own tokenizer when it has one; otherwise it shares the model's source."""
    from jax_controlllm.tokenizer import TokenizerError, tokenizer_source_for
    try:
        tokenizer_source_for(args.base)
        return None
    except TokenizerError:
        return tokenizer_source_for(args.model)


def _probe_kwargs(args) -> dict:
    return dict(chat=args.chat, max_new_tokens=args.max_new_tokens, case_sensitive=not args.ignore_case,
                match=args.match)


def _text_batches(ev, tokenizer, docs, args):
    return ev.text_batches(tokenizer, docs, args.seq_len, args.batch_size, args.max_tokens)


def _print(ev, args, result: dict) -> None:
    print(ev.summary_table(result["summary"]))
    by_subject = result["summary"].get("by_subject")
    if by_subject and len(by_subject) > 1:
        print("\n" + ev.format_table([{"subject": k, "accuracy": v} for k, v in by_subject.items()]))
    items = result.get("items") or []
    shown = items if args.show < 0 else items[:args.show]
    columns = {"probes": ["id", "prompt", "answer", "output", "exact_match", "first_token_rank", "answer_logprob"],
               "mc": ["subject", "question", "answer", "predicted", "correct"],
               "retention": ["id", "status", "prompt", "answer", "base_output", "output", "base_rank", "rank"]}
    if shown and args.task in columns:
        if args.task == "retention":   # what changed first
            shown = sorted(shown, key=lambda it: ["lost", "gained", "kept", "never"].index(it["status"]))
        print("\n" + ev.format_table(shown, columns[args.task]))
        if len(shown) < len(items):
            print(f"({len(items) - len(shown)} more rows; --show -1 prints all, --out writes JSON)")


if __name__ == "__main__":
    main()
