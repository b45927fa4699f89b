"""The kill / SIGTERM chain (no tests here): one run directory, many interrupted starts, one start that finishes,
and the list of every broken promise. Used by test_kill_resume.py and bench/reliability.py."""
from __future__ import annotations

import signal
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
from harness import (
    EXIT_PREEMPTED,
    STEPS,
    Trial,
    check_checkpoint,
    complete_steps,
    final_params,
    interrupted_saves,
    loss_records,
    run_to_end,
    run_trial,
    same_params,
    trial_kinds,
)

SIGTERM_EXIT_BOUND_S = 60.0      # generous for a loaded CI machine; about one second on an idle one
MAX_REDONE_STEPS = 2             # save_every=1: the steps since the newest checkpoint, one save being in flight


@dataclass
class Chain:
    trials: list[Trial] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)
    final_start: int | None = None

    def figures(self) -> dict:
        kills = [t for t in self.trials if t.kind.startswith("kill9")]
        terms = [t for t in self.trials if t.kind.startswith("sigterm")]
        resumed = [t for t in self.trials if t.resumed_from is not None]
        redone = [t.redone_steps for t in kills]
        return {
            "trials": len(self.trials),
            "by_kind": {kind: sum(t.kind == kind for t in self.trials) for kind in sorted({t.kind for t in
                                                                                          self.trials})},
            "kill9": len(kills),
            "kill9_that_interrupted_a_save": sum(t.interrupted_save for t in kills),
            "sigterm": len(terms),
            "sigterm_exit_seconds_max": max((t.exit_seconds for t in terms), default=None),
            # every start that said where it started (plus the finishing one), and how many picked the newest
            "resumes_checked": len(resumed) + (self.final_start is not None),
            "resumes_not_from_the_newest_complete_checkpoint": sum(t.resumed_from != (t.newest_before or 0)
                                                                   for t in resumed),
            "checkpoints_that_did_not_read_back": sum("does not read back" in p for p in self.problems),
            # checkpointed work lost: steps between the newest complete checkpoint and where the next start began
            "checkpointed_steps_lost": sum(max((t.newest_before or 0) - t.resumed_from, 0) for t in resumed)
            + sum(max((t.newest_before or 0) - (t.newest_after or 0), 0) for t in self.trials),
            "steps_redone_after_kill9_max": max(redone, default=0),
            "steps_redone_after_kill9_total": sum(redone),
            "loss_records_differing_from_reference": sum(p.startswith("step ") for p in self.problems),
            "problems": len(self.problems),
        }

    def records(self) -> list[dict]:
        return [asdict(t) for t in self.trials]


def stop_problems(trial: Trial, run_dir: Path) -> list[str]:
    """What must hold after one interrupted start; each broken promise as a line."""
    problems = []
    sigterm = trial.kind.startswith("sigterm")
    if trial.notes:
        problems.append(f"{trial}: {trial.notes}")
    if trial.resumed_from is not None and trial.resumed_from != (trial.newest_before or 0):
        problems.append(f"{trial}: resumed from {trial.resumed_from}, not the newest complete checkpoint")
    if not sigterm and trial.exit_code != -signal.SIGKILL:
        problems.append(f"{trial}: exit {trial.exit_code} after kill -9")
    if sigterm:
        if trial.exit_code != EXIT_PREEMPTED:
            problems.append(f"{trial}: exit {trial.exit_code} after SIGTERM, expected {EXIT_PREEMPTED}")
        if trial.exit_seconds is None or trial.exit_seconds > SIGTERM_EXIT_BOUND_S:
            problems.append(f"{trial}: took {trial.exit_seconds} s to stop after SIGTERM")
        if f"SIGTERM after step {trial.last_logged}: checkpoint saved" not in trial.stop_message:
            problems.append(f"{trial}: no checkpoint of the step it stopped at")
        if trial.newest_after != trial.last_logged:
            problems.append(f"{trial}: newest checkpoint {trial.newest_after} after a clean stop at "
                            f"{trial.last_logged}")
    if (trial.newest_after or 0) < (trial.newest_before or 0):
        problems.append(f"{trial}: the newest checkpoint went back")
    if trial.newest_after is not None:
        try:
            check_checkpoint(run_dir, trial.newest_after)
        except Exception as err:  # noqa: BLE001 - any failure to read it back is the finding
            problems.append(f"{trial}: checkpoint {trial.newest_after} does not read back: {err!r}")
    if not sigterm and trial.redone_steps > MAX_REDONE_STEPS:
        problems.append(f"{trial}: {trial.redone_steps} steps to redo, more than {MAX_REDONE_STEPS}")
    return problems


def run_chain(run_dir: Path, cache_dir: Path, counts: dict[str, int], seed: int, reference: dict) -> Chain:
    """Interrupted starts of ``counts`` kinds in a seeded random order, then a start that finishes; every loss
    logged by any start and the final weights are compared with the uninterrupted ``reference`` bit for bit."""
    rng = np.random.default_rng(seed)
    chain = Chain()
    for kind in trial_kinds(counts, rng):
        trial = run_trial(run_dir, cache_dir, kind, rng)
        chain.trials.append(trial)
        chain.problems += stop_problems(trial, run_dir)

    final = run_to_end(run_dir, cache_dir, "train.save_every=0")     # no periodic saves: quicker to the end
    chain.final_start = final.start_step()
    newest = chain.trials[-1].newest_after if chain.trials else None
    if final.process.returncode != 0:
        chain.problems.append(f"the finishing start failed: {final.stderr[-2000:]}")
    if chain.final_start != (newest or 0):
        chain.problems.append(f"the finishing start began at {chain.final_start}, not at {newest}")
    if interrupted_saves(run_dir):
        chain.problems.append(f"interrupted saves left after the finishing start: {interrupted_saves(run_dir)}")
    if complete_steps(run_dir)[-1:] != [STEPS]:
        chain.problems.append(f"no final checkpoint of step {STEPS}: {complete_steps(run_dir)}")
    records = loss_records(run_dir)
    if {step for step, _ in records} != set(range(1, STEPS + 1)):
        chain.problems.append(f"steps never logged: {set(range(1, STEPS + 1)) - {s for s, _ in records}}")
    chain.problems += [f"step {step}: loss {loss!r} != reference {reference['losses'][step]!r}"
                       for step, loss in records if loss != reference["losses"].get(step)]
    if not same_params(final_params(run_dir), reference["params"]):
        chain.problems.append("the final weights differ from the uninterrupted run's")
    return chain
