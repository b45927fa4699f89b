"""The run directory: resolved config, checkpoints, metrics. Created only once the run is known to start.

Also the two guards of a run directory:

* ``hold_run_dir``: one trainer at a time, through an advisory lock (flock) on ``RUN/train.lock``, which records
  the holder's host and pid. A second trainer gets a one-line error naming the holder; a lock whose process is
  gone (a crash, kill -9: the kernel released it) is taken over with a line saying so.
* ``check_config_drift``: a resume compares the requested config with ``RUN/config.yaml``, the record of the run.
"""
from __future__ import annotations

import fcntl
import json
import os
import socket
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator, Optional

import jax
import numpy as np
import yaml

from jax_controlllm.checkpoint import CHECKPOINTS, RunCheckpoints
from jax_controlllm.config import ConfigError, RunConfig, load_config, read_yaml, to_dict, without_retired

CONFIG_FILE = "config.yaml"
LOCK_FILE = "train.lock"


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
    write_config(run_dir, run)
    return _manager(run_dir, run)


def write_config(run_dir: str | Path, run: RunConfig) -> None:
    """The run's record: the resolved config (process 0 writes it)."""
    if jax.process_index() == 0:
        text = yaml.safe_dump(to_dict(run), sort_keys=False)
        (Path(run_dir) / CONFIG_FILE).write_text(text, encoding="utf-8")


def _manager(run_dir, run: RunConfig) -> RunCheckpoints:
    t = run.train
    return RunCheckpoints(run_dir, keep_last=t.keep_last, keep_every=t.keep_every, async_save=t.async_checkpoint)


def resume_report(checkpoints: Optional[RunCheckpoints], run_dir: str | Path, run: RunConfig,
                  allowed: tuple = ()) -> list[str]:
    """What a start in an existing run directory says before it trains: the checkpoints set aside and the config
    changes applied (or a ConfigError for those refused). Without a checkpoint to resume from, the run starts
    afresh and ``run`` becomes the record."""
    if checkpoints is None:
        return []
    if checkpoints.latest_step() is None:
        write_config(run_dir, run)
        return [checkpoints.resume_note] if checkpoints.resume_note else []
    return [line for line in (checkpoints.resume_note, check_config_drift(run_dir, run, allowed)) if line]


# ----------------------------------------------------------------------------------------------
# One trainer per run directory
# ----------------------------------------------------------------------------------------------

@dataclass
class Holder:
    host: str
    pid: int
    since: str

    @classmethod
    def me(cls) -> "Holder":
        return cls(socket.gethostname(), os.getpid(), time.strftime("%Y-%m-%d %H:%M:%S %Z"))

    @classmethod
    def read(cls, text: str) -> Optional["Holder"]:
        try:
            data = json.loads(text)
            return cls(str(data["host"]), int(data["pid"]), str(data.get("since", "?")))
        except (ValueError, KeyError, TypeError):
            return None

    def alive(self) -> bool:
        """Whether the process still exists (only answerable on its own host)."""
        try:
            os.kill(self.pid, 0)
        except ProcessLookupError:
            return False
        except PermissionError:                  # exists, under another user
            return True
        return True

    def __str__(self) -> str:
        return f"pid {self.pid} on host {self.host}, since {self.since}"


class RunDirLock:
    """The flock on ``RUN/train.lock`` (process 0 of a run holds it)."""

    def __init__(self, run_dir: Path, log: Callable[[str], None]):
        self.run_dir, self.log = run_dir, log
        self.path = run_dir / LOCK_FILE
        self.created_dir = not run_dir.exists()
        self.handle = None

    def acquire(self) -> None:
        self.run_dir.mkdir(parents=True, exist_ok=True)
        while True:
            handle = open(self.path, "a+", encoding="utf-8")
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                handle.seek(0)
                holder = Holder.read(handle.read())
                handle.close()
                raise ConfigError(f"{self.run_dir} is in use by another trainer ({holder or 'holder unknown'}; "
                                  f"lock file {self.path}); wait for it or stop it, or give this run another "
                                  f"--out") from None
            # the file may have been replaced between open and flock: then the lock is on a stale inode
            if os.path.exists(self.path) and os.stat(self.path).st_ino == os.fstat(handle.fileno()).st_ino:
                break
            handle.close()
        handle.seek(0)
        previous = Holder.read(handle.read())
        me = Holder.me()
        if previous is not None and (previous.host, previous.pid) != (me.host, me.pid):
            if previous.host != me.host:
                self.log(f"taking over the lock of {self.run_dir} from {previous} (not held any more)")
            elif previous.alive():
                # flock free yet its recorded holder alive: a filesystem without flock; refuse to share
                handle.close()
                raise ConfigError(f"{self.run_dir} is recorded as in use by {previous} and the lock cannot tell "
                                  f"(a filesystem without flock?); stop that process, or give this run another "
                                  f"--out")
            else:
                self.log(f"taking over the stale lock of {self.run_dir}: {previous} is gone")
        handle.seek(0)
        handle.truncate()
        handle.write(json.dumps(vars(me)) + "\n")
        handle.flush()
        self.handle = handle

    def release(self) -> None:
        """Empty the record (a clean exit leaves nothing to take over) and unlock. A run directory this lock
        created and nothing else used is removed again: a run that fails before it starts leaves no trace."""
        if self.handle is None:
            return
        self.handle.seek(0)
        self.handle.truncate()
        if self.created_dir and [p.name for p in self.run_dir.iterdir()] == [LOCK_FILE]:
            self.path.unlink()
            self.run_dir.rmdir()
        self.handle.close()            # closing releases the flock
        self.handle = None


