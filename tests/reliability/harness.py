"""Fault-injection harness (no tests here): tiny training runs in subprocesses, interrupted on purpose, and the
checks that the run directory stays sound. Used by the reliability tests and by ``bench/reliability.py``.

Every run is ``python -m launch.train`` on ``configs/tiny.yaml`` (fp32 on one CPU device, so a resumed run must
reproduce an uninterrupted one bit for bit). Runs share a persistent compilation cache, so only the first run of
a config compiles; the rest start in a few seconds.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import numpy as np

REPO = Path(__file__).resolve().parents[2]
TINY = REPO / "configs" / "tiny.yaml"
STEPS = 60
# Async checkpoints after every step: most moments of a run are then inside a save.
TRIAL_OVERRIDES = (f"train.steps={STEPS}", "train.save_every=1", "train.async_checkpoint=true",
                   "train.eval_every=0", "train.keep_last=3")
TMP_MARKER = ".orbax-checkpoint-tmp"
MANIFEST = "checksums.json"      # a step is complete once its checksum manifest is written (last)
EXIT_NONFINITE, EXIT_CHECKPOINT_FAILED, EXIT_PREEMPTED = 3, 74, 75

# launch.train, with torch hidden: tensorboardX imports torch when it is installed (a test-only dependency the
# library never uses), which would add ~3 s to every start.
TRAIN_WITHOUT_TORCH = ("import sys\nsys.modules['torch'] = None\nfrom launch.train import main\n"
                       "sys.exit(main())")


def subprocess_env(cache_dir: Path) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", "JAX_PLATFORMS")}
    env.update(PYTHONPATH=str(REPO) + os.pathsep + env.get("PYTHONPATH", ""), JAX_PLATFORMS="cpu",
               JAX_COMPILATION_CACHE_DIR=str(cache_dir), JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0")
    return env


def train_command(run_dir: Path, *overrides: str) -> list[str]:
    sets = [arg for item in (*TRIAL_OVERRIDES, *overrides) for arg in ("--set", item)]
    return [sys.executable, "-c", TRAIN_WITHOUT_TORCH, "--config", str(TINY), "--out", str(run_dir),
            "--no-progress", *sets]


# ----------------------------------------------------------------------------------------------
# One training process
# ----------------------------------------------------------------------------------------------

class Training:
    """A running ``launch.train`` process: its stderr is collected line by line as it comes."""

    def __init__(self, run_dir: Path, cache_dir: Path, *overrides: str, wrapper: tuple = ()):
        self.run_dir = Path(run_dir)
        self.metrics_at_start = metric_lines(self.run_dir)
        self.started = time.monotonic()
        self.process = subprocess.Popen([*wrapper, *train_command(self.run_dir, *overrides)], cwd=REPO,
                                        env=subprocess_env(cache_dir), stdout=subprocess.DEVNULL,
                                        stderr=subprocess.PIPE, text=True)
        self.lines: list[str] = []
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        for line in self.process.stderr:
            self.lines.append(line.rstrip("\n"))

    @property
    def stderr(self) -> str:
        return "\n".join(self.lines)

    def running(self) -> bool:
        return self.process.poll() is None

    def wait_until(self, condition, timeout: float = 300.0, poll: float = 0.005) -> bool:
        """Poll ``condition()`` while the process runs; False if it ended (or timed out) first."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if condition():
                return True
            if not self.running():
                return bool(condition())
            time.sleep(poll)
        raise TimeoutError(f"condition not met within {timeout} s; stderr:\n{self.stderr[-3000:]}")

    def new_metric_lines(self) -> int:
        return metric_lines(self.run_dir) - self.metrics_at_start

    def send(self, sig: int) -> float:
        """Send ``sig`` now; returns the time it was sent."""
        sent = time.monotonic()
        self.process.send_signal(sig)
        return sent

    def finish(self, timeout: float = 300.0) -> int:
        code = self.process.wait(timeout=timeout)
        self._reader.join(timeout=10)
        return code

    def start_step(self) -> Optional[int]:
        """The step this process resumed from (its first log line), None if it died before saying."""
        for line in self.lines:
            if "starting at step" in line:
                return int(line.rsplit("starting at step", 1)[1].split()[0])
        return None

    def logged_steps(self) -> list[int]:
        """Steps whose metrics this process wrote."""
        records = read_metrics(self.run_dir)[self.metrics_at_start:]
        return [r["step"] for r in records if "loss" in r]


def run_to_end(run_dir: Path, cache_dir: Path, *overrides: str, timeout: float = 600.0, wrapper: tuple = ()
               ) -> Training:
    training = Training(run_dir, cache_dir, *overrides, wrapper=wrapper)
    training.finish(timeout)
    return training


def file_size_limit(blocks: int) -> tuple:
    """A command prefix after which every write past ``blocks`` blocks (512 or 1024 bytes, per shell) of a file
    fails with EFBIG, "File too large": a real OS-level write failure inside Orbax's asynchronous save, with no
    root and no test hook. SIGXFSZ is ignored (inherited through exec) so that the write fails instead of the
    signal killing the process."""
    return ("sh", "-c", f"trap '' XFSZ; ulimit -f {int(blocks)}; exec \"$@\"", "sh")


