"""Tokenise + pack throughput of the data pipeline on one CPU core.

    python bench/data_throughput.py [--tokenizer DIR] [--seconds 10] [--out bench/results/data_throughput.json]

Corpus: the Python standard library's source files cut into ~2 KB documents (English comments
and docstrings mixed with code; the same bytes on every machine with the same Python), written
as JSONL. Tokenizer: SmolLM2-135M-Instruct's, rebuilt from the bundled GGUF unless --tokenizer
is given. Measures the whole pipeline (read JSONL, shuffle, tokenise, pack, assemble batches)
in pre-training mode and, on synthetic two-turn chats, in SFT mode (chat template rendering
included), next to the bare tokenizer on the same texts. Reports tokens per CPU-second (robust to
other jobs on the machine) and per wall-second. Prints JSON and writes it to --out.
"""
from __future__ import annotations

import os

# one core: pin before the Rust tokenizer starts its thread pool
os.environ["TOKENIZERS_PARALLELISM"] = "false"
os.environ["RAYON_NUM_THREADS"] = "1"
if hasattr(os, "sched_setaffinity"):
    os.sched_setaffinity(0, {sorted(os.sched_getaffinity(0))[0]})

import argparse  # noqa: E402
import json  # noqa: E402
import platform  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import sysconfig  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

from host import cpu_model  # noqa: E402  (bench/host.py: run as python bench/data_throughput.py)

from jax_controlllm.data import DataConfig, make_data_iterator  # noqa: E402
from jax_controlllm.tokenizer import load_tokenizer  # noqa: E402

DOC_CHARS = 2000


def stdlib_documents(limit: int) -> list[str]:
    """~2 KB pieces of the standard library's .py files, in sorted file order."""
    docs = []
    for path in sorted(Path(sysconfig.get_paths()["stdlib"]).glob("*.py")):
        text = path.read_text(encoding="utf-8", errors="replace")
        for start in range(0, len(text), DOC_CHARS):
            docs.append(text[start:start + DOC_CHARS])
            if len(docs) >= limit:
                return docs
    return docs


def chats(docs: list[str]) -> list[dict]:
    return [{"messages": [{"role": "user", "content": f"Explain this code:\n{d[:600]}"},
                          {"role": "assistant", "content": d[600:]}]} for d in docs]


def smollm2_tokenizer_dir(workdir: Path) -> Path:
    from jax_controlllm.convert.gguf import gguf_to_hf_dir, smollm2_gguf_path
    return gguf_to_hf_dir(smollm2_gguf_path(), workdir / "smollm2", progress=False)


def measure_pipeline(config: dict, tokenizer, seconds: float, batch: int, seq_len: int) -> dict:
    iterator = make_data_iterator(DataConfig.from_dict(config), tokenizer, batch, seq_len, seed=0)
    next(iterator)                                     # warm up: file index, first tokeniser call
    start_stats, start, cpu_start = dict(iterator.stats), time.perf_counter(), time.process_time()
    while time.perf_counter() - start < seconds:
        next(iterator)
    elapsed, cpu = time.perf_counter() - start, time.process_time() - cpu_start
    stats = iterator.stats
    tokens = stats["tokens"] - start_stats["tokens"]
    return {"tokens_per_cpu_s": round(tokens / cpu), "tokens_per_s": round(tokens / elapsed), "documents_per_s": round(
        (stats["documents"] - start_stats["documents"]) / elapsed, 1), "batches": stats["batches"] - 1,
        "seconds": round(elapsed, 2), "fill_ratio": round(stats["fill_ratio"], 4),
        "documents_per_row": round(stats["documents_per_row"], 2), "batch_size": batch, "seq_len": seq_len}


def measure_tokenizer(tokenizer, texts: list[str], chunk: int = 128) -> dict:
    backend = tokenizer.backend_tokenizer
    backend.encode_batch(texts[:chunk], add_special_tokens=False)     # warm up
    start, cpu_start, tokens = time.perf_counter(), time.process_time(), 0
    for _ in range(3):
        for i in range(0, len(texts), chunk):
            tokens += sum(len(e.ids) for e in backend.encode_batch(texts[i:i + chunk], add_special_tokens=False))
    elapsed, cpu = time.perf_counter() - start, time.process_time() - cpu_start
    return {"tokens_per_cpu_s": round(tokens / cpu), "tokens_per_s": round(tokens / elapsed), "tokens": tokens,
            "seconds": round(elapsed, 2)}


def versions() -> dict:
    import grain
    import numpy
    import tokenizers
    import transformers
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                                cwd=Path(__file__).parent, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        commit = None
    return {"python": platform.python_version(), "tokenizers": tokenizers.__version__,
            "transformers": transformers.__version__, "grain": getattr(grain, "__version__", "?"),
            "numpy": numpy.__version__, "jax_controlllm_commit": commit}


def machine() -> dict:
    cpu = cpu_model()
    return {"cpu": cpu, "cores_used": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
            "cores_total": os.cpu_count(), "platform": platform.platform(),
            # other jobs on the machine slow a one-core measurement down: record how busy it was
            "load_average_1m": round(os.getloadavg()[0], 2) if hasattr(os, "getloadavg") else None}


def main(argv=None) -> dict:
    load_before = machine()["load_average_1m"]
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tokenizer", help="tokenizer directory (default: SmolLM2 from the bundled GGUF)")
    parser.add_argument("--seconds", type=float, default=10.0, help="measuring time per mode")
    parser.add_argument("--documents", type=int, default=4000)
    parser.add_argument("--batch-size", dest="batch_size", type=int, default=8)
    parser.add_argument("--seq-len", dest="seq_len", type=int, default=2048)
    parser.add_argument("--out", default=str(Path(__file__).parent / "results" / "data_throughput.json"))
    args = parser.parse_args(argv)

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        tokenizer = load_tokenizer(args.tokenizer or smollm2_tokenizer_dir(tmp))
        docs = stdlib_documents(args.documents)
        with open(tmp / "docs.jsonl", "w") as f:
            f.writelines(json.dumps({"text": d}) + "\n" for d in docs)
        with open(tmp / "chats.jsonl", "w") as f:
            f.writelines(json.dumps(c) + "\n" for c in chats(docs))
        results = {
            "tokenizer_only": measure_tokenizer(tokenizer, docs),
            "pretrain_packed": measure_pipeline({"sources": [str(tmp / "docs.jsonl")]}, tokenizer, args.seconds,
                                                args.batch_size, args.seq_len),
            "sft_packed": measure_pipeline({"sources": [str(tmp / "chats.jsonl")], "mode": "sft"}, tokenizer,
                                           args.seconds, args.batch_size, args.seq_len),
        }
    report = {"benchmark": "data_throughput",
              "what": "tokenise + pack: non-padding tokens per second on one pinned CPU core. tokens_per_cpu_s "
                      "divides by the process's CPU time (what one uncontended core delivers); tokens_per_s by "
                      "wall time (lower when other jobs share the core, see load_average_1m)",
              "command": " ".join([Path(sys.executable).name, *sys.argv]),
              "tokenizer": args.tokenizer or "SmolLM2-135M-Instruct (bundled GGUF)",
              "load_average_1m_before": load_before,
              "corpus": f"{len(docs)} documents of <= {DOC_CHARS} chars from the Python "
                        f"{platform.python_version()} stdlib sources",
              "machine": machine(), "versions": versions(), "results": results}
    print(json.dumps(report, indent=2))
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=2) + "\n")
    return report


if __name__ == "__main__":
    main()
