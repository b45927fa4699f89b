"""Helpers for the training tests (no tests here): tiny run configs and CLI runs in subprocesses.

Tests that need several devices run ``python -m launch.train --cpu-devices N`` in a subprocess: XLA reads the
device count once, when JAX starts, and the pytest process already started JAX with one device. Subprocesses
share a persistent compilation cache, so repeated runs of one config compile once.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
TINY = REPO / "configs" / "tiny.yaml"


def tiny_run_config(*overrides: str):
    from jax_controlllm.config import load_config
    return load_config(TINY, list(overrides))


def subprocess_env(cache_dir: Path | None = None, devices: int | None = None) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", "JAX_PLATFORMS")}
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    env["JAX_PLATFORMS"] = "cpu"
    if devices:
        env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={devices}"
    if cache_dir is not None:
        env["JAX_COMPILATION_CACHE_DIR"] = str(cache_dir)
        env["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0"
    return env


def run_cli(args: list[str], cache_dir: Path | None = None, timeout: int = 600) -> subprocess.CompletedProcess:
    """``python -m launch.train ARGS`` (add --cpu-devices N for a mesh); never raises on a non-zero status."""
    return subprocess.run([sys.executable, "-m", "launch.train", "--no-progress", *args], cwd=REPO,
                          env=subprocess_env(cache_dir), capture_output=True, text=True, timeout=timeout)


def run_python(code: str, devices: int, cache_dir: Path | None = None, timeout: int = 600
               ) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], cwd=REPO, env=subprocess_env(cache_dir, devices),
                          capture_output=True, text=True, timeout=timeout)


def read_metrics(run_dir: Path) -> list[dict]:
    lines = (Path(run_dir) / "metrics.jsonl").read_text().splitlines()
    return [json.loads(line) for line in lines if line.strip()]


def train_losses(run_dir: Path) -> dict[int, float]:
    """step -> loss of the training records (eval records carry eval_* keys only)."""
    return {r["step"]: r["loss"] for r in read_metrics(run_dir) if "loss" in r}


def check(result: subprocess.CompletedProcess, expect: int = 0) -> subprocess.CompletedProcess:
    assert result.returncode == expect, (f"exit {result.returncode} (expected {expect})\n"
                                         f"stdout:\n{result.stdout[-3000:]}\nstderr:\n{result.stderr[-6000:]}")
    return result


def paths(tree) -> list[tuple[str, ...]]:
    """Key paths of a nested dict's leaves (independent of how the model groups blocks into segments)."""
    import jax
    return [tuple(k.key for k in path) for path, _ in jax.tree_util.tree_flatten_with_path(tree)[0]]


def find_leaf(tree, *suffix: str):
    """The first leaf whose key path ends with ``suffix``."""
    import jax
    for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
        if tuple(k.key for k in path)[-len(suffix):] == suffix:
            return leaf
    raise KeyError(suffix)
