"""Reliability figures: faults injected into CPU training runs, and what survived them.

    python bench/reliability.py [--trials 40] [--seed 1] [--out bench/results/reliability.json]

1. Trains configs/tiny.yaml (fp32, one CPU device, 60 steps) once without interruption: the reference.
2. Interrupted starts, ``--trials`` of them kill -9 (45% at a random moment of training, 40% while a checkpoint
   is being written, 15% during start-up) plus ``--trials / 10`` SIGTERMs mid-save and as many mid-step, with an
   asynchronous checkpoint after every step. They run in chains of at most 24 starts on one run directory, each
   chain ending with a start that finishes; the checks are those of tests/reliability/kill_chain.py (the next
   start resumes from the newest complete checkpoint, that checkpoint reads back whole, SIGTERM exits with 75 and
   a checkpoint of its step, and every loss any start logged and the final weights equal the reference's bit for
   bit).
3. Damaged checkpoints: a run stopped at step 57 with checkpoints 54-57; for each kind of checkpoint file
   (parameters, optimizer state, data state, metadata) and each fault (bytes flipped, truncated, deleted), a copy
   of it has that file of step 57 damaged and is resumed to the end. Checked: the damaged step is set aside with
   one line, the run resumes from step 56 and its losses and final weights equal the reference's bit for bit.
4. Runs the rest of tests/reliability with pytest (disk full and write errors, NaN/inf, damaged checkpoints, two
   trainers, config drift, hostile configs, data files, safetensors headers, checkpoint paths) and records each
   test's outcome.

Prints JSON and writes it to --out, with the command, the machine and the versions.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
import xml.etree.ElementTree as ElementTree
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests" / "reliability"))

from harness import (  # noqa: E402
    DAMAGED_STEPS,
    FAULTS,
    FILE_KINDS,
    STEPS,
    damage,
    final_params,
    loss_records,
    reference_losses,
    run_to_end,
    same_params,
    set_aside,
    stopped_run,
)
from host import cpu_model  # noqa: E402  (bench/host.py, beside this script)
from kill_chain import run_chain  # noqa: E402

CHAIN_STARTS = 24      # interrupted starts per run directory: a chain must not reach the last step early
OTHER_FAULTS = {       # tests of the rest of the suite that inject a fault into a training run
    "test_a_write_error_in_an_async_save_stops_the_run_with_one_line": "write error (EFBIG) inside an async save",
    "test_a_full_disk_stops_the_run_before_the_save_that_cannot_fit": "full filesystem (6 MiB tmpfs)",
    "test_an_injected_nan_stops_the_run_with_the_last_good_checkpoint": "NaN loss, no skips allowed",
    "test_skip_nonfinite_steps_skips_the_bad_update_and_trains_on": "NaN loss, 1 skip allowed",
    "test_a_diverging_run_skips_n_bad_steps_then_stops": "inf/NaN from divergence (lr 1e30), 2 skips allowed",
    **{f"test_damaged_checkpoints_are_set_aside_and_the_run_ends_as_an_uninterrupted_one[{kind}]":
       f"{kind}: flipped, truncated and deleted in three checkpoints at once" for kind in FILE_KINDS},
    "test_no_intact_checkpoint_is_a_one_line_error_every_time": "every checkpoint damaged",
    "test_a_save_cut_short_before_its_manifest_is_incomplete_never_used": "kill while the manifest is written",
    "test_retention_keeps_the_newest_intact_checkpoint_past_damaged_ones": "retention past damaged checkpoints",
    "test_tools_refuse_a_damaged_checkpoint_in_one_line": "export / load_model / verify on damaged checkpoints",
    "test_a_second_trainer_is_refused_and_a_dead_ones_lock_taken_over": "two trainers; a dead trainer's lock",
    "test_model_drift_on_the_command_line_is_one_line": "resume with a changed model or merge method",
    "test_a_nonfinite_loss_right_after_a_restore_names_the_verify_command": "NaN one step after a restore",
}


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--trials", type=int, default=40, help="kill -9 trials (SIGTERM trials: a fifth as many)")
    p.add_argument("--seed", type=int, default=1, help="seed of the trial order and timing")
    p.add_argument("--skip-suite", action="store_true", help="only the kill / SIGTERM trials")
    p.add_argument("--out", default=str(REPO / "bench" / "results" / "reliability.json"))
    return p.parse_args(argv)


def trial_counts(kills: int) -> dict[str, int]:
    startup = round(0.15 * kills)
    mid_save = round(0.40 * kills)
    return {"kill9-training": kills - startup - mid_save, "kill9-mid-save": mid_save, "kill9-startup": startup,
            "sigterm-mid-save": max(kills // 10, 1), "sigterm-mid-step": max(kills // 10, 1)}


def split_into_chains(counts: dict[str, int]) -> list[dict[str, int]]:
    """Chains of at most CHAIN_STARTS starts with the kinds spread evenly."""
    total = sum(counts.values())
    n = -(-total // CHAIN_STARTS)
    return [{kind: count // n + (i < count % n) for kind, count in counts.items()} for i in range(n)]


def reference_run(work: Path, cache: Path) -> dict:
    reference_dir = work / "reference"
    run = run_to_end(reference_dir, cache, "train.save_every=0")
    assert run.process.returncode == 0, run.stderr[-3000:]
    return {"losses": reference_losses(reference_dir), "params": final_params(reference_dir)}


def kill_trials(work: Path, cache: Path, kills: int, seed: int, reference: dict) -> dict:
    start = time.perf_counter()
    chains = []
    for i, counts in enumerate(split_into_chains(trial_counts(kills))):
        chain = run_chain(work / f"chain{i}", cache, counts, seed + i, reference)
        chains.append({"figures": chain.figures(), "problems": chain.problems, "trials": chain.records()})
        print(f"chain {i}: {json.dumps(chain.figures())}", file=sys.stderr, flush=True)
    figures = [c["figures"] for c in chains]
    total = lambda key: sum(f[key] for f in figures)  # noqa: E731
    by_kind: dict[str, int] = {}
    for f in figures:
        for kind, n in f["by_kind"].items():
            by_kind[kind] = by_kind.get(kind, 0) + n
    sigterm_seconds = [f["sigterm_exit_seconds_max"] for f in figures if f["sigterm_exit_seconds_max"] is not None]
    return {
        "chains": len(chains), "steps_per_run": STEPS, "interrupted_starts": total("trials"), "by_kind": by_kind,
        "kill9": total("kill9"), "kill9_that_interrupted_a_save": total("kill9_that_interrupted_a_save"),
        "sigterm": total("sigterm"), "sigterm_exit_seconds_max": round(max(sigterm_seconds), 2),
        "resumes_checked": total("resumes_checked"),
        "resumes_not_from_the_newest_complete_checkpoint": total("resumes_not_from_the_newest_complete_checkpoint"),
        "checkpoints_that_did_not_read_back": total("checkpoints_that_did_not_read_back"),
        "checkpointed_steps_lost": total("checkpointed_steps_lost"),
        "steps_redone_after_kill9_max": max(f["steps_redone_after_kill9_max"] for f in figures),
        "steps_redone_after_kill9_total": total("steps_redone_after_kill9_total"),
        "loss_records_differing_from_reference": total("loss_records_differing_from_reference"),
        "final_weights_bit_exact": not any("final weights" in p for c in chains for p in c["problems"]),
        "problems": [p for c in chains for p in c["problems"]],
        "seconds": round(time.perf_counter() - start, 1),
        "per_chain": chains,
    }


def damage_trials(work: Path, cache: Path, reference: dict) -> dict:
    """Each kind of checkpoint file x each fault, in the newest checkpoint of a copy of one stopped run."""
    start = time.perf_counter()
    stopped = stopped_run(work / "stopped", cache)
    newest = DAMAGED_STEPS[0]
    trials = []
    for kind, find in FILE_KINDS.items():
        for fault in FAULTS:
            run_dir = work / f"damaged-{kind.replace(' ', '_')}-{fault}"
            shutil.copytree(stopped, run_dir)
            damage(find(run_dir / "checkpoints" / str(newest)), fault)
            records = len(loss_records(run_dir))
            resumed = run_to_end(run_dir, cache, "train.save_every=0")
            notes = [line for line in resumed.lines if "set aside" in line]
            expected = [(s, reference["losses"][s]) for s in range(newest, STEPS + 1)]
            trial = {"file": kind, "fault": fault, "exit_code": resumed.process.returncode,
                     "resumed_from": resumed.start_step(), "set_aside": set_aside(run_dir),
                     "note": notes[0] if notes else None, "one_line": len(notes) == 1,
                     "losses_bit_exact": loss_records(run_dir)[records:] == expected,
                     "final_weights_bit_exact": same_params(final_params(run_dir), reference["params"])}
            trial["ok"] = (trial["exit_code"] == 0 and trial["resumed_from"] == newest - 1 and trial["one_line"]
                           and trial["set_aside"] == [f"{newest}.damaged"] and trial["losses_bit_exact"]
                           and trial["final_weights_bit_exact"])
            trials.append(trial)
            print(f"damaged {kind} ({fault}): {'ok' if trial['ok'] else 'FAILED'}", file=sys.stderr, flush=True)
            shutil.rmtree(run_dir)
    return {"injected": len(trials), "detected_and_set_aside": sum(t["set_aside"] == [f"{newest}.damaged"]
                                                                   for t in trials),
            "resumed_from_the_newest_intact": sum(t["resumed_from"] == newest - 1 for t in trials),
            "runs_ending_bit_exact": sum(t["losses_bit_exact"] and t["final_weights_bit_exact"] for t in trials),
            "all_ok": all(t["ok"] for t in trials), "seconds": round(time.perf_counter() - start, 1),
            "trials": trials}


def property_tests() -> int:
    """Hypothesis-driven tests in the suite (each runs its settings' max_examples, 50)."""
    import importlib
    count = 0
    for path in sorted((REPO / "tests" / "reliability").glob("test_*.py")):
        module = importlib.import_module(path.stem)
        count += sum(callable(f) and hasattr(f, "hypothesis") for f in vars(module).values())
    return count


def rest_of_suite(work: Path) -> dict:
    junit = work / "suite.xml"
    command = [sys.executable, "-m", "pytest", "-q", "-n", "2", "-p", "no:cacheprovider", "tests/reliability",
               "--deselect", "tests/reliability/test_kill_resume.py", f"--junitxml={junit}"]
    start = time.perf_counter()
    result = subprocess.run(command, cwd=REPO, capture_output=True, text=True)
    seconds = time.perf_counter() - start
    tests = []
    for case in ElementTree.parse(junit).iter("testcase"):
        outcome = "passed"
        for child in case:
            if child.tag in ("failure", "error"):
                outcome = "failed"
            elif child.tag == "skipped":
                outcome = "xfailed" if "xfail" in (child.get("type") or "") + (child.get("message") or "") \
                    else "skipped"
        tests.append({"test": f"{case.get('classname')}.{case.get('name')}", "outcome": outcome,
                      "seconds": round(float(case.get("time", 0)), 2)})
    counts = {o: sum(t["outcome"] == o for t in tests) for o in ("passed", "failed", "skipped", "xfailed")}
    faults = {desc: next((t["outcome"] for t in tests if t["test"].endswith(name)), "missing")
              for name, desc in OTHER_FAULTS.items()}
    return {"command": " ".join(command[1:]), "exit_code": result.returncode, "seconds": round(seconds, 1),
            **counts, "property_tests": property_tests(), "examples_per_property": 50,
            "training_faults": faults, "tests": tests}


def machine() -> dict:
    cpu = cpu_model()
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return {"cpu": cpu, "cores": cores, "platform": platform.platform(), "load_average_1m": os.getloadavg()[0]}


def versions() -> dict:
    from importlib.metadata import version
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True,
                            text=True).stdout.strip()
    packages = ("jax", "jaxlib", "orbax-checkpoint", "tensorstore", "numpy", "pytest", "pytest-xdist", "hypothesis")
    return {"python": platform.python_version(), **{name: version(name) for name in packages},
            "jax_controlllm_commit": commit}


