"""Knowledge circuits across training checkpoints, and the synthetic knowledge corpus they are studied on.

    python -m launch.circuits CKPT [CKPT ...] --entities DATA/entities.jsonl --out OUT [--attribute city]
        [--top-n 0.1] [--curve 0.01,0.05,0.1] [--method EAP-IG] [--ig-steps 5] [--batch-size 16]
        [--max-pairs 64] [--kind new] [--resume]
    python -m launch.circuits corpus --out DATA [--n-new 40] [--n-revised 10] [--seed 0]

CKPT: Hugging Face directories (e.g. exported with save_hf), Orbax run directories (every saved step is a
checkpoint), step directories or exports of any model the trainer makes, a .gguf file or ``smollm2`` (the
base model), oldest first. The prompt pairs are built from the entities file
(written by the ``corpus`` command next to corpus.jsonl and probes.jsonl) with the first checkpoint's
tokenizer (or --tokenizer). Writes OUT/evolution.json (after every checkpoint, with "complete": false
until the last), OUT/pairs.json and PNG plots (see jax_controlllm/circuits/plots.py); --resume continues a
stopped study from OUT/evolution.json. docs/circuits.md explains every number.
"""
from __future__ import annotations

import argparse
import json
import sys
from dataclasses import asdict
from pathlib import Path

from jax_controlllm.circuits.evolution import DEFAULT_CURVE, DEFAULT_TOP_N
from jax_controlllm.config import ConfigError
from jax_controlllm.files import write_text_atomic


def circuit_size(text: str):
    """'5000' -> 5000 edges; '0.1' or '10%' -> that fraction of the graph's edges."""
    text = text.strip()
    try:
        value = float(text[:-1]) / 100 if text.endswith("%") else float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is neither a number of edges (5000) nor a fraction of the "
                                         f"graph's edges (0.1 or 10%)") from None
    if 0 < value < 1:
        return value
    if value >= 1 and value.is_integer() and not text.endswith("%"):
        return int(value)
    raise argparse.ArgumentTypeError(f"{text!r}: give a whole number of edges >= 1 or a fraction in (0, 1)")


def parse_evolve_args(argv) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m launch.circuits", description=__doc__.splitlines()[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("checkpoints", nargs="+", help="checkpoint directories, oldest first")
    p.add_argument("--entities", required=True, help="entities.jsonl written by `python -m launch.circuits corpus`")
    p.add_argument("--out", required=True, help="output directory for evolution.json, pairs.json and plots")
    p.add_argument("--attribute", default="city", help="which attribute's queries to trace")
    p.add_argument("--kind", choices=["new", "revised", "all"], default="all", help="which entities")
    p.add_argument("--tokenizer", help="tokenizer directory or tokenizer.json (default: the first checkpoint's)")
    p.add_argument("--bos-id", type=int, help="token id prepended to every prompt (default: config bos_token_id; "
                                              "-1 for none)")
    p.add_argument("--max-pairs", type=int, default=64, help="at most this many prompt pairs (acquisition is "
                                                             "measured on every entity's query)")
    p.add_argument("--top-n", type=circuit_size, default=DEFAULT_TOP_N,
                   help="edges kept before pruning: a count (5000) or a fraction of the graph's edges (0.1 or 10%%)")
    p.add_argument("--curve", type=lambda text: [circuit_size(x) for x in text.split(",")],
                   default=list(DEFAULT_CURVE), help="circuit sizes of the faithfulness / Hit@k size curve, "
                                                     "comma-separated counts or fractions")
    p.add_argument("--method", choices=["EAP", "EAP-IG"], default="EAP-IG")
    p.add_argument("--ig-steps", type=int, default=5)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--hit-k", type=int, default=10)
    p.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
    p.add_argument("--seed", type=int, default=0, help="seed of the pairing")
    p.add_argument("--resume", action="store_true",
                   help="reuse the checkpoints already analysed in OUT/evolution.json (same settings and pairs, "
                        "same checkpoint paths): a stopped study continues, a longer series adds only new ones")
    return p.parse_args(argv)


def parse_corpus_args(argv) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m launch.circuits corpus",
                                description="write corpus.jsonl, probes.jsonl and entities.jsonl",
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--n-new", type=int, default=40, help="fictional entities")
    p.add_argument("--n-revised", type=int, default=10, help="known people with revised attributes")
    p.add_argument("--max-frequency", type=int, default=8, help="documents per entity: 1..this, long-tailed")
    p.add_argument("--held-out-phrasing", action="store_true", help="keep the query wording out of the corpus")
    p.add_argument("--seed", type=int, default=0)
    return p.parse_args(argv)


def corpus_command(argv) -> int:
    from jax_controlllm.knowledge import CorpusConfig, EntityConfig, build_knowledge_dataset
    args = parse_corpus_args(argv)
    config = CorpusConfig(EntityConfig(n_new=args.n_new, n_revised=args.n_revised,
                                       max_frequency=args.max_frequency, seed=args.seed),
                          held_out_phrasing=args.held_out_phrasing, seed=args.seed)
    for name, path in build_knowledge_dataset(args.out, config).items():
        print(f"{name}: {path}")
    return 0


