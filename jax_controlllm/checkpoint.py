"""Checkpoints (Orbax): training checkpoints of a run directory, and standalone model exports.

Run directory layout::

    RUN/checkpoints/<step>/params/        full parameter tree (trainable fp32 + frozen), Orbax PyTree
                          /opt_state/     optax state of the trainable leaves
                          /model_config/  the ModelConfig, expansion included (JSON, file "metadata")
                          /data_state/    the data iterator state, one process_<i>.json per process

                          /checksums.json the manifest: size and xxh3-64 digest of every file above

A step directory appears only when every item is written: Orbax writes into
``<step>.orbax-checkpoint-tmp-*`` and renames it at the end, so a crash mid-save leaves nothing that
``latest_step`` (and so a resume) would pick. Once Orbax has finished (renamed) a save, the manifest is written
last (``jax_controlllm.checksums``); a step without it is incomplete and never used.

Opening a run for training verifies its checkpoints from the newest down to the first intact one; any that is
damaged (a file missing, truncated or with other bytes) or incomplete (no manifest) is set aside, renamed
``<step>.damaged`` / ``<step>.incomplete`` (kept on disk, out of Orbax's sight), and the run resumes from the
newest intact one, saying so in one line. Loading a model (``load_model``: export, eval, generation, circuits)
verifies what it reads and refuses a damaged checkpoint with a one-line ``CheckpointDamagedError``. Retention
(``keep_last`` / ``keep_every``) is applied here, not by Orbax, and only to complete (manifest) steps.

Restores go through abstract targets (ShapeDtypeStruct with shardings), so a checkpoint written on one mesh loads
onto any other.

Writes stay inside ``RUN/checkpoints``: steps are non-negative integers, and symbolic links in the way are refused.
A save that cannot be written (disk full, quota, permissions) raises ``CheckpointWriteError`` with a one-line
message; the checkpoints already there are left untouched (Orbax deletes old steps only after a new one is whole).

Standalone export (``save_model``)::

    EXPORT/model_config.json   the full ModelConfig (expansion included); written last
    EXPORT/params/             Orbax PyTree of the parameters
    EXPORT/checksums.json      the manifest of params/ (exports written before manifests have none: not verified)
"""
from __future__ import annotations

import dataclasses
import json
import logging
import os
import re
import shutil
import threading
from pathlib import Path
from typing import Any, Optional

import jax
import numpy as np
import orbax.checkpoint as ocp

from jax_controlllm.checksums import (
    DAMAGED,
    INCOMPLETE,
    MANIFEST,
    CheckpointDamagedError,
    Verdict,
    verify,
    write_manifest,
)
from jax_controlllm.config import RETIRED_MODEL_KEYS, ConfigError, ModelConfig, from_dict, to_dict, without_retired

CHECKPOINTS = "checkpoints"
ITEMS = ("params", "opt_state", "model_config", "data_state")
TMP_MARKER = ".orbax-checkpoint-tmp"      # Orbax's name for a step directory still being written
SET_ASIDE = (DAMAGED, INCOMPLETE)         # suffixes of step directories that failed verification
VERIFY_COMMAND = "python -m launch.checkpoints verify"
MODEL_ITEMS = ("params", "model_config")  # what load_model reads of a training checkpoint
SAVE_INODES = 256                         # files a save may create, with room to spare (it makes ~50)
OS_ERROR_CODE = re.compile(r"os_error_code='?(\d+)")   # how tensorstore names the OS error behind a failed write


class CheckpointWriteError(OSError):
    """A checkpoint could not be written (disk full, quota, permissions, I/O). The message is one line: which
    step, why, which checkpoints are intact, and how to resume."""


# ----------------------------------------------------------------------------------------------
# Model configs as JSON
# ----------------------------------------------------------------------------------------------

def model_config_to_json(config: ModelConfig) -> dict:
    return to_dict(config)


