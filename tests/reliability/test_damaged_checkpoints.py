"""Damaged checkpoints: bytes flipped, a file truncated or deleted, in each kind of checkpoint file (parameters,
optimizer state, data state, metadata). A resume sets every damaged checkpoint aside (kept on disk) with one line
and continues from the newest intact one, ending exactly where an uninterrupted run ends; with no intact
checkpoint it stops with one line; tools that read a damaged checkpoint refuse it in one line.

One stopped run (checkpoints 54-57, the ``stopped`` fixture of conftest.py) is shared by every case; each case
damages a copy of it.
"""
import json

import pytest
from conftest import copy_of, step_dir
from harness import (
    DAMAGED_STEPS,
    FAULTS,
    FILE_KINDS,
    INTACT_STEP,
    MANIFEST,
    STEPS,
    TINY,
    TRIAL_OVERRIDES,
    complete_steps,
    damage,
    final_params,
    loss_records,
    run_to_end,
    same_params,
    set_aside,
)

from jax_controlllm.checkpoint import RunCheckpoints, load_model
from jax_controlllm.checksums import CheckpointDamagedError, verify


@pytest.mark.slow
@pytest.mark.parametrize("kind", FILE_KINDS)
def test_damaged_checkpoints_are_set_aside_and_the_run_ends_as_an_uninterrupted_one(kind, stopped, tmp_path,
                                                                                    cache_dir, reference):
    run_dir = copy_of(stopped, tmp_path)
    for step, fault in zip(DAMAGED_STEPS, FAULTS):
        damage(FILE_KINDS[kind](step_dir(run_dir, step)), fault)
    records = len(loss_records(run_dir))

    resumed = run_to_end(run_dir, cache_dir, "train.save_every=0")
    assert resumed.process.returncode == 0 and resumed.start_step() == INTACT_STEP, resumed.stderr[-3000:]
    assert "Traceback" not in resumed.stderr
    notes = [line for line in resumed.lines if "set aside" in line]
    assert len(notes) == 1, resumed.stderr
    assert all(f"step {step} is damaged" in notes[0] for step in DAMAGED_STEPS), notes[0]
    for problem in ("checksum mismatch", "truncated", "missing"):
        assert problem in notes[0], notes[0]
    assert f"resuming from step {INTACT_STEP}, the newest intact checkpoint" in notes[0]
    # kept on disk, out of the way; the run wrote its own steps in their place
    assert set_aside(run_dir) == [f"{step}.damaged" for step in sorted(DAMAGED_STEPS)]
    assert complete_steps(run_dir)[-1] == STEPS
    assert loss_records(run_dir)[records:] == [(s, reference["losses"][s]) for s in range(INTACT_STEP + 1,
                                                                                         STEPS + 1)]
    assert same_params(final_params(run_dir), reference["params"])


def test_no_intact_checkpoint_is_a_one_line_error_every_time(stopped, tmp_path, capsys):
    from launch.train import main
    run_dir = copy_of(stopped, tmp_path)
    for step in complete_steps(run_dir):
        damage(FILE_KINDS["parameters"](step_dir(run_dir, step)), "flip")
    argv = ["--config", str(TINY), "--out", str(run_dir), "--no-progress",
            *[arg for item in TRIAL_OVERRIDES for arg in ("--set", item)]]
    for attempt in range(2):     # the second start finds the damaged steps already set aside: the same answer
        assert main(argv) == 1
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith(f"error: no intact checkpoint in {run_dir / 'checkpoints'}"), err
        assert "another --out" in err[0] and ("checksum mismatch" in err[0]) == (attempt == 0), err
    assert set_aside(run_dir) == [f"{step}.damaged" for step in (INTACT_STEP, *sorted(DAMAGED_STEPS))]


