"""The retention experiment: acquisition vs retention for full tuning, partial tuning, stack (LLaMA-Pro),
hybrid and Control LLM (concat lerp / dlerp) on the same corpus and token budget.

    python bench/retention.py --config configs/retention/experiment.yaml --out runs/retention \
        --record bench/results/retention_cpu.json --plot bench/results/retention_cpu.png

    # equal acquisition: score full tuning's checkpoints along training until it has learned as much as
    # Control LLM (dlerp) did by the end, and compare retention there
    python bench/retention.py --methods concat_dlerp full --trajectory full --every 5 \
        --stop-at-acquisition-of concat_dlerp --record bench/results/retention_equal_acquisition_cpu.json

Each method trains through the library's real training loop (``python -m launch.train`` does the same), then
``jax_controlllm.experiment.evaluate_pair`` scores base and trained model on the same probes: acquisition on
held-out queries about the new entities, retention on general-knowledge probes the base answers correctly, and
KL from the base on plain text. The base model's results are computed once and shared.
"""
from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import yaml


def method_configs(path: str) -> tuple[str, list[str], dict[str, list[str]]]:
    spec = yaml.safe_load(Path(path).read_text())
    return spec["base"], list(spec.get("overrides", [])), {k: list(v) for k, v in spec["methods"].items()}


def train_method(base_yaml: str, overrides: list[str], run_dir: Path):
    from jax_controlllm.config import load_config
    from jax_controlllm.experiment import prepare_knowledge
    from jax_controlllm.sharding import make_mesh
    from jax_controlllm.train import (build_trainer, check_data_config, create_run_dir, open_checkpoints,
                                      train_loop)

    run = load_config(base_yaml, overrides)
    prepare_knowledge(run, run_dir)
    check_data_config(run)
    mesh = make_mesh(run.mesh.shape, run.mesh.axes)
    checkpoints = open_checkpoints(run_dir, run)
    trainer = build_trainer(run, mesh, checkpoints)
    checkpoints = checkpoints or create_run_dir(run_dir, run)
    start = time.time()
    result = train_loop(trainer, run_dir, checkpoints, progress=False)
    if result.exit_code != 0:
        raise RuntimeError(f"training {run_dir.name} stopped: {result.reason}")
    return run, trainer.describe(), time.time() - start