def model_config_from_json(data: dict, where: str = "model_config") -> ModelConfig:
    if isinstance(data, dict):            # written by an earlier version: keys retired since are ignored
        data = without_retired(data, RETIRED_MODEL_KEYS)
    config = from_dict(ModelConfig, data, where)
    config.validate()
    return config


# ----------------------------------------------------------------------------------------------
# The data iterator state: one JSON file per process (each process reads its own slice of the data)
# ----------------------------------------------------------------------------------------------

class DataStateHandler(ocp.JsonCheckpointHandler):
    """Like Orbax's JSON handler, but every process writes (and reads back) its own file."""

    async def _save_fn(self, x, directory):
        (directory / f"process_{jax.process_index()}.json").write_text(json.dumps(x))

    def restore(self, directory, item=None, args=None):
        own = Path(directory) / f"process_{jax.process_index()}.json"
        # A different process count: fall back to process 0's state (identical for row-sharded streams;
        # the data pipeline refuses states it cannot continue).
        path = own if own.exists() else Path(directory) / "process_0.json"
        return json.loads(path.read_text())


@ocp.args.register_with_handler(DataStateHandler, for_save=True)
@dataclasses.dataclass
class DataStateSave(ocp.args.CheckpointArgs):
    item: Any


@ocp.args.register_with_handler(DataStateHandler, for_restore=True)
@dataclasses.dataclass
class DataStateRestore(ocp.args.CheckpointArgs):
    item: Any = None


# ----------------------------------------------------------------------------------------------
# Training checkpoints of a run directory
# ----------------------------------------------------------------------------------------------

@dataclasses.dataclass
class Restored:
    step: int
    params: dict
    opt_state: Any
    model_config: ModelConfig
    data_state: Optional[dict]


