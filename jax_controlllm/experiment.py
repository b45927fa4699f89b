"""Acquisition and retention around a training run: the knowledge corpus before, the report after.

    run, knowledge = prepare_knowledge(run, run_dir)   # writes the corpus; the run reads it (data.sources)
    ... train ...
    report = acquisition_retention_report(run, run_dir)   # base vs trained, printed and saved as JSON

Acquisition: held-out queries about the new entities (exact match of the greedy answer, first-token rank).
Retention: general-knowledge probes that the *base* model answers correctly (checked here, never assumed),
and the mean KL of next-token distributions from the base on plain text.
"""
from __future__ import annotations

import dataclasses
import json
import time
from pathlib import Path
from typing import Optional

from jax_controlllm.config import ConfigError, KnowledgeConfig, ReportConfig, RunConfig, SourceConfig, plain
from jax_controlllm.files import write_text_atomic


def prepare_knowledge(run: RunConfig, run_dir: str | Path) -> tuple[RunConfig, Optional[dict]]:
    """Write the run's knowledge corpus (deterministic from its ``knowledge`` section) under run_dir/knowledge.
    Returns the run to train, which reads the corpus when the config names no data sources (a new config: the
    given one is not changed), and the corpus's file paths (None without a `knowledge` section)."""
    spec = run.knowledge
    if spec is None:
        return run, None
    from jax_controlllm.knowledge import CorpusConfig, build_knowledge_dataset

    record = check_knowledge_record(Path(run_dir) / "knowledge", spec)
    paths = build_knowledge_dataset(Path(run_dir) / "knowledge",
                                    CorpusConfig(spec.entities(), spec.held_out_phrasing, spec.seed))
    sources = [SourceConfig(path=str(paths["corpus"]))]
    if spec.replay_documents:
        paths["replay"] = write_replay(run, Path(run_dir), spec)
        sources.append(SourceConfig(path=str(paths["replay"]), weight=spec.replay_weight,
                                    lm_loss=spec.replay_lm_loss))
    if not run.data.sources and not run.data.synthetic:
        run = dataclasses.replace(run, data=dataclasses.replace(run.data, sources=tuple(sources)))
    if not record.is_file():
        write_text_atomic(record, json.dumps(written_from(spec), indent=1))
    return run, {k: str(v) for k, v in paths.items()}


# The knowledge keys that decide what is written under RUN/knowledge (replay_weight and replay_lm_loss only
# weight the sources the run reads, so a resume may change them with --allow-change).
WRITTEN_FROM = ("n_new", "n_revised", "attributes", "max_frequency", "frequency_exponent", "held_out_phrasing",
                "seed", "replay_documents", "replay_topics")


def written_from(spec: KnowledgeConfig) -> dict:
    return {k: plain(getattr(spec, k)) for k in WRITTEN_FROM}


def check_knowledge_record(knowledge_dir: Path, spec: KnowledgeConfig) -> Path:
    """RUN/knowledge/spec.json records the knowledge keys its files were written from. A run directory whose
    corpus was written from other values is refused in one line, before anything there is rewritten: its
    checkpoints were trained on that corpus. Returns the record's path (written once the files are)."""
    path = knowledge_dir / "spec.json"
    if not path.is_file():
        return path
    recorded, wanted = json.loads(path.read_text()), written_from(spec)
    changed = [k for k in WRITTEN_FROM if recorded.get(k) != wanted[k]]
    if changed:
        what = ", ".join(f"knowledge.{k} ({recorded.get(k)} -> {wanted[k]})" for k in changed)
        raise ConfigError(f"{knowledge_dir.parent}: its knowledge corpus was written with another {what} ({path}) "
                          f"and its checkpoints were trained on it; for a new corpus start a new run with another "
                          f"--out (base.path may name this run)")
    return path


def write_replay(run: RunConfig, run_dir: Path, spec: KnowledgeConfig) -> Path:
    """run_dir/knowledge/replay.jsonl: the base model's continuations of neutral openers (written once; a
    resume reads the same file)."""
    from jax_controlllm.knowledge.corpus import write_corpus_jsonl
    from jax_controlllm.knowledge.replay import openers_for, replay_documents
    from jax_controlllm.tokenizer import load_tokenizer, run_tokenizer_source
    from jax_controlllm.train.setup import load_base_weights

    path = run_dir / "knowledge" / "replay.jsonl"
    if path.is_file():
        return path
    if run.base.path is None:
        raise ConfigError("knowledge.replay_documents: replay text is written by the base model, but base.path is "
                          "not set; set base.path or knowledge.replay_documents: 0")
    config, params = load_base_weights(run)
    openers = openers_for(spec.attributes if spec.replay_topics else ())
    docs = replay_documents(config, params, load_tokenizer(run_tokenizer_source(run, run_dir)),
                            spec.replay_documents, seed=spec.seed, openers=openers)
    return write_corpus_jsonl(path, docs)


def _retention_probes():
    from jax_controlllm.evaluate import Probe
    from jax_controlllm.retention.general import FACTS
    return [Probe(prompt, answer, id=f"general-{i}") for i, (prompt, answer) in enumerate(FACTS)]


