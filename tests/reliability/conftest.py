"""Shared fixtures of the reliability suite: one compilation cache and one uninterrupted reference run.

The subprocess tests are in one xdist group (``training``), so they run on one worker, one after the other,
and share the reference run and the cache."""
import os

import pytest

from harness import STEPS, final_params, reference_losses, run_to_end


@pytest.fixture(scope="session")
def cache_dir(tmp_path_factory):
    """A persistent JAX compilation cache for every training subprocess of this session."""
    base = tmp_path_factory.getbasetemp()
    if os.environ.get("PYTEST_XDIST_WORKER"):   # shared by the workers: the parent of their base directories
        base = base.parent
    path = base / "reliability-jax-cache"
    path.mkdir(exist_ok=True)
    return path


@pytest.fixture(scope="session")
def reference(tmp_path_factory, cache_dir):
    """The trial config trained without interruption (no periodic saves: they do not change the losses)."""
    run_dir = tmp_path_factory.mktemp("reference")
    training = run_to_end(run_dir, cache_dir, "train.save_every=0")
    assert training.process.returncode == 0, training.stderr[-4000:]
    losses = reference_losses(run_dir)
    assert sorted(losses) == list(range(1, STEPS + 1))
    return {"dir": run_dir, "losses": losses, "params": final_params(run_dir)}