class RunCheckpoints:
    """Orbax CheckpointManager over ``run_dir/checkpoints``: async saves, each sealed by a checksum manifest once
    Orbax has finished it; keeps the last ``keep_last`` complete steps plus every ``keep_every``-th step.

    Opening it for writing removes the leftovers of interrupted saves and sets aside the damaged or incomplete
    steps above the newest intact one; ``resume_note`` is then the one line that says so (None if nothing was
    set aside). If checkpoints exist but none is intact, CheckpointDamagedError."""

    def __init__(self, run_dir: str | Path, keep_last: int = 3, keep_every: int = 0, async_save: bool = True,
                 read_only: bool = False):
        self.directory = Path(run_dir).absolute() / CHECKPOINTS
        self.resume_note: Optional[str] = None
        if not read_only:
            refuse_links(self.directory)
            remove_interrupted_saves(self.directory)
            self.resume_note = set_aside_unusable(self.directory)
        self.keep_last, self.keep_every = max(keep_last, 1), keep_every
        self._pending: Optional[int] = None       # the step whose async save may still be running
        self._sealer: Optional[threading.Thread] = None
        self._seal_error: Optional[BaseException] = None
        # No Orbax retention: ours (apply_retention) counts only sealed steps
        options = ocp.CheckpointManagerOptions(enable_async_checkpointing=async_save, read_only=read_only,
                                               create=not read_only)
        self.manager = ocp.CheckpointManager(self.directory, options=options)
        self.async_save = async_save

    def latest_step(self) -> Optional[int]:
        return self.manager.latest_step()

    def all_steps(self) -> list[int]:
        return list(self.manager.all_steps())

    def save(self, step: int, params: dict, opt_state, model_config: ModelConfig, data_state: dict) -> None:
        """Start saving (asynchronously when enabled); the arrays may be donated right after this returns.
        Raises CheckpointWriteError if this save, or the previous asynchronous one, cannot be written."""
        step = checked_step(step)
        self.wait()                               # the previous save's failure surfaces here, under its own step
        self._check_free_space(step, (params, opt_state))
        args = ocp.args.Composite(params=ocp.args.StandardSave(params), opt_state=ocp.args.StandardSave(opt_state),
                                  model_config=ocp.args.JsonSave(model_config_to_json(model_config)),
                                  data_state=DataStateSave(data_state))
        try:
            self.manager.save(step, args=args, force=True)
        except Exception as err:
            raise self._write_error(step, err) from None
        self._pending = step
        if self.async_save:     # sealed in the background, as soon as Orbax has renamed the step into place
            self._sealer = threading.Thread(target=self._seal, args=(step,), name=f"seal-checkpoint-{step}",
                                            daemon=True)
            self._sealer.start()
        else:
            self._seal(step)
            self.wait()

    def _seal(self, step: int) -> None:
        """Wait for Orbax to finish the save, then write its manifest (process 0). Errors are kept for wait()."""
        try:
            self.manager.wait_until_finished()
            if jax.process_index() == 0:
                write_manifest(self.directory / str(step))
        except BaseException as err:  # noqa: BLE001 - re-raised by wait() on the main thread
            self._seal_error = err

    def read_model_config(self, step: int) -> ModelConfig:
        data = self.manager.restore(step, args=ocp.args.Composite(model_config=ocp.args.JsonRestore()))
        return model_config_from_json(data["model_config"], f"{self.directory}/{step}/model_config")

    def restore(self, step: int, params_target: dict, opt_target: Any = None) -> Restored:
        """Restore onto the shardings of the targets (trees of ShapeDtypeStruct with ``sharding``)."""
        items = {"params": ocp.args.StandardRestore(params_target), "model_config": ocp.args.JsonRestore(),
                 "data_state": DataStateRestore()}
        if opt_target is not None:
            items["opt_state"] = ocp.args.StandardRestore(opt_target)
        out = self.manager.restore(step, args=ocp.args.Composite(**items))
        config = model_config_from_json(out["model_config"], f"{self.directory}/{step}/model_config")
        return Restored(step, out["params"], out.get("opt_state") if opt_target is not None else None, config,
                        out["data_state"])

    def wait(self) -> None:
        """Block until the last save is on disk and sealed, then apply retention; CheckpointWriteError if it could
        not be written."""
        step, self._pending = self._pending, None
        sealer, self._sealer = self._sealer, None
        try:
            if sealer is not None:
                sealer.join()
            else:
                self.manager.wait_until_finished()
            err, self._seal_error = self._seal_error, None
            if err is not None:
                raise err
        except Exception as err:
            raise self._write_error(step, err) from None
        if step is not None:
            self.apply_retention()

    def apply_retention(self) -> None:
        """Delete the steps that ``keep_last`` / ``keep_every`` no longer keep. Only sealed steps count towards
        ``keep_last``, and the newest sealed one is always kept: a step that is not (yet) complete never pushes
        an intact one out. Run on every process (Orbax's delete synchronises them) after the pending save."""
        steps = self.all_steps()
        sealed = [s for s in steps if (self.directory / str(s) / MANIFEST).is_file()]
        if jax.process_count() > 1:               # the manifest is written by process 0: its view decides
            from jax.experimental import multihost_utils
            flags = multihost_utils.broadcast_one_to_all(np.array([s in sealed for s in steps], dtype=bool))
            sealed = [s for s, flag in zip(steps, flags) if flag]
        latest = sealed[-self.keep_last:]
        for step in steps:
            # only steps older than the kept complete ones: never one newer than the newest complete step
            if latest and step < latest[0] and not (self.keep_every > 0 and step % self.keep_every == 0):
                self.manager.delete(step)

    def _check_free_space(self, step: int, trees) -> None:
        """Refuse a save that cannot fit before starting it: a disk found full in the middle of an asynchronous
        save is only reported one save later, amid Orbax's and tensorstore's own error output."""
        need = int(sum(getattr(x, "nbytes", 0) for x in jax.tree.leaves(trees)) * 1.05) + (1 << 20)
        try:
            fs = os.statvfs(self.directory)
        except OSError:                           # not a local filesystem: the write itself will tell
            return
        free, inodes = fs.f_bavail * fs.f_frsize, fs.f_favail
        # a save creates a few dozen files (Orbax's OCDBT format packs the arrays); f_files 0: no inode limit
        fits = free >= need and (fs.f_files == 0 or inodes >= SAVE_INODES)
        if jax.process_count() > 1:               # every process must take the same decision
            from jax.experimental import multihost_utils
            fits = bool(np.all(multihost_utils.process_allgather(np.array([fits]))))
        if not fits:
            raise self._failed(step, f"not enough free space ({need / 2**20:.1f} MiB and {SAVE_INODES} inodes "
                                     f"needed, {free / 2**20:.1f} MiB and {inodes} inodes free)")

    def _write_error(self, step: Optional[int], err: Exception) -> Exception:
        """A CheckpointWriteError for an OS-level write failure; any other error is returned as it is."""
        if isinstance(err, OSError):
            reason = (os.strerror(err.errno) if err.errno else str(err)) + (f" ({err.filename})" if err.filename
                                                                            else "")
        elif match := OS_ERROR_CODE.search(str(err)):
            reason = f"{os.strerror(int(match.group(1)))} (errno {match.group(1)})"
        else:
            return err
        quiet_abandoned_writes()
        return self._failed(step, reason)

    def _failed(self, step: Optional[int], reason: str) -> CheckpointWriteError:
        kept = sealed_steps(self.directory)
        then = f"resume from step {kept[-1]}" if kept else "start again"
        return CheckpointWriteError(
            f"checkpoint {'' if step is None else f'step {step} '}could not be written in {self.directory}: "
            f"{reason}. Checkpoints intact: {', '.join(map(str, kept)) or 'none'}. Free space (or fix the "
            f"cause) and rerun the same command to {then}")

    def close(self) -> None:
        self.wait()
        self.manager.close()