def study_inputs(args) -> dict:
    """What the prompt pairs depend on besides the checkpoints; a resumed study must match it."""
    return {"entities": str(Path(args.entities).resolve()), "attribute": args.attribute, "kind": args.kind,
            "tokenizer": args.tokenizer, "bos_id": args.bos_id, "max_pairs": args.max_pairs, "seed": args.seed}


def earlier_analyses(out: Path, settings, inputs: dict) -> list:
    """The analyses of OUT/evolution.json, if it was made with these settings and inputs (else a ConfigError)."""
    from jax_controlllm.circuits.evolution import CheckpointAnalysis
    path = out / "evolution.json"
    if not path.is_file():
        return []
    record = json.loads(path.read_text())
    wanted = {**json.loads(json.dumps(asdict(settings))), **inputs}
    had = {**record.get("settings", {}), **record.get("inputs", {})}
    changed = [f"{key} {had.get(key)!r} -> {value!r}" for key, value in wanted.items() if had.get(key) != value]
    if changed:
        raise ConfigError(f"--resume: {path} was made with other settings ({'; '.join(changed)}); "
                          f"use another --out or drop --resume")
    return [CheckpointAnalysis.from_dict(c) for c in record["checkpoints"]]


def write_json(path: Path, record: dict) -> None:
    """Whole or not at all: a study stopped mid-write keeps its previous file."""
    write_text_atomic(path, json.dumps(record, indent=1))


def evolve_command(argv) -> int:
    from jax_controlllm.circuits.checkpoints import checkpoint_refs
    from jax_controlllm.circuits.evolution import EvolutionSettings, analyze_evolution
    from jax_controlllm.circuits.plots import plot_evolution
    from jax_controlllm.knowledge import load_entities, make_prompt_pairs
    from jax_controlllm.tokenizer import load_tokenizer, tokenizer_source_for

    args = parse_evolve_args(argv)
    refs = checkpoint_refs(args.checkpoints, args.dtype)
    entities = [e for e in load_entities(args.entities) if args.kind in ("all", e.kind)]
    tokenizer = load_tokenizer(tokenizer_source_for(args.tokenizer or args.checkpoints[0]))
    settings = EvolutionSettings(top_n=args.top_n, curve=tuple(args.curve), method=args.method,
                                 ig_steps=args.ig_steps, batch_size=args.batch_size, hit_k=args.hit_k,
                                 dtype=args.dtype)
    out = Path(args.out)
    inputs = study_inputs(args)
    done = earlier_analyses(out, settings, inputs) if args.resume else []
    out.mkdir(parents=True, exist_ok=True)
    cache = {}

    def probes_for(config):
        """Every entity's query, paired; built once, from the first checkpoint's config (BOS id)."""
        if "probes" not in cache:
            bos = config.bos_token_id if args.bos_id is None else (None if args.bos_id < 0 else args.bos_id)
            cache["probes"] = make_prompt_pairs(entities, args.attribute, tokenizer, bos_id=bos,
                                                pad_id=config.pad_token_id or 0, seed=args.seed)
            write_pairs(out / "pairs.json", cache["probes"].head(args.max_pairs), args.attribute)
        return cache["probes"]

    def pairs_for(config):
        return probes_for(config).head(args.max_pairs)

    def save(evolution, complete=False):
        write_json(out / "evolution.json", {**evolution.to_dict(), "inputs": inputs, "complete": complete})

    evolution = analyze_evolution(refs, pairs_for, settings, progress=lambda m: print(m, flush=True),
                                  probes=probes_for, done=done, on_checkpoint=save)
    save(evolution, complete=True)
    plots = plot_evolution(evolution, out)
    for c in evolution.checkpoints:
        hits = "-" if c.hit_at_k is None else f"{c.hit_at_k:.2f} zero-ablated, {c.hit_at_k_mean:.2f} mean-ablated"
        print(f"{c.name}: {c.n_edges} edges, {c.n_nodes} nodes, faithfulness {c.faithfulness:.3f}, "
              f"Hit@{args.hit_k} {hits} (model {c.model_hit_at_k:.2f})")
    print(f"phase change at {evolution.checkpoints[evolution.phase_change].name}; wrote {out / 'evolution.json'}, "
          + ", ".join(str(p) for p in plots.values()))
    return 0


def write_pairs(path: Path, pairs, attribute: str) -> None:
    write_json(path, {
        "attribute": attribute, "clean": [q.prompt for q in pairs.clean],
        "corrupted": [q.prompt for q in pairs.corrupted], "clean_answer": [q.answer for q in pairs.clean],
        "corrupted_answer": [q.answer for q in pairs.corrupted], "clean_ids": pairs.clean_ids.tolist(),
        "corrupted_ids": pairs.corrupted_ids.tolist(), "lengths": pairs.lengths.tolist(),
        "clean_label": pairs.clean_label_ids.tolist(), "corrupted_label": pairs.corrupted_label_ids.tolist()})


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    try:
        if argv[:1] == ["corpus"]:
            return corpus_command(argv[1:])
        return evolve_command(argv)
    except (ConfigError, ValueError, FileNotFoundError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
