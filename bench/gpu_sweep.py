"""One prepared GPU sweep: the release's W1 step beside ours in the same run, then EAP-IG; each in its own process.

    # on the GPU machine (bench/README.md: "H200 sweep"; .whl, .whl_ours and .peer carried):
    python3 bench/gpu_sweep.py --peer-checkout .peer/ControlLLM --peer-wheels .whl --ours-wheels .whl_ours \
        --out-dir $OUT
    # here, on the CPU: the same sweep on tiny shapes (the peer items only when a peer environment is given)
    python bench/gpu_sweep.py --dry-run [--peer-checkout /work/peer/ControlLLM --peer-python /work/peer-venv/bin/python]

ITEMS runs in order of priority; an item that would end past --budget-s is skipped (printed, not recorded), so the
sweep ends well inside one 10-minute device command. Every finished process appends its row at once to
<out-dir>/h200_train_step.json (started from bench/results/h200_train_step.json, so the file that comes back is the
whole history): role (ours | peer), run_id (one per sweep), precision (bf16 | fp8), device as the driver names it,
step time, peak memory, FLOPs/token of the required work and MFU (bench/train_step.py's count, the same for both
roles), command, versions. At the end our rows get their ratio to the peer rows of the same run. EAP-IG (fp32,
Llama-3.2-1B shape) goes to <out-dir>/eapig_h200_float32.json, compared with the recorded H100 peer figure (the
knowledge-circuits code cannot run in this sweep), labelled as such.

The peer processes see only the pinned wheels (--peer-wheels installed into --peer-site, put on their PYTHONPATH);
ours never do, so our JAX process never imports transformers 4.49.
"""
from __future__ import annotations

import argparse
import importlib
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import train_step
from host import cpu_model  # bench/host.py, beside this script

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results"
TRAIN_FILE, EAPIG_FILE, LOG_FILE = "h200_train_step.json", "eapig_h200_float32.json", "gpu_sweep_log.txt"
# bf16 8192^3 matmul through PyTorch on this workplace's H200 (.library/device/KINDS.md, 2026-10-28): the rate
# at which the required matmul work could at best run; 'limit_tokens_per_s' in each row divides by it.
H200_MATMUL_FLOPS = 788e12
# The knowledge-circuits code's EAP-IG, fp32, batch 64, on one H100 (shared/reference/performance/
# peer_dkc_eapig_h100.json, headline prompts_per_s_batch64_fp32): not measured in this sweep.
PEER_EAPIG_H100 = {"prompts_per_s": 18.04, "device": "NVIDIA H100 80GB HBM3",
                   "source": "shared/reference/performance/peer_dkc_eapig_h100.json",
                   "note": "recorded on an H100 on 2026-11-22, not in this run"}
# The same code with TF32 matmuls (its fastest setting, batch 64): what our fp32 with XLA's default (TF32)
# precision compares with.
PEER_EAPIG_H100_TF32 = {**PEER_EAPIG_H100, "prompts_per_s": 25.54, "setting": "fp32 with TF32 on, batch 64"}

