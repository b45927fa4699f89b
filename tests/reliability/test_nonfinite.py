"""NaN / inf losses: the run stops with a clear message and the last good checkpoint intact, or, with
``train.skip_nonfinite_steps: N``, skips up to N bad steps and stops at the next one."""
import math

import pytest
from harness import (
    EXIT_NONFINITE,
    EXIT_PREEMPTED,
    STEPS,
    check_checkpoint,
    complete_steps,
    final_params,
    read_metrics,
    run_to_end,
    same_params,
)

pytestmark = pytest.mark.slow
NAN_STEP = 5


def test_an_injected_nan_stops_the_run_with_the_last_good_checkpoint(tmp_path, cache_dir, reference):
    run_dir = tmp_path / "run"
    stopped = run_to_end(run_dir, cache_dir, f"train.inject_nan_at_step={NAN_STEP}")
    assert stopped.process.returncode == EXIT_NONFINITE, stopped.stderr[-3000:]
    last = stopped.lines[-1]
    assert last.startswith(f"step {NAN_STEP}: the loss is not finite; stopped with a checkpoint of step "
                           f"{NAN_STEP - 1}") and "train.skip_nonfinite_steps=0" in last, last
    assert "Traceback" not in stopped.stderr
    assert complete_steps(run_dir)[-1] == NAN_STEP - 1
    check_checkpoint(run_dir, NAN_STEP - 1)
    records = [r for r in read_metrics(run_dir) if "loss" in r]
    assert [r["step"] for r in records] == list(range(1, NAN_STEP + 1))
    assert records[-1]["skipped"] and math.isnan(records[-1]["loss"])

    # The checkpoint is exactly the state after the last good step: without the injection, the run resumes
    # from it and ends where the uninterrupted reference ends, bit for bit.
    resumed = run_to_end(run_dir, cache_dir, "train.save_every=0")
    assert resumed.process.returncode == 0 and resumed.start_step() == NAN_STEP - 1, resumed.stderr[-3000:]
    after = [r for r in read_metrics(run_dir)[len(records):] if "loss" in r]
    expected = [(s, reference["losses"][s]) for s in range(NAN_STEP, STEPS + 1)]
    assert [(r["step"], r["loss"]) for r in after] == expected
    assert same_params(final_params(run_dir), reference["params"])


def test_skip_nonfinite_steps_skips_the_bad_update_and_trains_on(tmp_path, cache_dir, reference):
    run_dir = tmp_path / "run"
    # stop (SIGTERM, testing aid) one step after the skipped one, keeping the checkpoints around it
    run = run_to_end(run_dir, cache_dir, f"train.inject_nan_at_step={NAN_STEP}", "train.skip_nonfinite_steps=1",
                     f"train.inject_sigterm_at_step={NAN_STEP + 1}")
    assert run.process.returncode == EXIT_PREEMPTED, run.stderr[-3000:]
    assert f"step {NAN_STEP}: non-finite loss, update skipped (1 of 1 allowed)" in run.stderr
    records = {r["step"]: r for r in read_metrics(run_dir) if "loss" in r}
    assert [s for s, r in records.items() if r["skipped"]] == [NAN_STEP]
    assert all(records[s]["loss"] == reference["losses"][s] for s in range(1, NAN_STEP))
    assert math.isfinite(records[NAN_STEP + 1]["loss"])
    # the logged lr is the optimizer's: the skipped update did not advance its schedule
    assert records[NAN_STEP + 1]["lr"] == records[NAN_STEP]["lr"] != records[NAN_STEP - 1]["lr"]
    before, skipped, after = (check_checkpoint(run_dir, s) for s in (NAN_STEP - 1, NAN_STEP, NAN_STEP + 1))
    assert same_params(skipped, before)           # the bad step changed no weight
    assert not same_params(after, skipped)        # and training went on


def test_a_diverging_run_skips_n_bad_steps_then_stops(tmp_path, cache_dir):
    """lr 1e30 overflows the weights: every step from the third on is non-finite (inf activations, NaN loss)."""
    run_dir = tmp_path / "run"
    run = run_to_end(run_dir, cache_dir, "train.lr=1e30", "train.skip_nonfinite_steps=2")
    assert run.process.returncode == EXIT_NONFINITE, run.stderr[-3000:]
    assert "step 3: non-finite loss, update skipped (1 of 2 allowed)" in run.stderr
    assert "step 4: non-finite loss, update skipped (2 of 2 allowed)" in run.stderr
    assert run.lines[-1].startswith("step 5: the loss is not finite; stopped with a checkpoint of step 4")
    records = [r for r in read_metrics(run_dir) if "loss" in r]
    assert [r["skipped"] for r in records] == [False, False, True, True, True]
    assert complete_steps(run_dir)[-1] == 4
    check_checkpoint(run_dir, 4)
