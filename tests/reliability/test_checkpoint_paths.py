"""Checkpoints are written only inside the configured run directory: step names that are not non-negative
integers are refused, a run directory spelled with ``..`` resolves where it says, and symbolic links in the
checkpoints directory (which would send writes, restores or retention deletions elsewhere) are refused."""
import os
from pathlib import Path

import jax.numpy as jnp
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from jax_controlllm.checkpoint import RunCheckpoints, resolve_model_dir
from jax_controlllm.config import ConfigError, ModelConfig

PROPERTY = settings(max_examples=50, deadline=None, suppress_health_check=[HealthCheck.too_slow])
TREE = {"w": jnp.arange(4.0)}


def files_under(root: Path) -> set[Path]:
    return {p for p in root.rglob("*")}


def save(run_dir: Path, step) -> None:
    checkpoints = RunCheckpoints(run_dir, async_save=False)
    try:
        checkpoints.save(step, TREE, TREE, ModelConfig(), {"batches": 0})
    finally:
        checkpoints.close()


STEPS = st.one_of(st.integers(-2**70, 2**70), st.floats(), st.booleans(), st.none(),
                  st.sampled_from(["../escape", "../../escape", "1/../../escape", "..", ".", "/tmp/escape", "7",
                                   "\u0663", "1e3"]),
                  st.text(max_size=12))


@PROPERTY
@given(step=STEPS)
def test_any_step_name_writes_inside_the_checkpoints_directory_or_is_refused(tmp_path_factory, step):
    root = tmp_path_factory.mktemp("paths")
    try:
        save(root / "run", step)
    except ValueError as err:
        assert "steps are non-negative integers" in str(err)
        assert not any(p.name != "checkpoints" for p in files_under(root / "run"))
    else:
        assert isinstance(step, int) and not isinstance(step, bool) and step >= 0
        assert os.listdir(root / "run" / "checkpoints") == [str(step)]
    assert files_under(root) <= {root / "run"} | files_under(root / "run")      # nothing beside the run


def test_a_run_directory_with_dot_dot_writes_where_it_resolves(tmp_path):
    save(tmp_path / "a" / ".." / "run", 3)
    assert os.listdir(tmp_path / "run" / "checkpoints") == ["3"]
    assert os.listdir(tmp_path / "a") == []                     # created on the way, nothing written in it


@pytest.fixture
def outside(tmp_path) -> Path:
    """A directory beside the run that must stay untouched."""
    path = tmp_path / "outside"
    path.mkdir()
    (path / "precious.txt").write_text("keep me")
    return path


@pytest.mark.parametrize("link_name", ["0", "5.orbax-checkpoint-tmp-1234", "notes"])
def test_a_symbolic_link_in_the_checkpoints_directory_is_refused(tmp_path, outside, link_name):
    run_dir = tmp_path / "run"
    save(run_dir, 1)
    link = run_dir / "checkpoints" / link_name
    link.symlink_to(outside, target_is_directory=True)
    with pytest.raises(ConfigError, match=rf"{link} is a symbolic link \(to {outside}\); checkpoints are only "
                                          rf"written inside the run directory"):
        RunCheckpoints(run_dir)
    assert sorted(p.name for p in outside.iterdir()) == ["precious.txt"]
    assert sorted(os.listdir(run_dir / "checkpoints")) == sorted(["1", link_name])    # nothing cleaned up either


def test_a_symbolic_link_as_the_checkpoints_directory_is_refused(tmp_path, outside):
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "checkpoints").symlink_to(outside, target_is_directory=True)
    with pytest.raises(ConfigError, match="is a symbolic link"):
        RunCheckpoints(tmp_path / "run")
    assert sorted(p.name for p in outside.iterdir()) == ["precious.txt"]


def test_the_cli_reports_a_link_in_one_line(tmp_path, outside, capsys):
    from harness import TINY

    from launch.train import main

    run_dir = tmp_path / "run"
    save(run_dir, 1)
    (run_dir / "checkpoints" / "7").symlink_to(outside, target_is_directory=True)
    assert main(["--config", str(TINY), "--out", str(run_dir), "--no-progress"]) == 1
    lines = capsys.readouterr().err.strip().splitlines()
    assert lines[-1].startswith(f"error: {run_dir / 'checkpoints' / '7'} is a symbolic link"), lines
    assert "Traceback" not in "\n".join(lines)


def test_directory_names_that_only_look_like_steps_are_ignored(tmp_path):
    """``str.isdigit`` is true for '\u0663' (Arabic-Indic three) and '\u00b2' (superscript two); int() of them is
    not a step."""
    run_dir = tmp_path / "run"
    save(run_dir, 2)
    for name in ("\u0663", "\u00b2", "10.orbax-checkpoint-tmp-1"):
        (run_dir / "checkpoints" / name).mkdir()
    assert resolve_model_dir(run_dir)[0] == run_dir.absolute() / "checkpoints" / "2" / "params"
