"""Screen settings of the default job across knowledge-corpus seeds, several runs at once (issue 15).

    python bench/default_job_screen.py --grid bench/screen_grid.yaml --seeds 1 2 3 4 --workers 8 \
        --out-dir runs/screen_gpu --record runs/screen_gpu/rows.json --budget-s 450

The grid file maps a setting's name to its `--set` overrides of configs/default.yaml (`control: []` is the default
job itself). Every (setting, seed) pair trains `python -m launch.train` in its own process, exactly as
bench/default_job.py does (HF export off, one checkpoint at the end, deleted once the run's report is read), with
`--workers` processes at a time. Jobs go seed by seed (every setting's first seed, then every setting's second,
...), so a budget cut leaves each setting with the same seeds. No job starts after `--budget-s`; the record is
rewritten after every finished job, so an interrupted screen keeps what it finished. On a GPU each process takes a
slice of its memory (XLA_PYTHON_CLIENT_MEM_FRACTION), float32 matmuls run at full precision (no TF32), so the
numbers are those of the float32 CPU job up to summation order, and GEMM autotuning is off (with it, a first try on
the H200 spent the whole device call compiling); compiled programs are shared through a persistent compilation
cache.
"""
from __future__ import annotations

import argparse
import functools
import json
import os
import platform
import shutil
import subprocess
import sys
import time
from importlib.metadata import version
from pathlib import Path

import yaml
from default_job import ROOT, summarise  # bench/default_job.py, beside this script

from jax_controlllm.files import write_text_atomic


def jobs(grid: dict[str, list[str]], seeds: list[int]) -> list[tuple[str, int]]:
    """(setting, seed) in the order they run: seed by seed, settings in the grid's order."""
    return [(name, seed) for seed in seeds for name in grid]


def command(out: Path, seed: int, overrides: list[str]) -> list[str]:
    cmd = [sys.executable, "-m", "launch.train", "--out", str(out), "--no-progress",
           "--set", f"knowledge.seed={seed}", "--set", "report.export_hf=false", "--set", "train.save_every=0"]
    return cmd + [arg for o in overrides for arg in ("--set", o)]