def test_a_save_cut_short_before_its_manifest_is_incomplete_never_used(stopped, tmp_path):
    """A kill while the manifest is written leaves no manifest, or only its temporary file."""
    run_dir = copy_of(stopped, tmp_path)
    newest = step_dir(run_dir, DAMAGED_STEPS[0])
    (newest / MANIFEST).rename(newest / (MANIFEST + ".tmp"))
    (step_dir(run_dir, 56) / MANIFEST).unlink()
    assert verify(newest).state == "incomplete"
    checkpoints = RunCheckpoints(run_dir)
    assert checkpoints.latest_step() == 55
    assert checkpoints.resume_note.startswith("checkpoint step 57 is incomplete (no checksums.json: its save did "
                                              "not finish), set aside as 57.incomplete; step 56 is incomplete")
    checkpoints.close()
    assert set_aside(run_dir) == ["56.incomplete", "57.incomplete"]


def test_retention_keeps_the_newest_intact_checkpoint_past_damaged_ones(stopped, tmp_path):
    """keep_last 2, steps 56 and 57 damaged: the next saves never push step 55 out before they are sealed."""
    import jax
    run_dir = copy_of(stopped, tmp_path)
    for step in (56, 57):
        damage(FILE_KINDS["optimizer state"](step_dir(run_dir, step)), "flip")
    checkpoints = RunCheckpoints(run_dir, keep_last=2, async_save=False)
    assert checkpoints.latest_step() == 55
    config, params = load_model(step_dir(run_dir, 55), as_numpy=True)
    params = jax.tree.map(jax.numpy.asarray, params)
    checkpoints.save(56, params, {"count": jax.numpy.int32(56)}, config, {"format": "synthetic/1", "batches": 56})
    assert complete_steps(run_dir) == [55, 56]           # 54 rotated out, 55 kept: 56 is the only newer one
    checkpoints.save(57, params, {"count": jax.numpy.int32(57)}, config, {"format": "synthetic/1", "batches": 57})
    checkpoints.close()
    assert complete_steps(run_dir) == [56, 57] and set_aside(run_dir) == ["56.damaged", "57.damaged"]


def test_tools_refuse_a_damaged_checkpoint_in_one_line(stopped, tmp_path, capsys):
    from launch.checkpoints import main as checkpoints_main
    from launch.convert import main as convert_main
    run_dir = copy_of(stopped, tmp_path)
    damage(FILE_KINDS["parameters"](step_dir(run_dir, 57)), "flip")
    damage(FILE_KINDS["optimizer state"](step_dir(run_dir, 56)), "truncate")
    with pytest.raises(CheckpointDamagedError, match=r"checkpoint .*/checkpoints/57 is damaged: params/.*: "
                                                     r"checksum mismatch; python -m launch.checkpoints verify "):
        load_model(run_dir)                              # the newest step of a run
    load_model(step_dir(run_dir, 56))                    # the optimizer state is not read: no complaint
    with pytest.raises(SystemExit) as exit_info:         # export (eval, generate and circuits load the same way)
        convert_main(["orbax-to-hf", "--ckpt", str(run_dir), "--out", str(tmp_path / "hf")])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("error: checkpoint ") and "57 is damaged" in err[-1], err

    assert checkpoints_main(["verify", str(run_dir)]) == 2
    lines = capsys.readouterr().out.strip().splitlines()
    states = {line.split()[0]: line.split()[1] for line in lines}
    assert states == {"54": "intact", "55": "intact", "56": "damaged", "57": "damaged"}, lines
    assert "truncated" in next(line for line in lines if line.startswith("56"))


def test_verify_command_on_an_intact_run(stopped, capsys):
    from launch.checkpoints import main as checkpoints_main
    assert checkpoints_main(["verify", str(stopped)]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert [line.split()[:2] for line in lines] == [[str(s), "intact"] for s in complete_steps(stopped)]
    manifest = json.loads((step_dir(stopped, 57) / MANIFEST).read_text())
    assert manifest["algorithm"] == "xxh3_64" and "params/_METADATA" in manifest["files"]
