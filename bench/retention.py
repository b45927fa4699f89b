"""The retention experiment: acquisition vs retention for full tuning, partial tuning, stack (LLaMA-Pro),
hybrid and Control LLM (concat lerp / dlerp) on the same corpus and token budget.

    python bench/retention.py --config configs/retention/experiment.yaml --out runs/retention \
        --record bench/results/retention_cpu.json --plot bench/results/retention_cpu.png

    # equal acquisition: score full tuning's checkpoints along training until it has learned as much as
    # Control LLM (dlerp) did by the end, and compare retention there
    python bench/retention.py --methods concat_dlerp full --trajectory full --every 5 \
        --stop-at-acquisition-of concat_dlerp --record bench/results/retention_equal_acquisition_cpu.json

    # the acquisition-retention frontier: every method's checkpoints scored every --every steps (scoring stops
    # once exact match has not risen for --patience checkpoints), one curve per method, and a summary
    python bench/retention.py --config configs/retention/frontier.yaml --frontier --every 25 \
        --record bench/results/retention_frontier_cpu.json --plot bench/results/retention_frontier_cpu.png

Each method trains through the library's real training loop (``python -m launch.train`` does the same), then
``jax_controlllm.experiment.evaluate_pair`` scores base and trained model on the same probes: acquisition on
held-out queries about the new entities, retention on general-knowledge probes the base answers correctly, and
KL from the base on plain text. The base model's results are computed once and shared.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import sys
import time
from pathlib import Path

import yaml
from host import cpu_model


def method_configs(path: str) -> tuple[str, list[str], dict[str, list[str]]]:
    spec = yaml.safe_load(Path(path).read_text())
    return spec["base"], list(spec.get("overrides", [])), {k: list(v) for k, v in spec["methods"].items()}


def train_method(base_yaml: str, overrides: list[str], run_dir: Path):
    from jax_controlllm.circuits.layer_choice import resolve_auto_layers
    from jax_controlllm.config import load_config
    from jax_controlllm.experiment import prepare_knowledge
    from jax_controlllm.sharding import make_mesh
    from jax_controlllm.train import (
        build_trainer,
        check_data_config,
        create_run_dir,
        open_checkpoints,
        train_loop,
    )

    run = load_config(base_yaml, overrides)
    run, _ = prepare_knowledge(run, run_dir)
    run = resolve_auto_layers(run, run_dir)
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


def family(run) -> str:
    """What kind of tuning a run is: full | partial | lora | stack | hybrid | controlllm (concat expansion)."""
    if run.train.mode != "controlllm":
        return run.train.mode
    return "controlllm" if run.expansion.expand_type == "concat" else run.expansion.expand_type


def run_settings(run) -> dict:
    """The settings that tell the methods apart (recorded with every scored point)."""
    from jax_controlllm.config import to_dict
    exp = run.expansion
    return {"mode": run.train.mode, "steps": run.train.steps, "lr": run.train.lr, "min_lr": run.train.min_lr,
            "batch_size": run.train.batch_size, "seq_len": run.train.seq_len,
            "distill_weight": run.train.distill_weight,
            "knowledge": None if run.knowledge is None else to_dict(run.knowledge),
            "trainable_layers": run.train.trainable_layers,
            "expansion": None if exp is None else {k: getattr(exp, k) for k in (
                "expand_type", "num_exp_layers", "layers", "merge_method", "interpolation_loss_alpha",
                "interpolation_loss_type")}}


def point(name: str, run, report: dict, step: int, described: str, overrides: list) -> dict:
    """One scored point of the frontier from a before/after report (jax_controlllm.experiment's report.json)."""
    acq, ret = report["acquisition"], report.get("retention", {})
    return {"method": name, "step": step, "family": family(run), "overrides": overrides,
            "settings": run_settings(run), "trainable": described,
            "acquisition_exact_match": acq["trained"]["exact_match"], "acquisition_hit10": acq["trained"]["hit@10"],
            "acquisition_mean_rank": acq["trained"]["mean_first_token_rank"],
            "base_acquisition_exact_match": acq["base"]["exact_match"],
            "retention": ret.get("retention"), "kept": ret.get("kept"), "lost": ret.get("lost"),
            "kl_from_base": ret.get("kl_from_base")}


def frontier_summary(points: list[dict], min_retention: float = 0.9) -> dict:
    """Per method: its best exact-match point (ties: the higher retention) and the retention there; and
    ``controlllm``: the best Control LLM point whose retention is at least ``min_retention``."""
    summary = {}
    for method in dict.fromkeys(p["method"] for p in points):
        mine = [p for p in points if p["method"] == method]
        best = max(mine, key=lambda p: (p["acquisition_exact_match"], p["retention"] or 0))
        summary[method] = {"family": best["family"], "best_exact_match": best["acquisition_exact_match"],
                           "retention_at_best": best["retention"], "hit10_at_best": best["acquisition_hit10"],
                           "kl_at_best": best["kl_from_base"], "step_at_best": best["step"],
                           "points": len(mine)}
    kept = [p for p in points if p["family"] == "controlllm" and (p["retention"] or 0) >= min_retention]
    if kept:
        best = max(kept, key=lambda p: (p["acquisition_exact_match"], p["retention"]))
        summary["controlllm"] = {"exact_match": best["acquisition_exact_match"], "retention": best["retention"],
                                 "hit10": best["acquisition_hit10"], "kl_from_base": best["kl_from_base"],
                                 "method": best["method"], "step": best["step"], "config": best["settings"]}
    else:
        summary["controlllm"] = None
    return summary


def plot_frontier(points: list[dict], path: Path) -> None:
    """Acquisition (exact match) vs retention, one curve per method through its checkpoints in step order."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7.5, 5))
    methods = list(dict.fromkeys(p["method"] for p in points))
    colors = plt.get_cmap("tab20").colors      # 20 distinct colours: the default cycle repeats after 10 methods
    for i, method in enumerate(methods):
        mine = sorted((p for p in points if p["method"] == method and p["retention"] is not None),
                      key=lambda p: p["step"])
        if not mine:
            continue
        style = "-o" if mine[0]["family"] == "controlllm" else "--s"
        ax.plot([p["acquisition_exact_match"] for p in mine], [p["retention"] for p in mine], style, ms=4,
                label=method, color=colors[i % len(colors)])
    ax.axhline(0.9, color="grey", lw=0.8, ls=":")
    ax.set_xlabel("acquisition: exact match on held-out queries about the new entities")
    ax.set_ylabel("retention: base-correct probes still correct")
    ax.set_title("Acquisition-retention frontier (SmolLM2-135M, CPU; points = checkpoints)")
    ax.set_xlim(-0.02, 1.02)
    ax.set_ylim(-0.02, 1.02)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="center right")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


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


def parse_args(argv=None) -> argparse.Namespace:
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
    p.add_argument("--frontier", action="store_true",
                   help="score every method's checkpoints (every --every steps), record a per-method summary and "
                        "plot one acquisition-retention curve per method")
    p.add_argument("--patience", type=int, default=2,
                   help="frontier: stop scoring a method once exact match has not risen for this many checkpoints")
    p.add_argument("--score-run", action="append", default=[], metavar="RUN_DIR",
                   help="also score every checkpoint a run directory kept (a run trained by python -m launch.train)")
    p.add_argument("--report-run", action="append", default=[], metavar="RUN_DIR",
                   help="also take a run directory's final report.json as a point (a run of python -m launch.train "
                        "with a report section, e.g. the default job; no checkpoint needed)")
    p.add_argument("--note", help="a sentence recorded with the results (how and where they were run)")
    p.add_argument("--merge", action="append", default=[], metavar="JSON",
                   help="frontier: also take the scored points of an earlier record of this script")
    return p.parse_args(argv)


def merged_points(paths: list[str]) -> list[dict]:
    """The scored points (final rows and trajectories) of earlier records, tagged with their file. Records
    written before the frontier mode lack a point's family and final step: they are filled in from the method's
    name and the record's ``train.steps`` override."""
    points = []
    for path in paths:
        record = json.loads(Path(path).read_text())
        for row in record.get("points") or record["rows"] + record.get("trajectories", []):
            overrides = record.get("shared_overrides", []) + row.get("overrides", [])
            steps = [int(o.split("=", 1)[1]) for o in overrides if o.startswith("train.steps=")]
            points.append({"family": name_family(row["method"]), "settings": {"overrides": overrides}, **row,
                           "step": row.get("step") or (steps[-1] if steps else None),
                           "from": row.get("from", str(path))})
    return points


def name_family(method: str) -> str:
    """The family of a method recorded without one: full, partial, lora, stack, hybrid, else Control LLM."""
    return method if method in ("full", "partial", "lora", "stack", "hybrid") else "controlllm"


def main(argv=None) -> int:
    args = parse_args(argv)

    import jax

    from jax_controlllm.checkpoint import load_model
    from jax_controlllm.config import ReportConfig, load_config
    from jax_controlllm.convert.auto import load_pretrained
    from jax_controlllm.experiment import evaluate_pair
    from jax_controlllm.tokenizer import load_tokenizer, run_tokenizer_source

    base_yaml, shared, methods = method_configs(args.config)
    chosen = list(methods) if args.methods is None else args.methods   # `--methods` alone: none (merge only)
    out = Path(args.out)
    rows, trajectories, base_cache = [], [], {}
    base_model = None

    def score(name, run, run_dir, model_path, described, train_s, step) -> dict:
        config, params = load_model(model_path)
        tokenizer = load_tokenizer(run_tokenizer_source(run, run_dir))
        start = time.time()
        spec = dataclasses.replace(run.report or ReportConfig(), export_hf=False)
        report = evaluate_pair(*base_model, config, params, tokenizer, run_dir, spec, progress=False,
                               base_cache=base_cache)
        row = point(name, run, report, step, described, methods[name]) | {
            "train_seconds": round(train_s, 1), "eval_seconds": round(time.time() - start, 1)}
        print(json.dumps(row), flush=True)
        return row

    for name in chosen:
        run_dir = out / name
        overrides = shared + args.extra + methods[name]
        along = args.frontier or name in args.trajectory
        if along:
            overrides += [f"train.save_every={args.every}", f"train.keep_every={args.every}"]
        run, described, train_s = train_method(base_yaml, overrides, run_dir)
        if base_model is None:
            policy = {k: getattr(run.model, k) for k in ("param_dtype", "frozen_dtype", "compute_dtype")}
            base_model = load_pretrained(run.base.path, run.base.format, **policy)
        mine = []
        if along:
            target = next((r["acquisition_exact_match"] for r in rows if r["method"] == args.stop_at_acquisition_of),
                          None)
            steps = sorted(int(d.name) for d in (run_dir / "checkpoints").iterdir() if d.name.isdigit())
            for step in [s for s in steps if s < run.train.steps]:
                mine.append(score(name, run, run_dir, run_dir / "checkpoints" / str(step), described, train_s, step))
                trajectories.append(mine[-1])
                if target is not None and mine[-1]["acquisition_exact_match"] >= target:
                    break
                if args.frontier and not rising(mine, args.patience):
                    break
        if not args.frontier or rising(mine, args.patience):
            row = score(name, run, run_dir, run_dir, described, train_s, run.train.steps)
            row.update(final_loss(run_dir))
            rows.append(row)
            mine.append(row)
    for path in map(Path, args.score_run):                 # runs trained elsewhere: score what they kept
        run = load_config(path / "config.yaml")
        methods.setdefault(path.name, [])
        if base_model is None:
            policy = {k: getattr(run.model, k) for k in ("param_dtype", "frozen_dtype", "compute_dtype")}
            base_model = load_pretrained(run.base.path, run.base.format, **policy)
        for step in sorted(int(d.name) for d in (path / "checkpoints").iterdir() if d.name.isdigit()):
            trajectories.append(score(path.name, run, path, path / "checkpoints" / str(step), f"scored from {path}",
                                      0.0, step))
    for path in map(Path, args.report_run):                # runs reported elsewhere: their final report as is
        run = load_config(path / "config.yaml")
        report = json.loads((path / "report.json").read_text())
        trajectories.append(point(path.name, run, report, run.train.steps, f"final report of {path}", []))
    result = {"what": "retention experiment: acquisition vs retention per tuning method",
              "command": "python bench/retention.py " + " ".join(sys.argv[1:] if argv is None else argv),
              "config": args.config, "base_config": base_yaml, "shared_overrides": shared + args.extra,
              "resolved_config_example": json.loads(json.dumps(
                  load_config(base_yaml, shared + args.extra).__dict__, default=str)),
              "machine": {"platform": platform.platform(), "processor": cpu_model(), "cores": os.cpu_count(),
                          "devices": str(jax.devices())},
              "versions": {"jax": jax.__version__, "python": platform.python_version()},
              **({"note": args.note} if args.note else {}),
              "rows": rows, **({"trajectories": trajectories} if trajectories else {})}
    if args.frontier:
        points = rows + trajectories + merged_points(args.merge)
        result.update(what="acquisition-retention frontier: every method's checkpoints scored along training",
                      merged=args.merge, summary=frontier_summary(points), points=points)
        result.pop("rows")
        result.pop("trajectories", None)
    if args.record:
        Path(args.record).parent.mkdir(parents=True, exist_ok=True)
        Path(args.record).write_text(json.dumps(result, indent=1, default=str))
    if args.plot:
        (plot_frontier(result["points"], Path(args.plot)) if args.frontier else plot(rows, Path(args.plot)))
    return 0


def rising(points: list[dict], patience: int) -> bool:
    """Whether exact match rose within the last ``patience`` scored points (True while there are too few)."""
    if len(points) <= patience:
        return True
    best_before = max(p["acquisition_exact_match"] for p in points[:-patience])
    return max(p["acquisition_exact_match"] for p in points[-patience:]) > best_before


if __name__ == "__main__":
    sys.exit(main())
