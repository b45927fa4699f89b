"""Guards of a run directory: one trainer at a time (a lock naming its holder, taken over once the holder is
gone), the saved config as the record a resume is compared with, and a non-finite loss right after a restore
pointing at the checkpoint."""
import signal
import socket

import pytest
import yaml
from conftest import copy_of
from harness import DAMAGED_STEPS, EXIT_NONFINITE, TINY, TRIAL_OVERRIDES, Training, complete_steps, run_to_end

from jax_controlllm.config import ConfigError, load_config, to_dict
from jax_controlllm.train.rundir import check_config_drift, write_config

# ----------------------------------------------------------------------------------------------
# Two trainers
# ----------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_a_second_trainer_is_refused_and_a_dead_ones_lock_taken_over(tmp_path, cache_dir):
    run_dir = tmp_path / "run"
    first = Training(run_dir, cache_dir, "train.steps=100000", "train.save_every=0")
    first.wait_until(lambda: first.new_metric_lines() > 0)
    second = run_to_end(run_dir, cache_dir, "train.steps=100000", "train.save_every=0")
    assert second.process.returncode == 1, second.stderr[-3000:]
    assert len(second.lines) == 1 and second.lines[0].startswith(
        f"error: {run_dir} is in use by another trainer (pid {first.process.pid} on host {socket.gethostname()}, "
        f"since "), second.lines
    assert first.running()

    first.send(signal.SIGKILL)
    first.finish()
    third = run_to_end(run_dir, cache_dir, "train.steps=2")
    assert third.process.returncode == 0, third.stderr[-3000:]
    assert third.lines[0].startswith(f"taking over the stale lock of {run_dir}: pid {first.process.pid} on host "
                                     f"{socket.gethostname()}"), third.lines
    assert third.lines[0].endswith(" is gone")
    assert (run_dir / "train.lock").read_text() == ""      # released on exit: nothing left to take over


# ----------------------------------------------------------------------------------------------
# Config drift on resume (the comparison itself; the CLI path below)
# ----------------------------------------------------------------------------------------------

def recorded(tmp_path, *overrides):
    tmp_path.mkdir(parents=True, exist_ok=True)
    write_config(tmp_path, load_config(TINY, list(overrides)))
    return tmp_path


@pytest.mark.parametrize("override, key", [
    ("model.hidden_size=96", "model.hidden_size"),                  # the model
    ("expansion.merge_method=lerp", "expansion.merge_method"),      # the expansion
    ("data.tokenizer=/some/tokenizer", "data.tokenizer"),           # the tokenizer
    ("train.mode=full", "train.mode"),                              # what trains
])
def test_drift_of_what_the_checkpoint_is_has_no_override(tmp_path, override, key):
    run_dir = recorded(tmp_path)
    with pytest.raises(ConfigError) as err:
        check_config_drift(run_dir, load_config(TINY, [override]), allowed=(key, key.split(".")[0]))
    message = str(err.value)
    assert "\n" not in message and key in message and "start a new run with another --out" in message
    assert "--allow-change" not in message


@pytest.mark.parametrize("override, key, section", [
    ("data.max_doc_len=20", "data.max_doc_len", "data"),            # the data
    ("train.lr=5e-4", "train.lr", "train"),                         # the optimizer
    ("model.compute_dtype=bfloat16", "model.compute_dtype", "model"),
    ("model.frozen_matmul=fp8", "model.frozen_matmul", "model"),   # other numerics, same weights
])
def test_drift_that_may_continue_needs_allow_change(tmp_path, override, key, section):
    run_dir = recorded(tmp_path)
    requested = load_config(TINY, [override])
    with pytest.raises(ConfigError) as err:
        check_config_drift(run_dir, requested)
    message = str(err.value)
    assert "\n" not in message and f"--allow-change {key}" in message and "another --out" in message
    line = check_config_drift(run_dir, requested, allowed=(key,))
    assert line.startswith(f"resuming with changed {key} (") and "\n" not in line
    assert check_config_drift(run_dir, requested) is None           # the record now holds the change
    if section != "model":                                          # a whole section may be allowed too
        run_dir = recorded(tmp_path / "again")
        assert check_config_drift(run_dir, requested, allowed=(section,)) is not None