# ----------------------------------------------------------------------------------------------
# The run directory: metrics and checkpoints
# ----------------------------------------------------------------------------------------------

def metric_lines(run_dir: Path) -> int:
    path = Path(run_dir) / "metrics.jsonl"
    return len(path.read_bytes().splitlines()) if path.exists() else 0


def read_metrics(run_dir: Path) -> list[dict]:
    """Every record, in order, duplicates included (a resumed run logs again the steps it redoes).
    Strict: a torn line (a record cut by a kill) fails here."""
    path = Path(run_dir) / "metrics.jsonl"
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def loss_records(run_dir: Path) -> list[tuple[int, float]]:
    return [(r["step"], r["loss"]) for r in read_metrics(run_dir) if "loss" in r]


def reference_losses(run_dir: Path) -> dict[int, float]:
    losses = dict(loss_records(run_dir))
    assert sorted(losses) == list(range(1, len(losses) + 1)), sorted(losses)
    return losses


def checkpoint_dir(run_dir: Path) -> Path:
    return Path(run_dir) / "checkpoints"


def complete_steps(run_dir: Path) -> list[int]:
    """Sealed step directories (what a resume may pick: Orbax only renames a save to ``<step>`` once it is
    whole, and the checksum manifest is written after that)."""
    root = checkpoint_dir(run_dir)
    if not root.is_dir():
        return []
    return sorted(int(p.name) for p in root.iterdir() if p.name.isascii() and p.name.isdigit()
                  and (p / MANIFEST).is_file())


def set_aside(run_dir: Path) -> list[str]:
    """Checkpoints that a start found damaged or incomplete and renamed out of the way."""
    root = checkpoint_dir(run_dir)
    return sorted(p.name for p in root.iterdir() if p.name.split(".")[0].isdigit() and "." in p.name
                  and TMP_MARKER not in p.name) if root.is_dir() else []


# ----------------------------------------------------------------------------------------------
# Damaged checkpoints: one file of a kind, flipped, truncated or deleted
# ----------------------------------------------------------------------------------------------

INTACT_STEP = 54                 # the stopped run's oldest checkpoint: the fault cases damage the newer ones
DAMAGED_STEPS = (57, 56, 55)     # flipped, truncated, deleted (FAULTS, in order)


def stopped_run(run_dir: Path, cache_dir: Path) -> Path:
    """A run stopped (SIGTERM) at step 57 with the checkpoints of steps 54 to 57: 54 steps without saves, then
    three with a save after each (keep_last 4)."""
    first = run_to_end(run_dir, cache_dir, "train.save_every=0", f"train.inject_sigterm_at_step={INTACT_STEP}")
    assert first.process.returncode == EXIT_PREEMPTED, first.stderr[-3000:]
    second = run_to_end(run_dir, cache_dir, "train.keep_last=4", f"train.inject_sigterm_at_step={DAMAGED_STEPS[0]}")
    assert second.process.returncode == EXIT_PREEMPTED, second.stderr[-3000:]
    # the changes of the second start are harmless ones: applied and listed in one line
    changes = [line for line in second.lines if line.startswith("resuming with changed ")]
    assert len(changes) == 1 and "train.save_every (0 -> 1)" in changes[0] and "train.keep_last (3 -> 4)" in \
        changes[0], second.stderr[-3000:]
    assert complete_steps(run_dir) == [INTACT_STEP, *sorted(DAMAGED_STEPS)]
    return run_dir


# ----------------------------------------------------------------------------------------------
# Damage
# ----------------------------------------------------------------------------------------------

FILE_KINDS = {   # kind of checkpoint file: how to find it in a step directory
    "parameters": lambda step_dir: largest(step_dir / "params"),
    "optimizer state": lambda step_dir: largest(step_dir / "opt_state"),
    "data state": lambda step_dir: step_dir / "data_state" / "process_0.json",
    "metadata": lambda step_dir: step_dir / "model_config" / "metadata",
}
FAULTS = ("flip", "truncate", "delete")


def largest(directory: Path) -> Path:
    """The largest file under ``directory``: array bytes, not Orbax's small index files."""
    return max((p for p in directory.rglob("*") if p.is_file()), key=lambda p: (p.stat().st_size, str(p)))