def main(argv=None) -> int:
    args = parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="reliability-") as tmp:
        work = Path(tmp)
        cache = work / "jax-cache"
        cache.mkdir()
        report = {"benchmark": "reliability",
                  "what": "faults injected into CPU training runs (configs/tiny.yaml, fp32, async checkpoints) and "
                          "hostile inputs; every check of tests/reliability applied to each",
                  "command": "python bench/reliability.py " + " ".join(sys.argv[1:] if argv is None else argv),
                  "machine": machine(), "versions": versions()}
        reference = reference_run(work, cache)
        report["kill_and_sigterm"] = kill_trials(work, cache, args.trials, args.seed, reference)
        report["damaged_checkpoints"] = damage_trials(work, cache, reference)
        if not args.skip_suite:
            report["suite"] = rest_of_suite(work)
    trials = {k: v for k, v in report["kill_and_sigterm"].items() if k != "per_chain"}
    damaged = {k: v for k, v in report["damaged_checkpoints"].items() if k != "trials"}
    print(json.dumps({**report, "kill_and_sigterm": trials, "damaged_checkpoints": damaged}, indent=2))
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=1) + "\n")
    ok = (not report["kill_and_sigterm"]["problems"] and report["damaged_checkpoints"]["all_ok"]
          and report.get("suite", {}).get("exit_code", 0) == 0)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