class _AbandonedWrites(logging.Filter):
    """Drops asyncio's "exception was never retrieved" reports of the sibling writes of a failed save (Orbax
    leaves them unawaited): the failure was already reported, in one line, as a CheckpointWriteError."""

    def filter(self, record: logging.LogRecord) -> bool:
        err = record.exc_info[1] if record.exc_info else None
        failed_write = isinstance(err, OSError) or bool(err is not None and OS_ERROR_CODE.search(str(err)))
        return not (failed_write and "never retrieved" in record.getMessage())


def quiet_abandoned_writes() -> None:
    logger = logging.getLogger("asyncio")
    if not any(isinstance(f, _AbandonedWrites) for f in logger.filters):
        logger.addFilter(_AbandonedWrites())


def checked_step(step) -> int:
    """Steps name directories: only non-negative integers, so no step can point outside the checkpoints."""
    if isinstance(step, bool) or not isinstance(step, (int, np.integer)) or step < 0:
        raise ValueError(f"checkpoint step {step!r}: steps are non-negative integers")
    return int(step)


def steps_on_disk(directory: Path) -> list[int]:
    """The steps Orbax finished: directories named by an integer (interrupted saves keep Orbax's tmp names,
    set-aside ones a suffix)."""
    if not directory.is_dir():
        return []
    return sorted(int(p.name) for p in directory.iterdir() if p.is_dir() and p.name.isascii() and p.name.isdigit())


def sealed_steps(directory: Path) -> list[int]:
    """The complete steps: finished by Orbax and sealed by their manifest (not verified here: see ``verify``)."""
    return [s for s in steps_on_disk(directory) if (directory / str(s) / MANIFEST).is_file()]


def set_aside_dirs(directory: Path) -> list[Path]:
    """Step directories set aside by an earlier verification (``<step>.damaged``, ``<step>.incomplete``,
    ``.<n>`` appended on a repeat), by step."""
    if not directory.is_dir():
        return []
    found = [(step, p) for p in directory.iterdir() if p.is_dir() and (step := set_aside_step(p)) is not None]
    return [p for _, p in sorted(found, key=lambda item: (item[0], item[1].name))]


def set_aside_step(path: Path) -> Optional[int]:
    """The step of a set-aside directory; None for any other name."""
    step, _, state = path.name.partition(".")
    return int(step) if step.isascii() and step.isdigit() and state.split(".")[0] in SET_ASIDE else None


