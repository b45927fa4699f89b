"""EAP-IG throughput (prompts per second) on a Llama-3.2-1B-shaped model with random weights.

    python bench/eapig.py [--dtype bfloat16|float32] [--batch 32] [--prompts 512] [--seq 16] [--ig-steps 5]
                          [--precision default|high|highest] [--out bench/results/eapig_<device>_<dtype>.json]
    python bench/eapig.py --smoke          # a tiny shape, seconds on a CPU

Shape: hidden 2048, 16 layers, 32 query / 8 key-value heads, head_dim 64, MLP 8192, vocab 128256, tied
embeddings, llama3 rope scaling (as meta-llama/Llama-3.2-1B). Prompts: random token ids, the corrupted
prompt differs in 4 "subject" tokens, all prompts ``--seq`` tokens long. What is timed: the public
``jax_controlllm.circuits.attribute`` call (EAP-IG, the whole graph: 1 + 16*33 sources x 16*97 + 1
destinations) on all prompts, after one warm-up call that compiles the step; timing ends when the score
matrix is on the host. Prints JSON and writes it to --out.
"""
from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import jax
import numpy as np

from jax_controlllm.circuits import attribute, circuit_model
from jax_controlllm.config import ModelConfig
from jax_controlllm.model import init_params

LLAMA_32_1B = dict(vocab_size=128256, hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
                   num_attention_heads=32, num_key_value_heads=8, head_dim=64, max_position_embeddings=131072,
                   rms_norm_eps=1e-5, rope_theta=500000.0, tie_word_embeddings=True,
                   rope_scaling={"rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0,
                                 "high_freq_factor": 4.0, "original_max_position_embeddings": 8192})
SMOKE = dict(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, head_dim=16, max_position_embeddings=128, tie_word_embeddings=True)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--dtype", choices=["bfloat16", "float32"], default="bfloat16")
    p.add_argument("--precision", choices=["default", "high", "highest"],
                   help="matmul precision (default: highest for float32, XLA's default for bfloat16)")
    p.add_argument("--batch", type=int, default=32, help="prompts per compiled step")
    p.add_argument("--prompts", type=int, default=512, help="prompts per timed call")
    p.add_argument("--seq", type=int, default=16, help="tokens per prompt")
    p.add_argument("--ig-steps", type=int, default=5)
    p.add_argument("--repeats", type=int, default=3, help="timed calls (the best is reported)")
    p.add_argument("--smoke", action="store_true", help="tiny model and few prompts (CPU check)")
    p.add_argument("--out", help="JSON output path (default: bench/results/eapig_<platform>_<dtype>.json)")
    return p.parse_args(argv)


def prompts(n: int, seq: int, vocab: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    clean = rng.integers(3, vocab, size=(n, seq))
    clean[:, 0] = 1                                    # a BOS-like first token
    corrupted = clean.copy()
    corrupted[:, 1:5] = rng.integers(3, vocab, size=(n, 4))
    labels = rng.integers(3, vocab, size=(n, 2))
    labels[:, 1] = np.where(labels[:, 1] == labels[:, 0], labels[:, 0] % (vocab - 3) + 3, labels[:, 1])
    return clean, corrupted, labels[:, 0], labels[:, 1]


def main(argv=None) -> dict:
    args = parse_args(argv)
    shape = SMOKE if args.smoke else LLAMA_32_1B
    n_prompts = min(args.prompts, 2 * args.batch) if args.smoke else args.prompts
    config = ModelConfig(**shape)
    model = circuit_model(config, jax.jit(init_params, static_argnums=0)(config, jax.random.PRNGKey(0)), args.dtype)
    clean, corrupted, clean_label, corrupted_label = prompts(n_prompts, args.seq, config.vocab_size)

    def call():
        return attribute(config, model, clean, corrupted, clean_label, corrupted_label, method="EAP-IG",
                         ig_steps=args.ig_steps, batch_size=args.batch, dtype=args.dtype,
                         precision=args.precision, pad_multiple=1)

    start = time.perf_counter()
    scores = call()                                   # compiles the step (one shape: batch x seq)
    first = time.perf_counter() - start
    times = []
    for _ in range(args.repeats):
        start = time.perf_counter()
        scores = call()
        times.append(time.perf_counter() - start)
    best = min(times)
    device = jax.devices()[0]
    result = {
        "benchmark": "eapig", "model": "smoke" if args.smoke else "llama-3.2-1b-shape (random weights)",
        "device": device.device_kind, "platform": device.platform, "dtype": args.dtype,
        "precision": args.precision or ("highest" if args.dtype == "float32" else "default"),
        "batch": args.batch, "prompts": n_prompts, "seq": args.seq, "ig_steps": args.ig_steps,
        "n_sources": len(scores.sources), "n_destinations": len(scores.destinations),
        "n_edges": int(scores.valid.sum()), "prompts_per_second": n_prompts / best,
        "seconds_per_call": times, "first_call_seconds_with_compile": first,
        "finite": bool(np.isfinite(scores.matrix).all()), "jax": jax.__version__, "python": platform.python_version(),
    }
    if device.platform == "gpu":
        stats = device.memory_stats() or {}
        result["peak_memory_gib"] = stats.get("peak_bytes_in_use", 0) / 2 ** 30
    out = Path(args.out or f"bench/results/eapig_{'smoke' if args.smoke else device.platform}_{args.dtype}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1))
    print(json.dumps(result, indent=1))
    return result


if __name__ == "__main__":
    main()
