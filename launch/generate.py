"""Generate text from a model: ``python -m launch.generate --model smollm2 --chat "What is the capital of France?"``.

The model is an HF directory, a .gguf file, ``smollm2`` (the bundled SmolLM2-135M-Instruct) or one of our
checkpoints (a run directory, a step directory or an export). One prompt streams to the terminal as it is
generated; several prompts (arguments or --prompt-file) are decoded as one batch and printed at the end.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import sys
import time
from pathlib import Path


@contextlib.contextmanager
def one_line_errors(show_traceback: bool = False):
    """Report a user error as one line naming the problem (no traceback) and exit with status 2."""
    try:
        yield
    except KeyboardInterrupt:
        print("\ninterrupted", file=sys.stderr)
        raise SystemExit(130) from None
    except (ValueError, OSError, ImportError) as err:   # our errors are ValueErrors with the fix in the message
        if show_traceback:
            raise
        print(f"error: {err}", file=sys.stderr)
        raise SystemExit(2) from None


def read_prompt_file(path: str) -> list[str]:
    """Prompts from a .jsonl file (field "prompt") or a text file (one prompt per non-empty line)."""
    from jax_controlllm.generate import GenerationError
    p = Path(path)
    if not p.is_file():
        raise GenerationError(f"prompt file {p} does not exist")
    lines = [line for line in p.read_text(encoding="utf-8").splitlines() if line.strip()]
    if p.suffix == ".jsonl":
        prompts = []
        for number, line in enumerate(lines, 1):
            try:
                record = json.loads(line)
            except json.JSONDecodeError as err:
                raise GenerationError(f"{p}:{number}: not valid JSON ({err.msg})") from None
            if not isinstance(record, dict) or not isinstance(record.get("prompt"), str):
                raise GenerationError(f"{p}:{number}: expected {{\"prompt\": \"...\"}} on every line")
            prompts.append(record["prompt"])
        lines = prompts
    if not lines:
        raise GenerationError(f"prompt file {p} has no prompts; write one prompt per line (or JSONL with 'prompt')")
    return lines


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="python -m launch.generate", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("prompts", nargs="*", help="prompt text(s); with --chat, the user message(s)")
    ap.add_argument("--model", required=True, help="HF directory, .gguf file, 'smollm2' or one of our checkpoints")
    ap.add_argument("--tokenizer", help="tokenizer source if not beside the model (HF directory, .gguf, smollm2)")
    ap.add_argument("--prompt-file", help="prompts, one per line (or JSONL with a 'prompt' field)")
    ap.add_argument("--chat", action="store_true", help="wrap each prompt in the tokenizer's chat template")
    ap.add_argument("--system", help="system message for --chat")
    ap.add_argument("--max-new-tokens", type=int, default=128)
    ap.add_argument("--temperature", type=float, default=0.0, help="0 (default) is greedy")
    ap.add_argument("--top-k", type=int, default=0, help="sample among the k most likely tokens (0: off)")
    ap.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass (1: off)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--stop", action="append", default=[], help="stop string (repeatable); not included in output")
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    ap.add_argument("--no-stream", action="store_true", help="print a single prompt's reply only at the end")
    ap.add_argument("--json", help="also write the completions (and timings) to this JSON file")
    ap.add_argument("--traceback", action="store_true", help="show the full traceback on errors")
    return ap.parse_args(argv)


def main(argv=None) -> None:
    args = parse_args(argv)
    with one_line_errors(args.traceback):
        run(args)


def run(args: argparse.Namespace) -> None:
    from jax_controlllm.generate import GenerationError, Sampling, generate_text, load_for_inference

    prompts = list(args.prompts) + (read_prompt_file(args.prompt_file) if args.prompt_file else [])
    if not prompts:
        raise GenerationError("no prompt given; pass the prompt text as an argument or use --prompt-file")
    sampling = Sampling(args.temperature, args.top_k, args.top_p, args.seed).validate()
    start = time.perf_counter()
    print(f"loading {args.model} ...", file=sys.stderr, flush=True)
    config, params, tokenizer = load_for_inference(args.model, args.tokenizer, args.dtype, "--model")
    loaded = time.perf_counter()
    print(f"loaded in {loaded - start:.1f}s ({config.num_hidden_layers} blocks, "
          f"{'expanded' if config.expansion else 'plain'})", file=sys.stderr, flush=True)

    stream = len(prompts) == 1 and not args.no_stream
    on_text = (lambda _, text: print(text, end="", flush=True)) if stream else None
    completions = generate_text(config, params, tokenizer, prompts, args.max_new_tokens, sampling, args.stop,
                                args.chat, args.system, args.batch_size, on_text)
    done = time.perf_counter()
    if stream:
        print()
    else:
        for i, c in enumerate(completions):
            print(f"=== [{i}] {c.prompt}\n{c.text}\n--- ({len(c.tokens)} tokens, {c.finish_reason})")
    new_tokens = sum(len(c.tokens) for c in completions)
    print(f"{new_tokens} new tokens in {done - loaded:.1f}s (compilation included)", file=sys.stderr)
    if args.json:
        Path(args.json).write_text(json.dumps({
            "model": str(args.model), "sampling": vars(sampling), "load_s": loaded - start,
            "generate_s": done - loaded,
            "completions": [vars(c) for c in completions]}, indent=2, ensure_ascii=False), encoding="utf-8")


if __name__ == "__main__":
    main()
