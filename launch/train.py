"""Train a model: ``python -m launch.train --config configs/tiny.yaml --mesh 4x8 --set train.lr=1e-4``.

config -> mesh -> weights + step -> loop. Everything happens in the library (``jax_controlllm.train``),
so the same run can be driven from Python. Exit statuses: see ``jax_controlllm/train/loop.py``
(0 done, 1 bad input, 3 non-finite loss, 75 preempted: rerun to resume).
"""
from __future__ import annotations

import argparse
import os
import signal
import sys
import threading
from pathlib import Path

DEFAULT_CONFIG = Path(__file__).resolve().parents[1] / "configs" / "default.yaml"


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m launch.train", description=__doc__.splitlines()[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--config", default=str(DEFAULT_CONFIG), help="YAML run config")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config value, e.g. --set train.lr=1e-4 (repeatable)")
    p.add_argument("--out", help="run directory (checkpoints, metrics.jsonl, tensorboard/, config.yaml); "
                                 "default: the config's out_dir, else runs/<config name>")
    p.add_argument("--steps", type=int, help="number of training steps (train.steps)")
    p.add_argument("--mesh", help="device mesh, e.g. 4x8, 2x2x8 or -1x8 (mesh.shape)")
    p.add_argument("--mesh-axes", help="mesh axis names, e.g. data,fsdp,tensor (mesh.axes)")
    p.add_argument("--cpu-devices", type=int, help="simulate N CPU devices (sets XLA_FLAGS before JAX starts)")
    p.add_argument("--aot-topology", help="compile the step for a TPU topology (e.g. v5e:4x8), print the "
                                          "per-device memory report and exit (needs libtpu)")
    p.add_argument("--coordinator", help="multi-process: coordinator host:port")
    p.add_argument("--num-processes", type=int, help="multi-process: number of processes")
    p.add_argument("--process-id", type=int, help="multi-process: this process's index")
    p.add_argument("--distributed", action="store_true",
                   help="multi-process with the cluster's auto-detection (Cloud TPU pods, SLURM)")
    p.add_argument("--allow-change", action="append", default=[], metavar="KEY",
                   help="resume although KEY (e.g. train.lr, or a section: data) differs from the run's "
                        "config.yaml (repeatable); model, expansion and tokenizer changes need a new --out")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    return p.parse_args(argv)


def overrides_from(args: argparse.Namespace) -> list[str]:
    out = list(args.overrides)
    if args.mesh:
        out.append(f"mesh.shape={args.mesh}")
    if args.mesh_axes:
        out.append(f"mesh.axes=[{args.mesh_axes}]")
    if args.steps is not None:
        out.append(f"train.steps={args.steps}")
    return out


EXIT_PREEMPTED = 75  # = jax_controlllm.train.EXIT_PREEMPTED, without importing JAX here


def _exit_outside_loop(signum, frame):
    """SIGTERM while the training loop is not running (start-up, e.g. a preemption while weights load or the
    step compiles, or the final report): nothing is lost, so leave at once with the loop's "rerun to resume"
    status. Leaving from the handler itself, not by raising: an exception raised from a signal handler can land
    inside JAX's or XLA's own callbacks (which swallow it) or their half-initialised state."""
    os.write(2, f"stopped by {signal.Signals(signum).name} outside the training loop; checkpoints on disk are "
                f"intact: rerun the same command\n".encode())
    os._exit(EXIT_PREEMPTED)


def main(argv=None) -> int:
    args = parse_args(argv)
    # Until the loop installs its own handlers (which checkpoint and exit 75), and again after it restores
    # this one, a SIGTERM ends the run with the same status instead of a bare -15.
    in_main_thread = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGTERM, _exit_outside_loop) if in_main_thread else None
    try:
        return _main(args)
    finally:
        if in_main_thread:
            signal.signal(signal.SIGTERM, previous)


def _main(args: argparse.Namespace) -> int:
    if args.cpu_devices:  # before JAX is imported: the flag is read once, at backend start
        os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                                   f" --xla_force_host_platform_device_count={args.cpu_devices}").strip()
    import jax

    from jax_controlllm.circuits.layer_choice import resolve_auto_layers
    from jax_controlllm.config import load_config
    from jax_controlllm.experiment import acquisition_retention_report, prepare_knowledge
    from jax_controlllm.sharding import make_mesh
    from jax_controlllm.train import (
        EXIT_BAD_INPUT,
        aot_memory_report,
        build_trainer,
        check_data_config,
        create_run_dir,
        hold_run_dir,
        initialize_distributed,
        open_checkpoints,
        resume_report,
        say,
        train_loop,
    )
    from jax_controlllm.train.errors import USER_ERRORS

    try:
        initialize_distributed(args.coordinator, args.num_processes, args.process_id, auto=args.distributed)
        run = load_config(args.config, overrides_from(args))
        if args.aot_topology:
            print(aot_memory_report(run, args.aot_topology))
            return 0
        run_dir = Path(args.out or run.out_dir or Path("runs") / Path(args.config).stem)
        with hold_run_dir(run_dir, say):                        # one trainer per run directory
            run, _ = prepare_knowledge(run, run_dir)            # the generated corpus, if the config asks
            run = resolve_auto_layers(run, run_dir)             # expansion.layers: auto, once per run
            check_data_config(run)
            mesh = make_mesh(run.mesh.shape, run.mesh.axes)
            checkpoints = open_checkpoints(run_dir, run)        # None for a new run; damaged steps set aside
            for line in resume_report(checkpoints, run_dir, run, tuple(args.allow_change)):
                say(line)
            trainer = build_trainer(run, mesh, checkpoints)     # weights in their shards + compiled step
            checkpoints = checkpoints or create_run_dir(run_dir, run)
            result = train_loop(trainer, run_dir, checkpoints, progress=not args.no_progress)
            if result.exit_code == 0 and jax.process_index() == 0:
                acquisition_retention_report(run, run_dir, progress=not args.no_progress)   # if the config asks
    except USER_ERRORS as err:
        print(f"error: {err}", file=sys.stderr)
        return EXIT_BAD_INPUT
    return result.exit_code


if __name__ == "__main__":
    sys.exit(main())