def _knowledge_probes(run_dir: Path):
    from jax_controlllm.evaluate import read_probes
    path = run_dir / "knowledge" / "probes.jsonl"
    return read_probes(path) if path.is_file() else []


def evaluate_pair(base_config, base_params, config, params, tokenizer, run_dir: Path, spec: ReportConfig,
                  progress: bool = True, base_cache: Optional[dict] = None) -> dict:
    """Base and trained model on the same probes: acquisition, verified retention and KL from the base.
    ``base_cache`` (a dict kept by the caller) reuses the base model's results across trained models."""
    cache = base_cache if base_cache is not None else {}

    def base_probes(key, probes):
        if key not in cache:
            cache[key] = probe_accuracy(base_config, base_params, tokenizer, probes, batch_size=spec.batch_size,
                                        progress=progress)
        return cache[key]

    from jax_controlllm.evaluate import probe_accuracy, retention_report, text_batches
    from jax_controlllm.retention.general import GENERAL_TEXT

    report: dict = {}
    knowledge = _knowledge_probes(run_dir)
    if spec.knowledge_probes and knowledge:
        before = base_probes("knowledge", knowledge)
        after = probe_accuracy(config, params, tokenizer, knowledge, batch_size=spec.batch_size, progress=progress)
        report["acquisition"] = {"base": before["summary"], "trained": after["summary"],
                                 "examples": [{k: it[k] for k in ("prompt", "answer", "output", "exact_match")}
                                              for it in after["items"][:5]]}
    if spec.retention_probes:
        probes = _retention_probes()
        base = base_probes("retention", probes)
        verified = [p for p, it in zip(probes, base["items"]) if it["exact_match"]]
        if not verified:
            raise ConfigError("report: the base model answers none of the general-knowledge probes; "
                              "retention cannot be measured on this model")
        base_verified = {"summary": base["summary"], "items": [it for it in base["items"] if it["exact_match"]]}
        kl = text_batches(tokenizer, list(GENERAL_TEXT), seq_len=96, batch_size=8) if spec.kl_text else None
        retained = retention_report(config, params, base_config, base_params, tokenizer, verified, kl,
                                    batch_size=spec.batch_size, base_results=base_verified, progress=progress)
        report["retention"] = {**retained["summary"], "probes_offered": len(probes),
                               "probes_base_answers": len(verified),
                               "lost_examples": [it for it in retained["items"] if it["status"] == "lost"][:5]}
    return report


def format_report(report: dict) -> str:
    lines = ["", "=" * 72, "Before / after report", "=" * 72]
    acq = report.get("acquisition")
    if acq:
        b, t = acq["base"], acq["trained"]
        lines += [f"Acquisition ({b['probes']} held-out queries about new entities)",
                  f"  exact match         base {b['exact_match']:6.1%}   ->  trained {t['exact_match']:6.1%}",
                  f"  answer in top-10    base {b['hit@10']:6.1%}   ->  trained {t['hit@10']:6.1%}",
                  f"  mean first-token rank  base {b['mean_first_token_rank']:8.1f}  ->  trained "
                  f"{t['mean_first_token_rank']:8.1f}"]
    ret = report.get("retention")
    if ret:
        lines += [f"Retention ({ret['probes_base_answers']} of {ret['probes_offered']} general-knowledge probes "
                  f"the base answers correctly)",
                  f"  still correct       base 100.0%   ->  trained {ret['retention']:6.1%} "
                  f"(kept {ret['kept']}, lost {ret['lost']})"]
        if "kl_from_base" in ret:
            lines.append(f"  KL from base on general text: {ret['kl_from_base']:.4f} nats/token (base: 0)")
    lines.append("=" * 72)
    return "\n".join(lines)


def acquisition_retention_report(run: RunConfig, run_dir: str | Path, progress: bool = True) -> Optional[dict]:
    """After training: load the base model and the run's latest checkpoint, evaluate both, print, save JSON,
    and export the trained model as a Hugging Face directory (release format)."""
    spec = run.report
    if spec is None:
        return None
    from jax_controlllm.checkpoint import load_model
    from jax_controlllm.convert.auto import load_pretrained
    from jax_controlllm.tokenizer import load_tokenizer, run_tokenizer_source

    run_dir = Path(run_dir)
    start = time.time()
    policy = {k: getattr(run.model, k) for k in ("param_dtype", "frozen_dtype", "compute_dtype")}
    base_config, base_params = load_pretrained(run.base.path, run.base.format, **policy)
    config, params = load_model(run_dir)
    tokenizer = load_tokenizer(run_tokenizer_source(run, run_dir))
    report = evaluate_pair(base_config, base_params, config, params, tokenizer, run_dir, spec, progress)
    if spec.export_hf:
        from jax_controlllm.convert.export import export_hf
        export_hf(config, params, run_dir / "hf", tokenizer=run_tokenizer_source(run, run_dir))
        report["export"] = str(run_dir / "hf")
    report["seconds"] = round(time.time() - start, 1)
    (run_dir / "report.json").write_text(json.dumps(report, indent=2, default=str))
    print(format_report(report), flush=True)
    return report