def damage(path: Path, fault: str) -> None:
    """Flip 8 bytes in the middle, cut the file to half its size, or delete it."""
    if fault == "delete":
        path.unlink()
        return
    data = bytearray(path.read_bytes())
    if fault == "truncate":
        path.write_bytes(bytes(data[:len(data) // 2]))
        return
    assert fault == "flip", fault
    middle = len(data) // 2
    data[middle:middle + 8] = bytes(b ^ 0xFF for b in data[middle:middle + 8])
    path.write_bytes(bytes(data))


def interrupted_saves(run_dir: Path) -> list[str]:
    root = checkpoint_dir(run_dir)
    return sorted(p.name for p in root.iterdir() if TMP_MARKER in p.name) if root.is_dir() else []


def newest_step(run_dir: Path) -> Optional[int]:
    steps = complete_steps(run_dir)
    return steps[-1] if steps else None


def check_checkpoint(run_dir: Path, step: int) -> dict:
    """Read checkpoint ``step`` back independently of the trainer: finite parameters of the recorded config and
    a data position that matches the step (the synthetic source consumes one batch per step)."""
    import jax

    from jax_controlllm.checkpoint import load_model

    step_dir = checkpoint_dir(run_dir) / str(step)
    config, params = load_model(step_dir, as_numpy=True)
    leaves = jax.tree.leaves(params)
    assert leaves and all(np.isfinite(x).all() for x in leaves), f"step {step}: non-finite parameters"
    data_state = json.loads((step_dir / "data_state" / "process_0.json").read_text())
    assert data_state == {"format": "synthetic/1", "batches": step}, (step, data_state)
    return params


def same_params(a: dict, b: dict) -> bool:
    import jax
    return jax.tree.structure(a) == jax.tree.structure(b) and all(
        np.array_equal(x, y) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))


def final_params(run_dir: Path) -> dict:
    from jax_controlllm.checkpoint import load_model
    return load_model(run_dir, as_numpy=True)[1]


# ----------------------------------------------------------------------------------------------
# Interrupted runs: one trial = one process, stopped at a chosen kind of moment
# ----------------------------------------------------------------------------------------------

KINDS = {
    # name: (signal, what the moment is)
    "kill9-training": (signal.SIGKILL, "a random moment after the first step of this start"),
    "kill9-mid-save": (signal.SIGKILL, "while a checkpoint is being written"),
    "kill9-startup": (signal.SIGKILL, "during start-up: clean-up, restore, compilation"),
    "sigterm-mid-save": (signal.SIGTERM, "while a checkpoint is being written"),
    "sigterm-mid-step": (signal.SIGTERM, "while a step runs (no periodic saves in flight)"),
}


@dataclass
class Trial:
    kind: str
    newest_before: Optional[int]          # newest complete checkpoint when the process started
    resumed_from: Optional[int] = None    # the step the process said it started at (None: killed before)
    exit_code: Optional[int] = None
    delay_s: float = 0.0                  # from the trigger (first step / save seen / start) to the signal
    interrupted_save: bool = False        # the signal left a half-written save behind (a tmp directory)
    last_logged: Optional[int] = None     # the last step this process logged
    newest_after: Optional[int] = None    # newest complete checkpoint after it ended
    exit_seconds: Optional[float] = None  # SIGTERM: from the signal to the exit
    stop_message: str = ""                # SIGTERM: the loop's last line
    notes: list[str] = field(default_factory=list)

    @property
    def redone_steps(self) -> int:
        """Steps this process computed that no checkpoint kept: the work a restart does again."""
        if self.last_logged is None:
            return 0
        return max(self.last_logged - (self.newest_after or 0), 0)


def run_trial(run_dir: Path, cache_dir: Path, kind: str, rng: np.random.Generator,
              startup_s: float = 6.0) -> Trial:
    """Start (or resume) the run, stop it per ``kind``, wait for the process to end and record what happened."""
    sig, _ = KINDS[kind]
    overrides = ("train.save_every=0",) if kind == "sigterm-mid-step" else ()
    trial = Trial(kind, newest_step(run_dir))
    training = Training(run_dir, cache_dir, *overrides)
    stepped = lambda: training.new_metric_lines() > 0  # noqa: E731
    if kind == "kill9-startup":
        trial.delay_s = float(rng.uniform(0.2, 0.9) * startup_s)
        deadline = time.monotonic() + trial.delay_s
        training.wait_until(lambda: stepped() or time.monotonic() >= deadline)
    elif kind.endswith("mid-save"):
        training.wait_until(stepped)
        training.wait_until(lambda: bool(interrupted_saves(run_dir)))
        trial.delay_s = float(rng.uniform(0.0, 0.05))
        time.sleep(trial.delay_s)
    else:   # steps take ~0.4 s with a save after each, ~15 ms without: a few steps in either case
        training.wait_until(stepped)
        trial.delay_s = float(rng.uniform(0.0, 0.1 if kind == "sigterm-mid-step" else 0.8))
        time.sleep(trial.delay_s)
    if not training.running():
        trial.notes.append("the process ended before the signal")
        sent = None
    else:
        sent = training.send(sig)
    trial.exit_code = training.finish()
    if sent is not None:
        trial.exit_seconds = time.monotonic() - sent
    trial.resumed_from = training.start_step()
    trial.interrupted_save = sig == signal.SIGKILL and bool(interrupted_saves(run_dir))
    logged = training.logged_steps()
    trial.last_logged = max(logged) if logged else None
    trial.newest_after = newest_step(run_dir)
    if sig == signal.SIGTERM and training.lines:
        trial.stop_message = training.lines[-1]
    return trial


def trial_kinds(counts: dict[str, int], rng: np.random.Generator) -> list[str]:
    kinds = [kind for kind, n in counts.items() for _ in range(n)]
    rng.shuffle(kinds)
    return kinds