def set_aside_unusable(directory: Path) -> Optional[str]:
    """Verify the steps newest first until one is intact; rename the damaged or incomplete ones above it out of
    the way. Returns the line to print (None: the newest step was intact, or there is none). Raises
    CheckpointDamagedError if checkpoints exist but none is intact. Process 0 decides, the others follow."""
    note, error = _set_aside(directory) if jax.process_index() == 0 else (None, None)
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils
        failed = bool(multihost_utils.broadcast_one_to_all(np.array(error is not None)))
        multihost_utils.sync_global_devices("checkpoints verified")
        if failed and error is None:
            error = f"{directory}: no intact checkpoint (process 0 says which are damaged)"
    if error is not None:
        raise CheckpointDamagedError(error)
    return note


def _set_aside(directory: Path) -> tuple[Optional[str], Optional[str]]:
    """(the line saying what was set aside, or the error if nothing intact is left) on process 0."""
    moved, intact = [], None
    for step in reversed(steps_on_disk(directory)):
        verdict = verify(directory / str(step))
        if verdict.intact:
            intact = step
            break
        target = _aside_name(directory, step, verdict.state)
        os.rename(directory / str(step), target)
        moved.append(f"step {step} is {verdict.state} ({verdict.reason()}), set aside as {target.name}")
    if intact is None and (moved or set_aside_dirs(directory)):
        aside = ", ".join(p.name for p in set_aside_dirs(directory))
        return None, (f"no intact checkpoint in {directory}: {'; '.join(moved) + '; ' if moved else ''}kept "
                      f"aside: {aside}. Start a new run with another --out, or move {directory} away to start this "
                      f"run over")
    if not moved:
        return None, None
    return (f"checkpoint {'; '.join(moved)} (kept on disk); resuming from step {intact}, the newest intact "
            f"checkpoint ({VERIFY_COMMAND} {directory.parent} lists them all)"), None


def _aside_name(directory: Path, step: int, state: str) -> Path:
    target, n = directory / f"{step}.{state}", 1
    while target.exists():
        target, n = directory / f"{step}.{state}.{n}", n + 1
    return target


def check_intact(root: Path, items: Optional[tuple] = None) -> Verdict:
    """Verify a checkpoint (a step directory or an export) before reading it; CheckpointDamagedError naming it
    and the damage otherwise."""
    verdict = verify(root, items)
    if not verdict.intact:
        run = root.parent.parent if root.parent.name == CHECKPOINTS else root
        raise CheckpointDamagedError(f"checkpoint {root} is {verdict.state}: {verdict.reason()}; "
                                     f"{VERIFY_COMMAND} {run} lists the intact ones")
    return verdict


def refuse_links(directory: Path) -> None:
    """Checkpoints are written, renamed and deleted only inside the run directory: a symbolic link as the
    checkpoints directory or in it would send writes, restores or deletions elsewhere."""
    links = [directory] if directory.is_symlink() else \
        [p for p in directory.iterdir() if p.is_symlink()] if directory.is_dir() else []
    if links:
        raise ConfigError(f"{links[0]} is a symbolic link (to {os.readlink(links[0])}); checkpoints are only "
                          f"written inside the run directory. Remove the link, or give the directory it points "
                          f"to as the run directory (--out)")


def remove_interrupted_saves(directory: Path) -> None:
    """Delete the temporary directories of saves that never finished (a crash or kill mid-save). Done here,
    synchronously on process 0, rather than with Orbax's background clean-up that nothing waits for."""
    if jax.process_index() != 0 or not directory.is_dir():
        return
    for leftover in directory.glob(f"*{TMP_MARKER}*"):
        shutil.rmtree(leftover, ignore_errors=True)


# ----------------------------------------------------------------------------------------------
# Models for other tools: load from a run, a step or an export; write an export
# ----------------------------------------------------------------------------------------------

