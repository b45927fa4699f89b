"""Data pipeline CLI: look at what the model will be trained on, and prepare TFDS datasets.

    python -m launch.data inspect --config configs/tiny.yaml [--n 3] [--split eval] [--set data.packing=false]
    python -m launch.data prepare --input 'corpus/*.jsonl' --name my_corpus --data-dir ~/tensorflow_datasets \
        [--eval-fraction 0.01]

``inspect`` takes a run config (its ``data``, ``train.batch_size``, ``train.seq_len``,
``train.seed``, and the tokenizer training would use: ``data.tokenizer``, else the base
model's) or a YAML holding just a data config (a mapping with ``sources``).
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

from jax_controlllm.config import ConfigError, apply_overrides, load_config, read_yaml
from jax_controlllm.data import DataConfig, DataError, make_data_iterator
from jax_controlllm.data.prepare import prepare_tfds
from jax_controlllm.data.report import MASK_CLOSE, MASK_OPEN, format_row, packing_summary


def _settings(args, scratch: Path) -> tuple[DataConfig, dict]:
    """The data config and batch settings from --config (+ --set overrides) and the flags."""
    raw = read_yaml(args.config)
    train = {"batch_size": 8, "seq_len": 512, "seed": 0}
    tokenizer = args.tokenizer
    if "sources" in raw:                                   # a bare data config
        data = DataConfig.from_dict(apply_overrides(raw, [o.removeprefix("data.") for o in args.set]))
        tokenizer = tokenizer or data.tokenizer
    else:
        run = load_config(args.config, args.set)
        data = run.data
        if data.synthetic:
            raise ConfigError(f"{args.config}: data.source is synthetic (generated tokens, no records to inspect); "
                              "inspect a config with data.sources")
        data.validate()
        train = {"batch_size": run.train.batch_size, "seq_len": run.train.seq_len, "seed": run.train.seed}
        if tokenizer is None:                              # as training does: data.tokenizer, else the base model's
            from jax_controlllm.tokenizer import run_tokenizer_source
            tokenizer = run_tokenizer_source(run, scratch)
    for key in ("batch_size", "seq_len", "seed"):
        if getattr(args, key) is not None:
            train[key] = getattr(args, key)
    if tokenizer is None:
        raise ConfigError("no tokenizer: set data.tokenizer (a local Hugging Face tokenizer directory) or pass "
                          "--tokenizer DIR")
    train["tokenizer"] = tokenizer
    return data, train


def inspect_command(args) -> None:
    with tempfile.TemporaryDirectory() as scratch:         # a GGUF base model's tokenizer is written here
        _inspect(args, *_settings(args, Path(scratch)))


def _inspect(args, data: DataConfig, train: dict) -> None:
    iterator = make_data_iterator(data, train["tokenizer"], train["batch_size"], train["seq_len"], train["seed"],
                                  split=args.split)
    print(f"# {args.split} batches of {train['batch_size']} x {train['seq_len']} tokens, mode {data.mode}, "
          f"packing {'on' if data.packing else 'off'}; special tokens {iterator.policy.describe(iterator.tokenizer)}")
    print(f"# text inside {MASK_OPEN} {MASK_CLOSE} is not trained (prompt, padding, first token of a document)\n")
    shown, batches = 0, 0
    for batch in iterator:
        batches += 1
        for r in range(len(batch["input_ids"])):
            if shown < args.n and (batch["segment_ids"][r] > 0).any():
                print(f"=== row {shown} (batch {batches - 1}, row {r}) ===")
                print(format_row(iterator.tokenizer, batch, r), end="\n\n")
                shown += 1
        if batches >= args.batches and shown >= args.n:
            break
    print("=== packing statistics ===")
    print(packing_summary(iterator.stats, train["seq_len"]))


def prepare_command(args) -> None:
    inputs = [{"path": p, "format": args.format, "text_unit": args.text_unit} for p in args.input]
    data = DataConfig(text_field=args.text_field, skip_bad_records=args.skip_bad_records)   # reader settings
    summary = prepare_tfds(inputs, args.name, args.data_dir, version=args.version, eval_fraction=args.eval_fraction,
                           data=data, overwrite=args.overwrite)
    print(json.dumps(summary, indent=2))
    use = {"name": args.name, "data_dir": args.data_dir}
    print(f"\nuse it with: data: {{sources: [{json.dumps(use)}]"
          f"{', eval_split: validation' if args.eval_fraction > 0 else ''}}}")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m launch.data", description=__doc__.split("\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)

    inspect = commands.add_parser("inspect", help="print decoded rows with unscored spans marked, and packing stats")
    inspect.add_argument("--config", required=True, help="run config YAML (or a data config YAML)")
    inspect.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="config override")
    inspect.add_argument("--n", type=int, default=3, help="rows to print")
    inspect.add_argument("--batches", type=int, default=10, help="batches to gather statistics over")
    inspect.add_argument("--split", choices=("train", "eval"), default="train")
    inspect.add_argument("--tokenizer", help="tokenizer directory (default: data.tokenizer)")
    inspect.add_argument("--batch-size", dest="batch_size", type=int)
    inspect.add_argument("--seq-len", dest="seq_len", type=int)
    inspect.add_argument("--seed", type=int)

    prepare = commands.add_parser("prepare", help="build a TFDS array_record dataset from local files")
    prepare.add_argument("--input", action="append", required=True, help="glob of local files (repeatable)")
    prepare.add_argument("--name", required=True, help="TFDS dataset name (snake_case)")
    prepare.add_argument("--data-dir", dest="data_dir", default="~/tensorflow_datasets")
    prepare.add_argument("--version", default="1.0.0")
    prepare.add_argument("--format", default="auto", help="auto | jsonl | parquet | text | hf_disk")
    prepare.add_argument("--text-field", dest="text_field", default="text", help="field name for plain-text files")
    prepare.add_argument("--text-unit", dest="text_unit", default="line", help="plain text: line | file")
    prepare.add_argument("--eval-fraction", dest="eval_fraction", type=float, default=0.0,
                         help="hold out this fraction as the 'validation' split")
    prepare.add_argument("--skip-bad-records", dest="skip_bad_records", action="store_true")
    prepare.add_argument("--overwrite", action="store_true")

    args = parser.parse_args(argv)
    try:
        (inspect_command if args.command == "inspect" else prepare_command)(args)
    except (DataError, ConfigError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
