"""Sharded training: state and optimizer, the jitted step, the loop, checkpoints and the AOT memory check.

    from jax_controlllm.config import load_config
    from jax_controlllm.sharding import make_mesh
    from jax_controlllm.train import build_trainer, create_run_dir, train_loop

    run = load_config("configs/tiny.yaml")
    mesh = make_mesh(run.mesh.shape, run.mesh.axes)
    trainer = build_trainer(run, mesh)               # weights in their shards + compiled step
    result = train_loop(trainer, "runs/tiny", create_run_dir("runs/tiny", run))

``python -m launch.train`` also holds the run directory's lock (``hold_run_dir``) and, on a resume, reports the
checkpoints set aside and checks the config against the run's record (``resume_report``).
"""
from jax_controlllm.train.aot import MemoryReport, aot_memory_report
from jax_controlllm.train.data import SyntheticTokens, check_data_config, make_iterator
from jax_controlllm.train.distributed import initialize_distributed
from jax_controlllm.train.loop import (
                                       EXIT_BAD_INPUT,
                                       EXIT_CHECKPOINT_FAILED,
                                       EXIT_NONFINITE,
                                       EXIT_OK,
                                       EXIT_PREEMPTED,
                                       LoopResult,
                                       say,
                                       train_loop,
)
from jax_controlllm.train.rundir import create_run_dir, hold_run_dir, open_checkpoints, resume_report
from jax_controlllm.train.setup import Trainer, build_trainer, plan_step, trained_model_config
from jax_controlllm.train.state import TrainState, combine, make_optimizer, partition
from jax_controlllm.train.step import BATCH_KEYS, TrainShardings

__all__ = ["build_trainer", "Trainer", "plan_step", "trained_model_config", "train_loop", "LoopResult", "say",
           "create_run_dir", "open_checkpoints", "hold_run_dir", "resume_report", "aot_memory_report",
           "MemoryReport", "initialize_distributed",
           "SyntheticTokens", "make_iterator", "check_data_config", "TrainState", "TrainShardings", "partition",
           "combine", "make_optimizer", "BATCH_KEYS", "EXIT_OK", "EXIT_BAD_INPUT", "EXIT_NONFINITE",
           "EXIT_PREEMPTED", "EXIT_CHECKPOINT_FAILED"]