OURS_BEST = ["--batch", "2", "--remat", "selective", "--attention", "cudnn", "--loss-chunk", "1024"]
# name, role, precision, script, arguments, extra arguments (real run | dry run), estimated seconds on an H200.
ITEMS = [
    {"name": "peer-best", "role": "peer", "precision": "bf16", "script": "peer_w1.py",
     "args": ["--setting", "best"], "estimate_s": 100},
    {"name": "ours-best", "role": "ours", "precision": "bf16", "script": "train_step.py",
     "args": OURS_BEST, "real": ["--profile", "/tmp/profile_ours_best"], "estimate_s": 70},
    # Levers (bench/README.md, "Next GPU session"): each a row of its own; add new ones here.
    {"name": "ours-fp8", "role": "ours", "precision": "fp8", "script": "train_step.py",
     "args": OURS_BEST + ["--frozen-matmul", "fp8"], "estimate_s": 60},
    {"name": "ours-fp8-backward", "role": "ours", "precision": "fp8", "script": "train_step.py",
     "args": OURS_BEST + ["--frozen-matmul", "fp8_backward"], "estimate_s": 90},
    {"name": "ours-mb2-none", "role": "ours", "precision": "bf16", "script": "train_step.py",
     "args": ["--batch", "2", "--remat", "none", "--attention", "cudnn", "--loss-chunk", "1024"], "estimate_s": 60},
    {"name": "eapig-fp32", "role": "ours", "precision": "fp32", "script": "eapig.py",
     "args": ["--dtype", "float32", "--batch", "64"], "real": ["--prompts", "512", "--repeats", "2"],
     "dry": ["--smoke", "--batch", "8"], "estimate_s": 100},
    {"name": "peer-best-mb4", "role": "peer", "precision": "bf16", "script": "peer_w1.py",
     "args": ["--setting", "best", "--batch", "4"], "estimate_s": 110},
    {"name": "peer-recipe", "role": "peer", "precision": "bf16", "script": "peer_w1.py",
     "args": ["--setting", "recipe"], "estimate_s": 110},
    {"name": "ours-mb4-selective", "role": "ours", "precision": "bf16", "script": "train_step.py",
     "args": ["--batch", "4", "--remat", "selective", "--attention", "cudnn", "--loss-chunk", "1024"],
     "estimate_s": 70},
    {"name": "eapig-tf32", "role": "ours", "precision": "fp32-tf32", "script": "eapig.py",
     "args": ["--dtype", "float32", "--precision", "default", "--batch", "64"],
     "real": ["--prompts", "512", "--repeats", "2"], "dry": ["--smoke", "--batch", "8"], "estimate_s": 80,
     "out": "eapig_h200_float32_tf32.json", "peer": "tf32"},
    {"name": "ours-fp8-mb4", "role": "ours", "precision": "fp8", "script": "train_step.py",
     "args": ["--batch", "4", "--remat", "selective", "--attention", "cudnn", "--loss-chunk", "1024",
              "--frozen-matmul", "fp8"], "estimate_s": 70},
]
TRAIN_REAL = ["--preset", "w1", "--steps", "10", "--warmup", "3"]
TRAIN_DRY = ["--preset", "smoke", "--steps", "2", "--warmup", "1"]
PEER_REAL = ["--steps", "10", "--warmup", "3"]
PEER_DRY = ["--tiny", "--steps", "2", "--warmup", "1"]


def required_flops_per_token(preset: str) -> float:
    """bench/train_step.py's required-work count for a preset (forward everywhere, input gradients from the
    first trainable layer, weight gradients of trainable weights): the same number for both roles."""
    from jax_controlllm.config import ExpansionConfig, ModelConfig
    from jax_controlllm.model.expand import expanded_config
    from jax_controlllm.train.metrics import flops_per_token

    spec = train_step.PRESETS[preset]
    config = expanded_config(ModelConfig(**spec["model"]), ExpansionConfig(**spec["expansion"]))
    return flops_per_token(config, spec["seq_len"])


def peak_flops(device: str):
    from jax_controlllm.train.metrics import PEAK_FLOPS
    return next((f for name, f in sorted(PEAK_FLOPS.items(), key=lambda kv: -len(kv[0])) if name in device.lower()),
                None)


def command_for(item: dict, args) -> list[str] | None:
    """The child's argv, or None when the item cannot run here (the peer without a checkout)."""
    if item["role"] == "peer":
        if not args.peer_checkout or not Path(args.peer_checkout).is_dir():
            return None
        tail = ["--checkout", str(args.peer_checkout)] + (PEER_DRY if args.dry_run else PEER_REAL)
        python = args.peer_python
    elif item["script"] == "train_step.py":
        tail = TRAIN_DRY if args.dry_run else TRAIN_REAL + item.get("real", [])
        python = sys.executable
    else:
        tail, python = item.get("dry" if args.dry_run else "real", []), sys.executable
    return [python, f"bench/{item['script']}"] + item["args"] + tail


def child_env(item: dict, args) -> dict:
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    if item["role"] == "peer":
        env["PYTHONPATH"] = str(args.peer_site) if args.peer_site else ""  # the pinned wheels, nothing of ours
    else:   # the repository, the wheels the GPU image lacks (--ours-wheels), then the caller's path
        site = str(args.ours_site) if args.ours_site else ""
        env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), site, os.environ.get("PYTHONPATH", "")) if p)
    return env