def final_loss(run_dir: Path) -> dict:
    rows = [json.loads(l) for l in (run_dir / "metrics.jsonl").read_text().splitlines() if l.strip()]
    rows = [r for r in rows if "ce" in r and not r.get("eval")]
    return {"ce_first": rows[0]["ce"], "ce_last": rows[-1]["ce"]} if rows else {}


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4.2))
    for row in rows:
        x, y = row["acquisition_hit10"], row["retention"]
        ax.scatter([x], [y], s=60)
        ax.annotate(row["method"], (x, y), textcoords="offset points", xytext=(6, 4), fontsize=9)
    ax.set_xlabel("acquisition: new-entity answers in top-10 (trained)")
    ax.set_ylabel("retention: base-correct probes still correct")
    ax.set_title("Acquisition vs retention (SmolLM2-135M, same corpus and steps)")
    ax.set_xlim(-0.02, 1.02)
    ax.set_ylim(min(0.5, min(r["retention"] for r in rows) - 0.05), 1.02)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", default="configs/retention/experiment.yaml")
    p.add_argument("--out", default="runs/retention")
    p.add_argument("--methods", nargs="*", help="subset of the config's methods")
    p.add_argument("--set", dest="extra", action="append", default=[], help="extra override for every method")
    p.add_argument("--record", help="write the results JSON here")
    p.add_argument("--plot", help="write the acquisition-vs-retention plot (PNG) here")
    p.add_argument("--trajectory", action="append", default=[], metavar="METHOD",
                   help="also score METHOD's intermediate checkpoints (every --every steps)")
    p.add_argument("--every", type=int, default=10, help="checkpoint interval of --trajectory methods")
    p.add_argument("--stop-at-acquisition-of", metavar="METHOD",
                   help="stop scoring a trajectory at the first checkpoint whose exact-match acquisition reaches "
                        "METHOD's final one (METHOD must be listed earlier in --methods)")
    args = p.parse_args(argv)

    import jax
    from jax_controlllm.config import load_config
    from jax_controlllm.convert.auto import load_pretrained
    from jax_controlllm.checkpoint import load_model
    from jax_controlllm.data import load_tokenizer
    from jax_controlllm.experiment import ReportSpec, evaluate_pair
    from jax_controlllm.train.data import tokenizer_source

    base_yaml, shared, methods = method_configs(args.config)
    chosen = args.methods or list(methods)
    out = Path(args.out)
    rows, base_cache = [], {}
    base_model = None
    def score(name, run, run_dir, model_path, described, train_s, step=None) -> dict:
        config, params = load_model(model_path)
        tokenizer = load_tokenizer(tokenizer_source(run, run_dir))
        start = time.time()
        report = evaluate_pair(*base_model, config, params, tokenizer, run_dir, ReportSpec(export_hf=False),
                               progress=False, base_cache=base_cache)
        acq, ret = report["acquisition"], report["retention"]
        row = {"method": name, **({"step": step} if step is not None else {}), "overrides": methods[name],
               "trainable": described,
               "acquisition_exact_match": acq["trained"]["exact_match"], "acquisition_hit10": acq["trained"]["hit@10"],
               "acquisition_mean_rank": acq["trained"]["mean_first_token_rank"],
               "base_acquisition_exact_match": acq["base"]["exact_match"],
               "retention": ret["retention"], "kept": ret["kept"], "lost": ret["lost"],
               "kl_from_base": ret.get("kl_from_base"), "train_seconds": round(train_s, 1),
               "eval_seconds": round(time.time() - start, 1)}
        print(json.dumps(row), flush=True)
        return row

    trajectories = []
    for name in chosen:
        run_dir = out / name
        overrides = shared + args.extra + methods[name]
        if name in args.trajectory:
            overrides += [f"train.save_every={args.every}", f"train.keep_every={args.every}"]
        run, described, train_s = train_method(base_yaml, overrides, run_dir)
        if base_model is None:
            policy = {k: getattr(run.model, k) for k in ("param_dtype", "frozen_dtype", "compute_dtype")}
            base_model = load_pretrained(run.base.path, run.base.format, **policy)
        if name in args.trajectory:
            target = next((r["acquisition_exact_match"] for r in rows if r["method"] == args.stop_at_acquisition_of),
                          None)
            steps = sorted(int(d.name) for d in (run_dir / "checkpoints").iterdir() if d.name.isdigit())
            for step in [s for s in steps if s < run.train.steps]:
                step_dir = run_dir / "checkpoints" / str(step)
                row = score(name, run, run_dir, step_dir, described, train_s, step=step)
                trajectories.append(row)
                if target is not None and row["acquisition_exact_match"] >= target:
                    break
        row = score(name, run, run_dir, run_dir, described, train_s)
        row.update(final_loss(run_dir))
        rows.append(row)
    result = {"what": "retention experiment: acquisition vs retention per tuning method",
              "command": "python bench/retention.py " + " ".join(sys.argv[1:]),
              "config": args.config, "base_config": base_yaml, "shared_overrides": shared + args.extra,
              "resolved_config_example": json.loads(json.dumps(
                  load_config(base_yaml, shared + args.extra).__dict__, default=str)),
              "machine": {"platform": platform.platform(), "processor": platform.processor(),
                          "devices": str(jax.devices())},
              "versions": {"jax": jax.__version__, "python": platform.python_version()},
              "rows": rows, **({"trajectories": trajectories} if trajectories else {})}
    if args.record:
        Path(args.record).write_text(json.dumps(result, indent=1, default=str))
    if args.plot:
        plot(rows, Path(args.plot))
    return 0


if __name__ == "__main__":
    sys.exit(main())
