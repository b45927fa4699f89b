"""Shared fixtures of the reliability suite: one compilation cache and one uninterrupted reference run, both
shared by the xdist workers (the reference is computed once, under a file lock), and one stopped run with a few
checkpoints that tests damage copies of."""
import fcntl
import os
import shutil
from contextlib import contextmanager
from pathlib import Path

import pytest
from harness import STEPS, final_params, reference_losses, run_to_end, stopped_run


def shared_dir(tmp_path_factory) -> Path:
    """The session's base temporary directory; with xdist, the parent of the workers' ones."""
    base = tmp_path_factory.getbasetemp()
    return base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base


@contextmanager
def exclusive(lock_file: Path):
    with open(lock_file, "w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        yield


@pytest.fixture(scope="session")
def cache_dir(tmp_path_factory):
    """A persistent JAX compilation cache for every training subprocess of the session."""
    path = shared_dir(tmp_path_factory) / "reliability-jax-cache"
    path.mkdir(exist_ok=True)
    return path


@pytest.fixture(scope="session")
def reference(tmp_path_factory, cache_dir):
    """The trial config trained without interruption (no periodic saves: they do not change the losses)."""
    root = shared_dir(tmp_path_factory)
    run_dir = root / "reliability-reference"
    with exclusive(root / "reliability-reference.lock"):
        if not (run_dir / "complete").exists():
            shutil.rmtree(run_dir, ignore_errors=True)
            training = run_to_end(run_dir, cache_dir, "train.save_every=0")
            assert training.process.returncode == 0, training.stderr[-4000:]
            (run_dir / "complete").touch()
    losses = reference_losses(run_dir)
    assert sorted(losses) == list(range(1, STEPS + 1))
    return {"dir": run_dir, "losses": losses, "params": final_params(run_dir)}


@pytest.fixture(scope="session")
def stopped(tmp_path_factory, cache_dir):
    """A run stopped at step 57 with the checkpoints of steps 54 to 57 (harness.stopped_run; each xdist worker
    makes its own). Tests work on copies."""
    return stopped_run(tmp_path_factory.mktemp("stopped") / "run", cache_dir)


def copy_of(stopped: Path, tmp_path: Path) -> Path:
    run_dir = tmp_path / "run"
    shutil.copytree(stopped, run_dir)
    return run_dir


def step_dir(run_dir: Path, step: int) -> Path:
    return run_dir / "checkpoints" / str(step)
