"""Kill -9 and SIGTERM at random moments of one async-checkpointing run, restarted after every stop.

One run directory goes through 22 interrupted starts (20 kill -9, 8 of them while a checkpoint is being written
and 3 during start-up, and 2 SIGTERMs, one mid-save and one mid-step), then one start that finishes. After every
stop:

* the next start resumes from the newest complete checkpoint (no checkpointed work is lost);
* that checkpoint reads back whole: finite weights and the data position of its step;
* no half-written save is ever picked: only Orbax's renamed ``<step>`` directories count;
* SIGTERM exits with 75 within a bounded time, with a checkpoint of the step it names;

and in the end every loss any start logged equals the uninterrupted reference's loss of that step bit for bit,
and so do the final weights.
"""
import signal

import numpy as np
import pytest

from harness import (EXIT_PREEMPTED, STEPS, check_checkpoint, complete_steps, final_params, interrupted_saves,
                     loss_records, run_to_end, run_trial, same_params, trial_kinds)

TRIALS = {"kill9-training": 9, "kill9-mid-save": 8, "kill9-startup": 3, "sigterm-mid-save": 1,
          "sigterm-mid-step": 1}
SIGTERM_EXIT_BOUND_S = 60.0      # generous for a loaded CI machine; typically about one second


def check_stop(trial, run_dir) -> None:
    """What must hold after one interrupted start."""
    sig = signal.SIGTERM if trial.kind.startswith("sigterm") else signal.SIGKILL
    if trial.resumed_from is not None:             # it lived long enough to say where it started
        assert trial.resumed_from == (trial.newest_before or 0), trial
    if sig == signal.SIGKILL:
        assert trial.exit_code == -signal.SIGKILL, trial
    else:
        assert trial.exit_code == EXIT_PREEMPTED, trial
        assert trial.exit_seconds < SIGTERM_EXIT_BOUND_S, trial
        assert f"SIGTERM after step {trial.last_logged}: checkpoint saved" in trial.stop_message, trial
        assert trial.newest_after == trial.last_logged, trial        # nothing to redo after a clean stop
    assert (trial.newest_after or 0) >= (trial.newest_before or 0), trial   # checkpoints only move forward
    if trial.newest_after is not None:
        check_checkpoint(run_dir, trial.newest_after)
    # at most the steps since the newest checkpoint plus the one whose async save was in flight
    assert trial.redone_steps <= 2, trial


@pytest.mark.slow
@pytest.mark.xdist_group("training")
def test_random_kills_and_sigterms_lose_no_checkpointed_work(tmp_path, cache_dir, reference):
    rng = np.random.default_rng(20260)
    run_dir = tmp_path / "run"
    trials = []
    for kind in trial_kinds(TRIALS, rng):
        trial = run_trial(run_dir, cache_dir, kind, rng)
        check_stop(trial, run_dir)
        trials.append(trial)
    assert all(not t.notes for t in trials), [t for t in trials if t.notes]
    # the kills did hit saves in progress, and those saves were left half-written, never picked
    assert sum(t.interrupted_save for t in trials) >= TRIALS["kill9-mid-save"], trials

    final = run_to_end(run_dir, cache_dir, "train.save_every=0")     # no periodic saves: quicker to the end
    assert final.process.returncode == 0, final.stderr[-4000:]
    assert final.start_step() == trials[-1].newest_after
    assert not interrupted_saves(run_dir), "the finishing start cleans up interrupted saves"
    assert complete_steps(run_dir)[-1] == STEPS

    records = loss_records(run_dir)
    assert {step for step, _ in records} == set(range(1, STEPS + 1))
    mismatched = [(step, loss, reference["losses"][step]) for step, loss in records
                  if loss != reference["losses"][step]]
    assert not mismatched, mismatched                  # bit for bit, every start, every step
    assert same_params(final_params(run_dir), reference["params"])