def test_lists_in_the_record_are_no_drift_from_the_configs_tuples(tmp_path):
    overrides = ["expansion.layers=[1, 3]", "mesh.axes=[fsdp]", "mesh.rules={embed: [fsdp], mlp: null}",
                 "model.rope_scaling={rope_type: linear, factor: 2.0}"]
    run_dir = recorded(tmp_path, *overrides)
    assert "- 1\n" in (run_dir / "config.yaml").read_text()      # plain YAML lists, no Python tuples
    assert check_config_drift(run_dir, load_config(TINY, overrides)) is None


def test_a_record_written_by_an_earlier_version_is_no_drift(tmp_path):
    """Before the config was frozen and typed, the record held data as written, an `eval` section and
    expansion.freeze_ori_non_layers; a resume with the same config sees no change."""
    run = load_config(TINY)
    old = to_dict(run)
    old["data"] = {"source": "synthetic", "min_doc_len": 4, "max_doc_len": 24}
    old["expansion"]["freeze_ori_non_layers"] = True
    old["eval"] = {}
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(old, sort_keys=False))
    assert check_config_drift(tmp_path, run) is None
    with pytest.raises(ConfigError, match="unknown config key '(eval|expansion.freeze_ori_non_layers)'"):   # retired
        load_config(tmp_path / "config.yaml")


def test_harmless_drift_applies_and_is_listed_in_one_line(tmp_path):
    run_dir = recorded(tmp_path)
    changes = ["train.steps=80", "train.log_every=2", "train.eval_every=0", "train.save_every=3",
               "train.keep_last=5", "mesh.shape=-1"]
    line = check_config_drift(run_dir, load_config(TINY, changes))
    assert "\n" not in line
    for change in changes:
        assert change.split("=")[0] in line, line
    assert "train.steps (10 -> 80)" in line


def test_model_drift_on_the_command_line_is_one_line(stopped, tmp_path, capsys):
    """The issue's case: a run resumed with --set model.hidden_size=96 or a different merge method."""
    from launch.train import main
    run_dir = copy_of(stopped, tmp_path)
    base = ["--config", str(TINY), "--out", str(run_dir), "--no-progress",
            *[arg for item in TRIAL_OVERRIDES for arg in ("--set", item)]]
    for change in ("model.hidden_size=96", "expansion.merge_method=lerp"):
        assert main([*base, "--set", change]) == 1
        err = capsys.readouterr().err.strip().splitlines()
        # the keys derived from it (model.head_dim from hidden_size) are listed too
        assert len(err) == 1 and err[0].startswith(f"error: resuming {run_dir} with a different "), err
        assert f"{change.split('=')[0]} (" in err[0] and err[0].endswith("start a new run with another --out")


# ----------------------------------------------------------------------------------------------
# A non-finite loss right after a restore
# ----------------------------------------------------------------------------------------------

@pytest.mark.slow
def test_a_nonfinite_loss_right_after_a_restore_names_the_verify_command(stopped, tmp_path, cache_dir):
    run_dir = copy_of(stopped, tmp_path)
    newest = DAMAGED_STEPS[0]
    run = run_to_end(run_dir, cache_dir, f"train.inject_nan_at_step={newest + 1}")
    assert run.process.returncode == EXIT_NONFINITE, run.stderr[-3000:]
    assert run.lines[-1] == (
        f"step {newest + 1}: the loss is not finite (allowed skips: train.skip_nonfinite_steps=0); stopped without "
        f"a new checkpoint; this is 1 step(s) after the restore of checkpoint step {newest}, which may be damaged: "
        f"check it with python -m launch.checkpoints verify {run_dir}; otherwise lower train.lr, check the data, "
        f"or allow skips"), run.lines[-1]
    assert complete_steps(run_dir)[-1] == newest                    # no checkpoint of the suspect state