def environment(workers: int, cache: Path) -> dict[str, str]:
    env = dict(os.environ, PYTHONUNBUFFERED="1", JAX_COMPILATION_CACHE_DIR=str(cache),
               JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0", JAX_DEFAULT_MATMUL_PRECISION="highest")
    env["XLA_PYTHON_CLIENT_MEM_FRACTION"] = f"{min(0.9 / workers, 0.75):.3f}"
    if accelerator() != "cpu":
        # Measured on the H200 (session 8): with GEMM autotuning, 12 processes compiling float32 GEMM fusions
        # took over 2 minutes per fusion and no run finished in 9 minutes. Untuned GEMMs cost nothing here.
        env["XLA_FLAGS"] = " ".join(filter(None, (env.get("XLA_FLAGS", ""), "--xla_gpu_autotune_level=0")))
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH", "")) if p)
    return env


def load_grid(path: Path) -> dict[str, list[str]]:
    grid = yaml.safe_load(path.read_text())
    if not isinstance(grid, dict) or not all(isinstance(v, list) and all(isinstance(o, str) for o in v)
                                             for v in grid.values()):
        raise SystemExit(f"{path}: expected a mapping from setting name to a list of KEY=VALUE overrides")
    return grid


def table(rows: list[dict]) -> dict[str, dict]:
    """Per setting: seeds run, mean and lowest exact match and retention, and whether every seed meets the target."""
    out: dict[str, dict] = {}
    for r in rows:
        out.setdefault(r["setting"], []).append(r)
    return {name: {"seeds": [r["knowledge_seed"] for r in rs],
                   "exact_match": [r["exact_match"] for r in rs], "retention": [r["retention"] for r in rs],
                   "min_exact_match": min(r["exact_match"] for r in rs),
                   "min_retention": min(r["retention"] for r in rs),
                   "mean_retention": sum(r["retention"] for r in rs) / len(rs),
                   "mean_kl": sum(r["kl_from_base"] for r in rs) / len(rs),
                   "all_meet_target": all(r["meets_target"] for r in rs)}
            for name, rs in out.items()}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--grid", type=Path, required=True)
    p.add_argument("--seeds", type=int, nargs="+", required=True)
    p.add_argument("--workers", type=int, default=1)
    p.add_argument("--out-dir", type=Path, required=True, help="run directories and their logs go here")
    p.add_argument("--record", type=Path, required=True)
    p.add_argument("--budget-s", type=float, default=float("inf"), help="start no job after this many seconds")
    p.add_argument("--keep-checkpoints", action="store_true")
    p.add_argument("--set", dest="common", action="append", default=[], metavar="KEY=VALUE",
                   help="an override for every setting (e.g. train.steps=2 for a smoke run)")
    args = p.parse_args(argv)
    grid = load_grid(args.grid)
    args.out_dir.mkdir(parents=True, exist_ok=True)
    env = environment(args.workers, args.out_dir / "jax_cache")
    queue, running, rows, failed = jobs(grid, args.seeds), {}, [], []
    start = time.time()
    while queue or running:
        while queue and len(running) < args.workers and time.time() - start < args.budget_s:
            name, seed = queue.pop(0)
            out = args.out_dir / f"{name}_seed{seed}"
            log = (args.out_dir / f"{name}_seed{seed}.log").open("w")
            proc = subprocess.Popen(command(out, seed, args.common + grid[name]), cwd=ROOT, env=env,
                                    stdout=log, stderr=subprocess.STDOUT)
            running[proc] = (name, seed, out, time.time(), log)
        if time.time() - start >= args.budget_s and queue:
            print(f"budget: {len(queue)} jobs not started", flush=True)
            queue = []
        for proc in [q for q in running if q.poll() is not None]:
            name, seed, out, began, log = running.pop(proc)
            log.close()
            if proc.returncode != 0:
                failed.append({"setting": name, "seed": seed, "returncode": proc.returncode})
                print(f"{name} seed {seed}: exit {proc.returncode} (log {log.name})", flush=True)
                continue
            row = {"setting": name, "overrides": grid[name]} | summarise(out)
            row["wall_seconds"] = round(time.time() - began, 1)
            rows.append(row)
            if not args.keep_checkpoints:
                shutil.rmtree(out / "checkpoints", ignore_errors=True)
            print(f"{name} seed {seed}: exact {row['exact_match']:.1%} retention {row['retention']:.1%} "
                  f"(lost {row['lost']}) KL {row['kl_from_base']:.3f} in {row['wall_seconds']:.0f} s", flush=True)
            record(args, grid, rows, failed, start)
        time.sleep(0.5)
    record(args, grid, rows, failed, start)
    for name, s in table(rows).items():
        print(f"{name}: min exact {s['min_exact_match']:.1%}, retention {s['retention']} "
              f"all meet: {s['all_meet_target']}")
    return 0


@functools.cache
def accelerator() -> str:
    """The GPU as the driver names it, else "cpu" (read once, without importing jax: this driver must not take
    the GPU's memory from its workers)."""
    try:
        return subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "cpu"


def record(args, grid, rows, failed, start) -> None:
    data = {"what": "settings of the default job (configs/default.yaml + overrides) screened over knowledge.seed "
                    "corpora: acquisition (exact match, 40 held-out queries) and retention (43 base-correct probes)",
            "command": "python bench/default_job_screen.py " + " ".join(sys.argv[1:]),
            "grid": grid, "machine": {"platform": platform.platform(), "cores": os.cpu_count(),
                                      "accelerator": accelerator()},
            "versions": {"jax": version("jax"), "jaxlib": version("jaxlib"), "python": platform.python_version()},
            "wall_seconds": round(time.time() - start, 1), "summary": table(rows) if rows else {},
            "failed": failed, "runs": rows}
    write_text_atomic(args.record, json.dumps(data, indent=1))


if __name__ == "__main__":
    sys.exit(main())