@contextmanager
def hold_run_dir(run_dir: str | Path, log: Callable[[str], None]) -> Iterator[None]:
    """Hold the run directory's lock for the block; ConfigError naming the holder if another trainer has it.
    Multi-process runs: process 0 takes the lock, the others wait for its decision."""
    lock = RunDirLock(Path(run_dir).absolute(), log)
    error = None
    if jax.process_index() == 0:
        try:
            lock.acquire()
        except ConfigError as err:
            error = err
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils
        refused = bool(multihost_utils.broadcast_one_to_all(np.array(error is not None)))
        if refused and error is None:
            error = ConfigError(f"{run_dir} is in use by another trainer (process 0 names it)")
    if error is not None:
        raise error
    try:
        yield
    finally:
        lock.release()


# ----------------------------------------------------------------------------------------------
# Config drift on resume
# ----------------------------------------------------------------------------------------------

# Keys that only say how long and how visibly the run goes on: a resume applies them and lists them.
HARMLESS = ("train.steps", "train.log_every", "train.eval_every", "train.eval_batches", "train.save_every",
            "train.keep_last", "train.keep_every", "train.async_checkpoint", "train.prefetch",
            "train.peak_flops_per_device", "train.inject_nan_at_step", "train.inject_sigterm_at_step",
            "mesh", "out_dir", "report", "data.prefetch", "data.tokenize_chunk",
            # how the same model is computed, not what it is
            "model.remat", "model.attention_impl", "model.scan_layers", "model.loss_chunk")
# What the checkpoint is: its architecture, expansion or adapters, tokenizer and what trains. No flag continues
# past these (a LoRA checkpoint's model config, dropout included, is what a resume trains).
FIXED = ("model", "base.path", "base.format", "expansion", "lora", "data.tokenizer", "train.mode",
         "train.trainable_layers")
# Everything else (optimizer, batch, data, knowledge corpus, the dtypes the checkpoint is cast to) changes the
# run, but continuing can be meaningful: allowed with --allow-change KEY.
ADJUSTABLE_MODEL = ("model.param_dtype", "model.frozen_dtype", "model.compute_dtype", "model.frozen_matmul")


def flatten(tree, prefix: str = "") -> dict:
    if isinstance(tree, dict) and tree:
        out = {}
        for key, value in tree.items():
            out.update(flatten(value, f"{prefix}.{key}" if prefix else str(key)))
        return out
    return {prefix: tree}


def under(key: str, prefixes) -> bool:
    return any(key == p or key.startswith(p + ".") for p in prefixes)


def check_config_drift(run_dir: str | Path, run: RunConfig, allowed: tuple = ()) -> Optional[str]:
    """Compare ``run`` with the run directory's record before resuming. Changes to the model, the expansion, the
    tokenizer or what trains are a ConfigError; other changes that alter training are one too unless named in
    ``allowed`` (keys or sections); harmless changes apply. Returns the line listing what changed (None: no
    change) and rewrites the record when something did."""
    path = Path(run_dir) / CONFIG_FILE
    if not path.is_file():
        return None
    saved = flatten(_record(path))
    requested = flatten(to_dict(run))
    changed = sorted(k for k in saved.keys() | requested.keys() if saved.get(k) != requested.get(k))
    if not changed:
        return None
    fixed = [k for k in changed if under(k, FIXED) and not under(k, HARMLESS + ADJUSTABLE_MODEL)]
    if fixed:
        raise ConfigError(f"resuming {run_dir} with a different {_describe(fixed, saved, requested)}: its "
                          f"checkpoints are of the recorded one ({path}); start a new run with another --out")
    refused = [k for k in changed if not under(k, HARMLESS) and not under(k, allowed)]
    if refused:
        flags = " ".join(f"--allow-change {k}" for k in refused)
        raise ConfigError(f"resuming {run_dir} with a different {_describe(refused, saved, requested)} than "
                          f"recorded in {path}; to continue this run with it pass {flags}, or start a new run "
                          f"with another --out")
    write_config(run_dir, run)
    return f"resuming with changed {_describe(changed, saved, requested)} (recorded in {path})"


def _record(path: Path) -> dict:
    """The recorded config with today's defaults filled in (as written by an older version: as it is)."""
    try:
        return to_dict(load_config(data=without_retired(read_yaml(path))))
    except ConfigError:
        return yaml.safe_load(path.read_text(encoding="utf-8")) or {}


def _describe(keys: list[str], saved: dict, requested: dict) -> str:
    return ", ".join(f"{k} ({_short(saved.get(k))} -> {_short(requested.get(k))})" for k in keys)


def _short(value) -> str:
    text = "unset" if value is None else str(value)
    return text if len(text) <= 40 else text[:37] + "..."
