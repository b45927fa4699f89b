"""The run directory: resolved config, checkpoints, metrics. Created only once the run is known to start."""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import jax
import yaml

from jax_controlllm.checkpoint import CHECKPOINTS, RunCheckpoints
from jax_controlllm.config import RunConfig, to_dict


def open_checkpoints(run_dir: str | Path, run: RunConfig) -> Optional[RunCheckpoints]:
    """The run's checkpoint manager if it already has checkpoints (a resume); None for a new run."""
    if not (Path(run_dir) / CHECKPOINTS).is_dir():
        return None
    return _manager(run_dir, run)


def create_run_dir(run_dir: str | Path, run: RunConfig) -> RunCheckpoints:
    """Create the directory, write the resolved config, and return its checkpoint manager."""
    run_dir = Path(run_dir)
    if jax.process_index() == 0:
        run_dir.mkdir(parents=True, exist_ok=True)
        text = yaml.safe_dump(to_dict(run), sort_keys=False)
        (run_dir / "config.yaml").write_text(text, encoding="utf-8")
    return _manager(run_dir, run)


def _manager(run_dir, run: RunConfig) -> RunCheckpoints:
    t = run.train
    return RunCheckpoints(run_dir, keep_last=t.keep_last, keep_every=t.keep_every, async_save=t.async_checkpoint)
