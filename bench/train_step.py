"""Training-step throughput of the library's real step (``jax_controlllm.train.build_trainer``).

    python bench/train_step.py --preset w1 --batch 2 --remat selective     # one configuration, prints JSON
    python bench/train_step.py --preset w1 --sweep --record bench/results/h100_train_step.json
    python bench/train_step.py --preset smoke                              # tiny shape, CPU smoke run

Workload W1 (shared/reference/performance/peer_controlllm_h100.json): Llama-3.1-8B shape, random weights,
concat expansion of 8 layers (3, 7, ..., 31), dlerp (gate bias frozen), mse divergence lambda 1, frozen weights
bf16, trainable fp32 master weights, bf16 compute, AdamW + clipping, seq 4096, one optimizer step per batch,
random tokens (labels = inputs, no padding).

FLOPs per token of the required work (``jax_controlllm.train.metrics.flops_per_token``):
    forward of every layer instance (pretrained and expanded branches) and the LM head
  + input gradients only from the first trainable layer up (and the LM head)
  + weight gradients only for trainable weights,
with a layer = 2 * (H * (2 q_width + 2 kv_width) + 3 H * I) per token and causal attention
2 * 2 * S * q_width / 2. Remat recomputation is not counted. MFU = FLOPs/token * tokens/s / 989e12 (H100 bf16).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

PEER_BEST = 12057.7          # tokens/s, peer_controlllm_h100.json: peer_best_any_setting
PEER_RECIPE = 9715.3         # tokens/s, release_recipe_best
H100_PEAK = 989e12

PRESETS = {
    "w1": {
        "model": dict(vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                      num_attention_heads=32, num_key_value_heads=8, max_position_embeddings=131072,
                      rope_theta=500000.0, rms_norm_eps=1e-5,
                      rope_scaling=dict(rope_type="llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
                                        original_max_position_embeddings=8192),
                      param_dtype="float32", frozen_dtype="bfloat16", compute_dtype="bfloat16"),
        "expansion": dict(expand_type="concat", num_exp_layers=8, merge_method="dlerp", interpolation_factor=0.0,
                          freeze_interpolation_factor=True, interpolation_loss_type="mse",
                          interpolation_loss_alpha=1.0),
        "seq_len": 4096,
    },
    "smoke": {
        "model": dict(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=4,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                      param_dtype="float32", frozen_dtype="bfloat16", compute_dtype="bfloat16"),
        "expansion": dict(expand_type="concat", num_exp_layers=2, merge_method="dlerp"),
        "seq_len": 128,
    },
}

# Configurations measured by --sweep on a GPU (each in a fresh process so memory does not carry over).
# Measured on an H100 (bench/results/h100_train_step.json): "none" keeps fp32 norm inputs, the SwiGLU product
# and the dlerp features per layer, so it only fits micro-batch 1 (74 GiB, and only with a 0.95 memory fraction);
# "selective" keeps matmul outputs only and fits micro-batch 2 (fastest); "full" recomputes every layer and fits
# 4 but is slower.
SWEEP = [
    dict(batch=2, remat="selective", attention="cudnn", loss_chunk=1024),
    dict(batch=1, remat="selective", attention="cudnn", loss_chunk=1024),
    dict(batch=4, remat="full", attention="cudnn", loss_chunk=1024),
    dict(batch=1, remat="none", attention="cudnn", loss_chunk=1024),
]


def run_config(args):
    """The RunConfig of one sweep point."""
    from jax_controlllm.config import load_config

    preset = PRESETS[args.preset]
    model = {**preset["model"], "remat": args.remat, "attention_impl": args.attention, "loss_chunk": args.loss_chunk,
             "frozen_matmul": args.frozen_matmul}
    data = {"model": model, "expansion": preset["expansion"],
            "train": dict(mode="controlllm", steps=args.warmup + args.steps, batch_size=args.batch, grad_accum=1,
                          seq_len=preset["seq_len"], lr=5e-5, min_lr=1e-5, warmup_steps=1000, weight_decay=0.01,
                          clip_grad_norm=1.0, async_checkpoint=False),
            "data": {"source": "synthetic"}, "mesh": {"shape": "1"}}
    return load_config(data=data)


def versions() -> dict:
    import jax
    out = {"jax": jax.__version__, "python": platform.python_version()}
    for name in ("jaxlib", "optax", "numpy"):
        try:
            out[name] = __import__(name).__version__
        except Exception:  # noqa: BLE001 - informational only
            pass
    return out


def measure(args) -> dict:
    import jax
    import numpy as np

    from jax_controlllm.sharding import make_mesh
    from jax_controlllm.train import build_trainer
    from jax_controlllm.train.metrics import flops_per_token

    run = run_config(args)
    mesh = make_mesh("1")
    t0 = time.perf_counter()
    trainer = build_trainer(run, mesh)
    seq = run.train.seq_len
    rng = np.random.default_rng(0)

    def batch():
        ids = rng.integers(0, run.model.vocab_size, size=(args.batch, seq), dtype=np.int32)
        host = {"input_ids": ids, "labels": ids, "segment_ids": np.ones_like(ids),
                "positions": np.broadcast_to(np.arange(seq, dtype=np.int32), ids.shape).copy()}
        return {k: jax.device_put(v, trainer.shardings.batch[k]) for k, v in host.items()}

    batches = [batch() for _ in range(2)]
    state, times, losses = trainer.state, [], []
    with jax.set_mesh(mesh):
        compiled = trainer.step_fn
        t_compile = time.perf_counter()
        for i in range(args.warmup + args.steps):
            start = time.perf_counter()
            state, metrics = compiled(state, trainer.frozen, batches[i % 2])
            loss = float(metrics["loss"])  # synchronises
            elapsed = time.perf_counter() - start
            if i == 0:
                first_step = elapsed
            if i >= args.warmup:
                times.append(elapsed)
                losses.append(loss)
    fp8_gemms = fp8_lowering() if args.frozen_matmul != "compute" else None
    profile = None
    if args.profile:
        profile = profile_steps(compiled, state, trainer.frozen, batches, args.profile)
    device = jax.devices()[0]
    stats = device.memory_stats() or {}
    step_s = statistics.median(times)
    tokens_per_s = args.batch * seq / step_s
    fpt = flops_per_token(trainer.model_config, seq)
    return {
        "preset": args.preset, "batch": args.batch, "seq_len": seq, "remat": args.remat,
        "attention": args.attention, "loss_chunk": args.loss_chunk, "frozen_matmul": args.frozen_matmul,
        "tokens_per_s": round(tokens_per_s, 1), "step_s_median": round(step_s, 4),
        "step_s_all": [round(t, 4) for t in times], "first_step_s_incl_compile": round(first_step, 2),
        "setup_s": round(t_compile - t0, 2),
        "peak_memory_gib": round(stats.get("peak_bytes_in_use", 0) / 2 ** 30, 2) or None,
        "flops_per_token": fpt, "model_flops_utilisation": round(fpt * tokens_per_s / H100_PEAK, 4),
        "ratio_vs_peer_best": round(tokens_per_s / PEER_BEST, 3),
        "ratio_vs_peer_release_recipe": round(tokens_per_s / PEER_RECIPE, 3),
        "loss_first_last": [losses[0], losses[-1]], "loss_all": [round(x, 5) for x in losses],
        **({"fp8_lowering": fp8_gemms} if fp8_gemms else {}), "device": device.device_kind, "platform": device.platform,
        "xla_flags": os.environ.get("XLA_FLAGS", ""),
        "mem_fraction": os.environ.get("XLA_PYTHON_CLIENT_MEM_FRACTION"), "versions": versions(),
        **({"profile": profile} if profile else {}),
        "command": "python " + " ".join(sys.argv),
    }


def fp8_lowering() -> dict:
    """How XLA compiles one FP8 projection (model/fp8.py) here, forward and input gradient, on W1-sized
    operands passed as arguments (closed-over constants would be folded): the custom-call targets of the
    optimised HLO and whether one is cuBLASLt's FP8 GEMM. Tells an FP8 row that ran FP8 GEMMs apart from one
    that ran bf16 ones (bench/results/h200_fp8_lowering.json: the dequantise-then-dot form did)."""
    import re

    import jax
    import jax.numpy as jnp

    from jax_controlllm.model.fp8 import FORWARD_DTYPE, fp8_matmul, pow2_scale, quantize

    keys = jax.random.split(jax.random.PRNGKey(0), 3)
    x = jax.random.normal(keys[0], (4096, 4096), jnp.bfloat16)
    w = jax.random.normal(keys[1], (4096, 1024), jnp.float32)
    dy = jax.random.normal(keys[2], (4096, 1024), jnp.bfloat16)
    scale = pow2_scale(w, FORWARD_DTYPE)

    def forward_and_input_gradient(x, w_q, scale, dy):
        y, vjp = jax.vjp(lambda x: fp8_matmul(x, w_q, scale), x)
        return y, vjp(dy)[0]

    text = jax.jit(forward_and_input_gradient).lower(x, quantize(w, FORWARD_DTYPE, scale), scale, dy) \
        .compile().as_text()
    calls = sorted(set(re.findall(r'custom_call_target="([^"]+)"', text)))
    return {"custom_calls": calls, "fp8_gemms": len(re.findall(r'custom_call_target="[^"]*f8[^"]*"', text))}


KERNEL_CLASSES = (  # (class, substrings of the kernel name), first match wins
    ("attention (cuDNN)", ("cudnn", "flash", "fmha", "sdpa")),
    ("matmul", ("gemm", "cutlass", "nvjet", "xmma", "cublas", "sm90_", "matmul")),
    ("copy / transpose", ("memcpy", "memset", "copy", "transpose")),
    ("reduction", ("reduce", "reduction")),
    ("fused element-wise", ("fusion", "loop_", "input_", "wrapped_")),
)


def kernel_class(name: str) -> str:
    low = name.lower()
    return next((cls for cls, keys in KERNEL_CLASSES if any(k in low for k in keys)), "other")


def profile_steps(step, state, frozen, batches, out_dir: str, steps: int = 2) -> dict:
    """Trace ``steps`` steps with jax.profiler and summarise the GPU kernels: total kernel time per step, the
    share of each kernel class and the top kernels by time. Kernel events are those on device (GPU) tracks."""
    import jax
    Path(out_dir).mkdir(parents=True, exist_ok=True)
    with jax.profiler.trace(out_dir, create_perfetto_trace=True):
        for i in range(steps):
            state, metrics = step(state, frozen, batches[i % len(batches)])
        float(metrics["loss"])
    return summarise_trace(out_dir, steps)


def summarise_trace(out_dir: str, steps: int) -> dict:
    import gzip
    from collections import Counter
    path = max(Path(out_dir).rglob("*.trace.json.gz"), key=lambda f: f.stat().st_mtime, default=None) or \
        max(Path(out_dir).rglob("perfetto_trace.json.gz"), key=lambda f: f.stat().st_mtime)
    events = json.loads(gzip.open(path).read())
    events = events["traceEvents"] if isinstance(events, dict) else events
    device_pids = {e["pid"] for e in events if e.get("ph") == "M" and e.get("name") == "process_name"
                   and any(k in str(e.get("args", {}).get("name", "")) for k in ("GPU", "gpu", "/device:"))}
    # A device track holds kernel threads ("Stream #N ...") beside XLA op/module summary lines that would
    # double count; keep the stream threads when there are any.
    threads = {(e["pid"], e["tid"]): str(e.get("args", {}).get("name", "")) for e in events
               if e.get("ph") == "M" and e.get("name") == "thread_name" and e.get("pid") in device_pids}
    streams = {k for k, name in threads.items() if name.lower().startswith("stream")}
    by_name, total = Counter(), 0.0
    for e in events:
        if e.get("ph") == "X" and e.get("pid") in device_pids and "dur" in e and \
                (not streams or (e["pid"], e.get("tid")) in streams):
            by_name[e["name"]] += float(e["dur"])
            total += float(e["dur"])
    by_class = Counter()
    for name, dur in by_name.items():
        by_class[kernel_class(name)] += dur
    share = lambda d: round(d / total, 4) if total else None  # noqa: E731
    return {"trace": str(path), "device_threads": sorted(set(threads.values()))[:12],
            "kernel_ms_per_step": round(total / 1e3 / steps, 2),
            "by_class": {k: share(v) for k, v in by_class.most_common()},
            "top_kernels": [{"name": n[:120], "class": kernel_class(n), "share": share(d),
                             "ms_per_step": round(d / 1e3 / steps, 3)} for n, d in by_name.most_common(20)]}


def sweep(args) -> list[dict]:
    rows = []
    for item in SWEEP:
        cmd = [sys.executable, __file__, "--preset", args.preset, "--steps", str(args.steps), "--warmup",
               str(args.warmup), "--batch", str(item["batch"]), "--remat", item["remat"], "--attention",
               item["attention"], "--loss-chunk", str(item["loss_chunk"])]
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=args.timeout)
        line = next((l for l in reversed(proc.stdout.splitlines()) if l.startswith("{")), None)
        row = json.loads(line) if line else {**item, "error": (proc.stderr or proc.stdout)[-1500:]}
        row["command"] = "python bench/train_step.py " + " ".join(cmd[2:])
        print(json.dumps(row), flush=True)
        rows.append(row)
    return rows


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--preset", choices=sorted(PRESETS), default="smoke")
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--remat", default="none", choices=["none", "selective", "full", "save_dots", "save_dots_no_batch"])
    p.add_argument("--attention", default="cudnn", choices=["cudnn", "xla"])
    p.add_argument("--loss-chunk", type=int, default=0)
    p.add_argument("--frozen-matmul", default="compute", choices=["compute", "fp8", "fp8_backward"],
                   help="model.frozen_matmul: fp8 runs the frozen weights' GEMMs in FP8, fp8_backward only their "
                        "input gradients (model/fp8.py)")
    p.add_argument("--steps", type=int, default=10, help="timed steps (median reported)")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--sweep", action="store_true", help="run the SWEEP configurations, each in a new process")
    p.add_argument("--timeout", type=int, default=420)
    p.add_argument("--mem-fraction", type=float, default=0.95,
                   help="XLA_PYTHON_CLIENT_MEM_FRACTION unless already set (GPU memory XLA may use)")
    p.add_argument("--profile", help="after timing, trace two steps into this directory and summarise the kernels")
    p.add_argument("--record", help="append the JSON rows to this results file (a JSON list)")
    args = p.parse_args(argv)
    # XLA reserves 75% of GPU memory by default; the 8B step at micro-batch 2 needs ~71 GiB of the 80. Set
    # before JAX starts (below, or in measure()); sweep subprocesses inherit it.
    os.environ.setdefault("XLA_PYTHON_CLIENT_MEM_FRACTION", str(args.mem_fraction))
    if args.attention == "cudnn" and args.preset == "smoke":
        import jax
        if jax.devices()[0].platform != "gpu":
            args.attention = "xla"  # cuDNN exists only on NVIDIA GPUs
    rows = sweep(args) if args.sweep else [measure(args)]
    if not args.sweep:
        print(json.dumps(rows[0]))
    if args.record:
        path = Path(args.record)
        old = json.loads(path.read_text()) if path.exists() else []
        path.write_text(json.dumps(old + rows, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
