"""Checkpoints (Orbax): training checkpoints of a run directory, and standalone model exports.

Run directory layout::

    RUN/checkpoints/<step>/params/        full parameter tree (trainable fp32 + frozen), Orbax PyTree
                          /opt_state/     optax state of the trainable leaves
                          /model_config/  the ModelConfig, expansion included (JSON, file "metadata")
                          /data_state/    the data iterator state, one process_<i>.json per process

A step directory appears only when every item is written: Orbax writes into
``<step>.orbax-checkpoint-tmp-*`` and renames it at the end, so a crash mid-save leaves nothing that
``latest_step`` (and so a resume) would pick. Restores go through abstract targets (ShapeDtypeStruct with
shardings), so a checkpoint written on one mesh loads onto any other.

Standalone export (``save_model``)::

    EXPORT/model_config.json   the full ModelConfig (expansion included)
    EXPORT/params/             Orbax PyTree of the parameters
"""
from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path
from typing import Any, Optional

import jax
import numpy as np
import orbax.checkpoint as ocp
from orbax.checkpoint.checkpoint_managers import preservation_policy as keep

from jax_controlllm.config import ConfigError, ModelConfig, from_dict

CHECKPOINTS = "checkpoints"
ITEMS = ("params", "opt_state", "model_config", "data_state")
TMP_MARKER = ".orbax-checkpoint-tmp"      # Orbax's name for a step directory still being written


# ----------------------------------------------------------------------------------------------
# Model configs as JSON
# ----------------------------------------------------------------------------------------------

def model_config_to_json(config: ModelConfig) -> dict:
    return dataclasses.asdict(config)


def model_config_from_json(data: dict, where: str = "model_config") -> ModelConfig:
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
    """Orbax CheckpointManager over ``run_dir/checkpoints``: async saves, keep the last ``keep_last``
    plus every ``keep_every``-th step; leftovers of interrupted saves are removed on start."""

    def __init__(self, run_dir: str | Path, keep_last: int = 3, keep_every: int = 0, async_save: bool = True,
                 read_only: bool = False):
        self.directory = Path(run_dir).absolute() / CHECKPOINTS
        if not read_only:
            remove_interrupted_saves(self.directory)
        policies = [keep.LatestN(max(keep_last, 1))]
        if keep_every > 0:
            policies.append(keep.EveryNSteps(keep_every))
        options = ocp.CheckpointManagerOptions(
            preservation_policy=keep.AnyPreservationPolicy(policies), enable_async_checkpointing=async_save,
            read_only=read_only, create=not read_only)
        self.manager = ocp.CheckpointManager(self.directory, options=options)

    def latest_step(self) -> Optional[int]:
        return self.manager.latest_step()

    def all_steps(self) -> list[int]:
        return list(self.manager.all_steps())

    def save(self, step: int, params: dict, opt_state, model_config: ModelConfig, data_state: dict) -> None:
        """Start saving (asynchronously when enabled); the arrays may be donated right after this returns."""
        args = ocp.args.Composite(params=ocp.args.StandardSave(params), opt_state=ocp.args.StandardSave(opt_state),
                                  model_config=ocp.args.JsonSave(model_config_to_json(model_config)),
                                  data_state=DataStateSave(data_state))
        self.manager.save(step, args=args, force=True)

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
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.wait_until_finished()
        self.manager.close()


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
    steps = sorted(int(c.name) for c in root.iterdir() if c.is_dir() and c.name.isdigit()) if root.is_dir() else []
    if steps:
        return resolve_model_dir(root / str(steps[-1]))
    raise ConfigError(f"{p}: not a checkpoint; expected a run directory (with {CHECKPOINTS}/<step>/), a step "
                      f"directory (with params/ and model_config/) or an export (model_config.json + params/)")


def load_model(path: str | Path, shardings: Optional[dict] = None, as_numpy: bool = False
               ) -> tuple[ModelConfig, dict]:
    """(ModelConfig, params) from a run directory (its latest step), a step directory or an export.

    Params land on ``shardings`` (a tree of NamedSharding, e.g. ``sharding.param_shardings``), on the first
    device by default, or in host memory as numpy arrays with ``as_numpy=True``."""
    params_dir, config_file = resolve_model_dir(path)
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
        # Written last: an export without model_config.json is incomplete and is not recognised.
        tmp = out / "model_config.json.tmp"
        tmp.write_text(json.dumps(model_config_to_json(config), indent=2) + "\n")
        tmp.rename(out / "model_config.json")
    return out
