"""The default job (`make train`, configs/default.yaml) on several knowledge corpora: one run per `knowledge.seed`,
its before/after report recorded side by side (issue 15: the job must hold on corpora it was not tuned on).

    python bench/default_job.py --seeds 0 1 2 --record bench/results/default_job_cpu.json
    python bench/default_job.py --runs runs/default runs/seed1 --record ...   # record runs trained already
    python bench/default_job.py --seeds 1 2 --name lam_sched_seed --set train.divergence_scale_end=2 --record ...

Each seed trains with `python -m launch.train --out runs/default_seed{s} --set knowledge.seed={s}` (the HF export
off; `--set` adds overrides, `--name` another run-directory prefix); every row has the run's loss curve; `--runs`
reads the `report.json` and `config.yaml` of runs trained that way (e.g. by `make train`).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parent.parent


def train(seed: int, out: Path, overrides: list[str]) -> float:
    start = time.time()
    cmd = [sys.executable, "-m", "launch.train", "--out", str(out), "--no-progress",
           "--set", f"knowledge.seed={seed}", "--set", "report.export_hf=false"]
    cmd += [arg for o in overrides for arg in ("--set", o)]
    subprocess.run(cmd, cwd=ROOT, check=True)
    return time.time() - start


def curve(run_dir: Path) -> list[list[float]]:
    """[step, ce, divergence] of every training record in metrics.jsonl."""
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    return [[r["step"], round(r["ce"], 5), round(r["divergence"], 5)] for r in rows if "ce" in r and "step" in r]


def summarise(run_dir: Path) -> dict:
    report = json.loads((run_dir / "report.json").read_text())
    config = yaml.safe_load((run_dir / "config.yaml").read_text())
    acq, ret = report["acquisition"]["trained"], report["retention"]
    return {"run": str(run_dir), "knowledge_seed": config["knowledge"]["seed"],
            "exact_match": acq["exact_match"], "hit@10": acq["hit@10"],
            "retention": ret["retention"], "kept": ret["kept"], "lost": ret["lost"],
            "kl_from_base": ret["kl_from_base"], "meets_target": acq["exact_match"] >= 0.6 and ret["retention"] >= 0.9,
            "lost_examples": [(e["prompt"], e["answer"], e["output"]) for e in ret.get("lost_examples", [])],
            "expansion": config.get("expansion"), "knowledge": config.get("knowledge"), "train": config.get("train"),
            "frozen_matmul": config.get("model", {}).get("frozen_matmul", "compute"),
            "curve_step_ce_divergence": curve(run_dir)}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seeds", type=int, nargs="*", default=[])
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="a config override for the runs trained here (e.g. model.frozen_matmul=fp8)")
    p.add_argument("--name", default="default_seed", help="runs/NAME{seed} is where each seed trains")
    p.add_argument("--runs", nargs="*", default=[], help="run directories trained already")
    p.add_argument("--record", required=True)
    p.add_argument("--note", default="")
    args = p.parse_args(argv)
    runs, seconds = [Path(r) for r in args.runs], {}
    for seed in args.seeds:
        out = ROOT / "runs" / f"{args.name}{seed}"
        seconds[str(out)] = round(train(seed, out, args.overrides), 1)
        runs.append(out)
    rows = [summarise(r) | ({"wall_seconds": seconds[str(r)]} if str(r) in seconds else {}) for r in runs]
    import jax
    record = {"what": "the default job (configs/default.yaml) on several knowledge.seed corpora: acquisition "
                      "(exact match on held-out queries) and retention (base-correct general-knowledge probes)",
              "command": "python bench/default_job.py " + " ".join(sys.argv[1:] if argv is None else argv),
              "target": {"exact_match": 0.6, "retention": 0.9},
              "machine": {"platform": platform.platform(), "cores": os.cpu_count(), "devices": str(jax.devices())},
              "versions": {"jax": jax.__version__, "python": platform.python_version()},
              "note": args.note, "runs": rows,
              "all_meet_target": all(r["meets_target"] for r in rows)}
    Path(args.record).write_text(json.dumps(record, indent=1))
    for r in rows:
        print(f"seed {r['knowledge_seed']}: exact {r['exact_match']:.1%}, retention {r['retention']:.1%} "
              f"(lost {r['lost']}), KL {r['kl_from_base']:.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