def run_child(cmd: list[str], env: dict, timeout: float, log: Path) -> tuple[bool, dict | None, str]:
    """Run one measurement: whether it succeeded, its JSON row (the last stdout line that is one) and the tail
    of its output."""
    try:
        proc = subprocess.run(cmd, check=False, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
        out, err, rc = proc.stdout, proc.stderr, proc.returncode
    except subprocess.TimeoutExpired as exc:
        out, err, rc = exc.stdout or "", (exc.stderr or "") + f"\n[timed out after {timeout:.0f} s]", None
        out, err = (o.decode() if isinstance(o, bytes) else o for o in (out, err))
    with log.open("a") as f:
        f.write(f"\n=== {' '.join(cmd)} (rc {rc})\n{out}\n--- stderr\n{err}\n")
    line = next((l for l in reversed(out.splitlines()) if l.startswith('{"')), None)  # a one-line JSON row
    row = json.loads(line) if line and rc == 0 else None
    return rc == 0, row, (err or out)[-1500:]


def annotate(row: dict, item: dict, cmd: list[str], args, fpt: float) -> dict:
    """The fields every row of the sweep carries, computed the same way for both roles."""
    peak = peak_flops(row.get("device", ""))
    tps = row.get("tokens_per_s")
    row.update(name=item["name"], role=item["role"], run_id=args.run_id, precision=item["precision"],
               host_cpu=cpu_model(), command="python " + " ".join(cmd[1:]))
    if tps:
        row.update(flops_per_token=fpt, model_flops_utilisation=round(fpt * tps / peak, 4) if peak else None,
                   limit_tokens_per_s=round(H200_MATMUL_FLOPS / fpt, 1))
    for stale in ("ratio_vs_peer_best", "ratio_vs_peer_release_recipe"):  # train_step's H100 constants
        row.pop(stale, None)
    return row


def same_run_ratios(rows: list[dict], run_id: str) -> None:
    """Ours / the peer's best and its recipe in the same run. The peer's best is its fastest row without
    checkpointing (micro-batch 2 as W1 names it, or 4 where the GPU holds that); the recipe is micro-batch 4 with."""
    peer = [r for r in rows if r.get("run_id") == run_id and r.get("role") == "peer" and r.get("tokens_per_s")]
    best = max((r for r in peer if r["name"].startswith("peer-best")), key=lambda r: r["tokens_per_s"], default=None)
    recipe = next((r for r in peer if r["name"] == "peer-recipe"), None)
    for r in rows:
        if r.get("run_id") == run_id and r.get("role") == "ours" and r.get("tokens_per_s"):
            if best:
                r.update(ratio_vs_peer_best_same_run=round(r["tokens_per_s"] / best["tokens_per_s"], 3),
                         peer_best_same_run=best["name"])
            if recipe:
                r["ratio_vs_peer_recipe_same_run"] = round(r["tokens_per_s"] / recipe["tokens_per_s"], 3)


def install_wheels(flag: str, wheel_dir: Path, python: str, site: Path) -> None:
    """pip install every wheel of ``wheel_dir`` into the folder ``site`` only (no index, no dependencies)."""
    wheels = sorted(Path(wheel_dir).glob("*.whl"))
    if not wheels:
        raise SystemExit(f"{flag} {wheel_dir}: no .whl files there (bench/README.md: H200 sweep)")
    subprocess.run([python, "-m", "pip", "install", "-q", "--no-index", "--no-deps", "--no-compile",
                    "--no-cache-dir", "--upgrade", "--target", str(site)] + [str(w) for w in wheels], check=True)


def record_eapig(row: dict, item: dict, cmd: list[str], args, path: Path) -> None:
    peer = PEER_EAPIG_H100_TF32 if item.get("peer") == "tf32" else PEER_EAPIG_H100
    row.update(name=item["name"], role="ours", run_id=args.run_id, host_cpu=cpu_model(),
               command="python " + " ".join(cmd[1:]), peer_reference=peer)
    if row.get("platform") == "gpu":
        row["ratio_vs_recorded_h100_peer"] = round(row["prompts_per_second"] / peer["prompts_per_s"], 2)
    path.write_text(json.dumps(row, indent=1))


def sweep(args) -> list[dict]:
    out_dir = Path(args.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    train_file, log = out_dir / TRAIN_FILE, out_dir / LOG_FILE
    history = train_file if train_file.exists() else RESULTS / TRAIN_FILE
    rows = json.loads(history.read_text()) if history.exists() and not args.dry_run else []
    fpt = required_flops_per_token("smoke" if args.dry_run else "w1")
    start, done = time.perf_counter(), []
    for item in ITEMS:
        if args.only and item["name"] not in args.only:
            continue
        cmd = command_for(item, args)
        elapsed = time.perf_counter() - start
        if cmd is None:
            print(f"[sweep] {item['name']}: skipped (no --peer-checkout)", flush=True)
            continue
        if not args.dry_run and elapsed + item["estimate_s"] > args.budget_s:
            print(f"[sweep] {item['name']}: skipped ({elapsed:.0f} s used, ~{item['estimate_s']} s more would "
                  f"pass --budget-s {args.budget_s})", flush=True)
            continue
        timeout = max(60.0, args.budget_s + 60 - elapsed)
        eapig_name = item.get("out", EAPIG_FILE)
        eapig_out = out_dir / ("dryrun_" + eapig_name if args.dry_run else eapig_name)
        if item["script"] == "eapig.py":
            cmd += ["--out", str(eapig_out)]  # eapig.py writes its result there (and prints it indented)
        print(f"[sweep] {item['name']}: {' '.join(cmd)}", flush=True)
        ok, row, tail = run_child(cmd, child_env(item, args), timeout, log)
        if item["script"] == "eapig.py":
            row = json.loads(eapig_out.read_text()) if ok and eapig_out.exists() else None
            if row is not None:
                record_eapig(row, item, cmd, args, eapig_out)
            print(f"[sweep] {item['name']}: " + (f"{row['prompts_per_second']:.1f} prompts/s" if row else
                                                   f"failed: {tail}"), flush=True)
            continue
        row = annotate(row or {"error": tail}, item, cmd, args, fpt)
        rows.append(row)
        done.append(row)
        same_run_ratios(rows, args.run_id)
        train_file.write_text(json.dumps(rows, indent=1))  # at once: a sweep cut short keeps what it measured
        print(f"[sweep] {item['name']}: " + (f"{row['tokens_per_s']} tokens/s" if "error" not in row else
                                               f"failed: {tail}"), flush=True)
    print(json.dumps({"run_id": args.run_id, "seconds": round(time.perf_counter() - start, 1),
                      "rows": [{k: r.get(k) for k in ("name", "tokens_per_s", "peak_memory_gib",
                                                       "ratio_vs_peer_best_same_run", "error")} for r in done]}))
    return done


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--dry-run", action="store_true", help="tiny shapes on the CPU; writes to runs/gpu_sweep_dryrun")
    p.add_argument("--peer-checkout", type=Path, help="a checkout of linkedin/ControlLLM at 7657b9f "
                                                      "(without it the peer items are skipped)")
    p.add_argument("--peer-python", default=sys.executable, help="the Python that runs bench/peer_w1.py")
    p.add_argument("--peer-wheels", type=Path, help="install these pinned wheels into --peer-site first")
    p.add_argument("--peer-site", type=Path, help="a --target directory only the peer processes import from "
                                                  "(default /tmp/peer_site with --peer-wheels)")
    p.add_argument("--ours-wheels", type=Path, help="install these wheels (what the GPU image lacks: grain, "
                                                    "array-record, portpicker) into --ours-site for our processes")
    p.add_argument("--ours-site", type=Path, help="default /tmp/ours_site with --ours-wheels")
    p.add_argument("--out-dir", help="where the JSON rows and the log go (default bench/results; "
                                     "runs/gpu_sweep_dryrun with --dry-run)")
    p.add_argument("--run-id", default=time.strftime("%Y%m%dT%H%M%SZ", time.gmtime()))
    p.add_argument("--budget-s", type=float, default=480, help="skip items that would end after this many seconds")
    p.add_argument("--only", nargs="+", help="run only these ITEMS names")
    args = p.parse_args(argv)
    args.out_dir = args.out_dir or str(ROOT / ("runs/gpu_sweep_dryrun" if args.dry_run else "bench/results"))
    if args.peer_wheels:
        args.peer_site = args.peer_site or Path("/tmp/peer_site")
        install_wheels("--peer-wheels", args.peer_wheels, args.peer_python, args.peer_site)
    if args.ours_wheels:
        args.ours_site = args.ours_site or Path("/tmp/ours_site")
        install_wheels("--ours-wheels", args.ours_wheels, sys.executable, args.ours_site)
        sys.path.insert(1, str(args.ours_site))   # this driver imports the library too (the FLOP count)
        importlib.invalidate_caches()
    sweep(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