def abstract_target(config: ModelConfig, shardings: Optional[dict] = None) -> dict:
    """ShapeDtypeStructs of ``config``'s parameters, placed by ``shardings`` (default: the first device)."""
    from jax_controlllm.model.params import abstract_params

    shapes = abstract_params(config)
    if shardings is None:
        device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
        shardings = jax.tree.map(lambda _: device, shapes)
    return jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh), shapes, shardings)


def _restore_params(directory: Path, config: ModelConfig, shardings: Optional[dict], as_numpy: bool) -> dict:
    if as_numpy:
        from jax_controlllm.model.params import abstract_params

        shapes = abstract_params(config)
        restore_args = jax.tree.map(lambda s: ocp.RestoreArgs(restore_type=np.ndarray, dtype=s.dtype), shapes)
        with ocp.PyTreeCheckpointer() as ckptr:
            return ckptr.restore(directory, args=ocp.args.PyTreeRestore(shapes, restore_args=restore_args))
    with ocp.StandardCheckpointer() as ckptr:
        return ckptr.restore(directory, abstract_target(config, shardings))


def resolve_model_dir(path: str | Path) -> tuple[Path, Path]:
    """(params directory, model config file or item directory) for a run dir, step dir or export."""
    p = Path(path).absolute()
    if (p / "model_config.json").is_file() and (p / "params").is_dir():
        return p / "params", p / "model_config.json"
    if (p / "params").is_dir() and (p / "model_config").is_dir():
        return p / "params", p / "model_config" / "metadata"
    root = p / CHECKPOINTS if (p / CHECKPOINTS).is_dir() else p
    steps = sealed_steps(root)
    if steps:
        return resolve_model_dir(root / str(steps[-1]))
    if steps_on_disk(root) or set_aside_dirs(root):
        raise CheckpointDamagedError(f"{root}: no complete checkpoint (none with its {MANIFEST}); "
                                     f"{VERIFY_COMMAND} {root.parent if root != p else p} says why")
    raise ConfigError(f"{p}: not a checkpoint; expected a run directory (with {CHECKPOINTS}/<step>/), a step "
                      f"directory (with params/ and model_config/) or an export (model_config.json + params/)")


def load_model(path: str | Path, shardings: Optional[dict] = None, as_numpy: bool = False
               ) -> tuple[ModelConfig, dict]:
    """(ModelConfig, params) from a run directory (its latest step), a step directory or an export.

    Params land on ``shardings`` (a tree of NamedSharding, e.g. ``sharding.param_shardings``), on the first
    device by default, or in host memory as numpy arrays with ``as_numpy=True``."""
    params_dir, config_file = resolve_model_dir(path)
    if config_file.name != "model_config.json":                     # a training checkpoint: always sealed
        check_intact(params_dir.parent, MODEL_ITEMS)
    elif (params_dir.parent / MANIFEST).is_file():                   # an export (older ones have no manifest)
        check_intact(params_dir.parent, ("params",))
    config = model_config_from_json(json.loads(config_file.read_text()), str(config_file))
    return config, _restore_params(params_dir, config, shardings, as_numpy)


def save_model(config: ModelConfig, params: dict, path: str | Path, overwrite: bool = False) -> Path:
    """Write a standalone export: params (Orbax) + model_config.json. Loadable with ``load_model``."""
    out = Path(path).absolute()
    if out.exists():
        if not overwrite:
            raise FileExistsError(f"{out} already exists; remove it or pass overwrite=True")
        if jax.process_index() == 0:
            shutil.rmtree(out)
        if jax.process_count() > 1:
            from jax.experimental import multihost_utils
            multihost_utils.sync_global_devices("save_model: old export removed")
    with ocp.StandardCheckpointer() as ckptr:
        ckptr.save(out / "params", params)
        ckptr.wait_until_finished()
    if jax.process_index() == 0:
        write_manifest(out)
        # Written last: an export without model_config.json is incomplete and is not recognised.
        tmp = out / "model_config.json.tmp"
        tmp.write_text(json.dumps(model_config_to_json(config), indent=2) + "\n")
        tmp.rename(out / "model_config.json")
    return out
