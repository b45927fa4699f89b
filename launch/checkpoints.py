"""Check a run's checkpoints against their checksums: ``python -m launch.checkpoints verify RUN_DIR``.

Lists every checkpoint of the run (``RUN_DIR/checkpoints/<step>``, and those set aside as ``<step>.damaged`` or
``<step>.incomplete``), one line each: intact, or damaged / incomplete and why. Exit status 0 when every
checkpoint is intact, 2 when one is not, 1 for a path that is not a run directory.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from jax_controlllm.checkpoint import CHECKPOINTS, set_aside_dirs, steps_on_disk
from jax_controlllm.checksums import verify

EXIT_ALL_INTACT, EXIT_BAD_INPUT, EXIT_NOT_ALL_INTACT = 0, 1, 2


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m launch.checkpoints", description=__doc__.splitlines()[0])
    commands = p.add_subparsers(dest="command", required=True)
    verify = commands.add_parser("verify", help="list each checkpoint of a run as intact or damaged")
    verify.add_argument("run_dir", help="run directory (the --out of python -m launch.train)")
    return p.parse_args(argv)


def verify_run(run_dir: Path) -> int:
    root = run_dir / CHECKPOINTS
    if not root.is_dir():
        print(f"error: {run_dir} has no {CHECKPOINTS}/ directory; give the --out of a training run",
              file=sys.stderr)
        return EXIT_BAD_INPUT
    entries = [root / str(step) for step in steps_on_disk(root)] + set_aside_dirs(root)
    entries.sort(key=lambda p: (int(p.name.split(".")[0]), p.name))
    all_intact = True
    for path in entries:
        verdict = verify(path)
        all_intact &= verdict.intact
        detail = f"{verdict.files} files, {verdict.bytes / 2**20:.1f} MiB" if verdict.intact else verdict.reason()
        print(f"{path.name:<16} {verdict.state:<10} {detail}")
    if not entries:
        print(f"{root}: no checkpoints")
    return EXIT_ALL_INTACT if all_intact else EXIT_NOT_ALL_INTACT


def main(argv=None) -> int:
    args = parse_args(argv)
    return verify_run(Path(args.run_dir))


if __name__ == "__main__":
    sys.exit(main())
