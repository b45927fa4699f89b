"""Cloud TPU pod helpers: create a TPU VM slice, copy this checkout and install it on every worker, run the
training on all workers at once, stream the logs, delete the slice. Every command can be printed instead of
run (``--dry-run``).

    python -m launch.tpu.pod create --name cllm --zone us-west4-a --type v5litepod-32
    python -m launch.tpu.pod setup  --name cllm --zone us-west4-a
    python -m launch.tpu.pod train  --name cllm --zone us-west4-a -- --config configs/X.yaml --mesh 4x8
    python -m launch.tpu.pod logs   --name cllm --zone us-west4-a
    python -m launch.tpu.pod delete --name cllm --zone us-west4-a

Each worker runs ``python -m launch.train --distributed ...``: JAX finds the other workers itself on Cloud TPU.
The run directory should be on storage all workers share (e.g. a gs:// bucket mounted with gcsfuse, or
a Filestore); checkpoints are written by all workers, metrics by worker 0.
"""
from __future__ import annotations

import argparse
import shlex
import subprocess
import sys

# Default TPU VM software for each accelerator family (see the Cloud TPU docs for newer images).
RUNTIME_VERSIONS = {"v4": "tpu-ubuntu2204-base", "v5litepod": "v2-alpha-tpuv5-lite", "v5p": "v2-alpha-tpuv5",
                    "v6e": "v2-alpha-tpuv6e"}
REMOTE_DIR = "jax_controlllm"
LOG_FILE = "train.log"


def _flags(args) -> list[str]:
    return [f"--zone={args.zone}"] + ([f"--project={args.project}"] if args.project else [])


def _tpu(args, *words: str) -> list[str]:
    return ["gcloud", "compute", "tpus", "tpu-vm", *words, args.name, *_flags(args)]


def _on_workers(args, command: str, worker: str = "all") -> list[str]:
    return _tpu(args, "ssh") + [f"--worker={worker}", f"--command={command}"]


def create_commands(args) -> list[list[str]]:
    family = args.type.split("-")[0]
    version = args.version or RUNTIME_VERSIONS.get(family)
    if version is None:
        raise SystemExit(f"error: no default runtime version for {args.type!r}; pass --version")
    cmd = _tpu(args, "create") + [f"--accelerator-type={args.type}", f"--version={version}"]
    if args.spot:
        cmd.append("--spot")
    return [cmd]


def setup_commands(args) -> list[list[str]]:
    """Copy this checkout (without runs/ and caches) to every worker and install it with the TPU extra."""
    archive = "/tmp/jax_controlllm.tar.gz"
    pack = ["tar", "czf", archive, "--exclude=./runs", "--exclude=./.venv", "--exclude=./.git",
            "--exclude=__pycache__", "."]
    copy = ["gcloud", "compute", "tpus", "tpu-vm", "scp", archive, f"{args.name}:/tmp/", *_flags(args),
            "--worker=all"]
    install = (f"mkdir -p ~/{REMOTE_DIR} && tar xzf {archive} -C ~/{REMOTE_DIR} && cd ~/{REMOTE_DIR} && "
               f"pip install -q -e '.[tpu]'")
    return [pack, copy, _on_workers(args, install)]


def train_commands(args) -> list[list[str]]:
    """Start training on all workers in the background (survives the ssh session); output to train.log."""
    train_args = " ".join(shlex.quote(a) for a in args.train_args)
    command = (f"cd ~/{REMOTE_DIR} && nohup python -m launch.train --distributed --no-progress {train_args} "
               f"> ~/{LOG_FILE} 2>&1 &")
    return [_on_workers(args, command)]


def logs_commands(args) -> list[list[str]]:
    return [_on_workers(args, f"tail -n 200 -F ~/{LOG_FILE}", worker=str(args.worker))]


def delete_commands(args) -> list[list[str]]:
    return [_tpu(args, "delete") + ["--quiet"]]


COMMANDS = {"create": create_commands, "setup": setup_commands, "train": train_commands, "logs": logs_commands,
            "delete": delete_commands}


def parse_args(argv=None) -> argparse.Namespace:
    argv = list(sys.argv[1:] if argv is None else argv)
    train_args = argv[argv.index("--") + 1:] if "--" in argv else []
    argv = argv[:argv.index("--")] if "--" in argv else argv
    p = argparse.ArgumentParser(prog="python -m launch.tpu.pod", description=__doc__.splitlines()[0],
                                epilog="train: arguments after -- go to launch.train on every worker")
    p.add_argument("action", choices=sorted(COMMANDS))
    p.add_argument("--name", required=True, help="TPU VM name")
    p.add_argument("--zone", required=True, help="e.g. us-west4-a")
    p.add_argument("--project", help="Google Cloud project (default: gcloud's)")
    p.add_argument("--type", default="v5litepod-32", help="accelerator type (create), e.g. v5litepod-32, v4-32")
    p.add_argument("--version", help="TPU VM runtime version (create); default by accelerator family")
    p.add_argument("--spot", action="store_true", help="spot capacity (create): cheaper, may be preempted")
    p.add_argument("--worker", default=0, type=int, help="worker whose log to stream (logs)")
    p.add_argument("--dry-run", action="store_true", help="print the commands instead of running them")
    args = p.parse_args(argv)
    args.train_args = train_args
    if args.action == "train" and not train_args:
        p.error("train: give the launch.train arguments after --, e.g. -- --config configs/X.yaml --mesh 4x8")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    for cmd in COMMANDS[args.action](args):
        print(shlex.join(cmd), flush=True)
        if not args.dry_run:
            status = subprocess.call(cmd)
            if status:
                return status
    return 0


if __name__ == "__main__":
    sys.exit(main())
