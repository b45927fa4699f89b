"""What checkpoint checksums cost: candidate checksums' speed, and the manifest's share of save and restore time.

    python bench/checkpoint_integrity.py [--configs tiny default] [--repeats 3] \
        [--out bench/results/checkpoint_integrity_cpu.json]

1. Checksum speed over 256 MiB of random bytes in memory: zlib's CRC-32 (standard library), CRC32C
   (google-crc32c, if installed) and xxh3-64 / xxh64 (xxhash).
2. For each config (``tiny``: configs/tiny.yaml; ``default``: configs/default.yaml, SmolLM2-135M-Instruct with 4
   controlled layers, read from the bundled GGUF): the trainer's state is built as ``launch.train`` builds it and
   saved as a training checkpoint (synchronously, parameters + optimizer state + config + data position), then
   restored onto the same shardings. Times: the save without the manifest (Orbax), writing the manifest (hashing
   every file), the restore (Orbax), and verifying the checkpoint against its manifest (wall time, and the CPU
   time of the thread doing it: on a shared machine the wall time of a few-millisecond job is mostly waiting for a
   core); the file set is also hashed with each candidate checksum. Medians of ``--repeats``. The files are read
   back from the page cache (they were just written): the cost on a cold disk is the read itself, which Orbax's
   restore then skips.

Prints JSON and writes it to --out with the command, machine and versions.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
import zlib
from pathlib import Path

import jax
import xxhash
from host import cpu_model  # bench/host.py, beside this script

from jax_controlllm.checkpoint import RunCheckpoints
from jax_controlllm.checksums import CHUNK, files_under, verify, write_manifest
from jax_controlllm.config import load_config
from jax_controlllm.model.params import abstract_params
from jax_controlllm.sharding import make_mesh
from jax_controlllm.train import build_trainer, combine, partition

REPO = Path(__file__).resolve().parents[1]
CONFIGS = {"tiny": REPO / "configs" / "tiny.yaml", "default": REPO / "configs" / "default.yaml"}


def algorithms() -> list[str]:
    """The candidate checksums installed here (CRC32C needs google-crc32c, which is not a dependency)."""
    try:
        import google_crc32c  # noqa: F401
        crc32c = ["crc32c"]
    except ImportError:
        crc32c = []
    return ["zlib.crc32", *crc32c, "xxh64", "xxh3_64"]


def in_memory_speed(repeats: int) -> dict:
    data = os.urandom(256 << 20)
    functions = {"zlib.crc32": zlib.crc32, "xxh64": xxhash.xxh64_intdigest, "xxh3_64": xxhash.xxh3_64_intdigest}
    try:
        import google_crc32c
        functions["crc32c"] = google_crc32c.value
    except ImportError:
        pass
    out = {}
    for name, fn in functions.items():
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            fn(data)
            times.append(time.perf_counter() - start)
        out[name] = round(len(data) / min(times) / 1e9, 2)
    return {"bytes": len(data), "gb_per_s": out}


class Crc:
    """A CRC (zlib's CRC-32 or CRC32C) behind xxhash's incremental interface."""

    def __init__(self, extend):
        self.value, self.extend = 0, extend

    def update(self, data: bytes) -> None:
        self.value = self.extend(self.value, data)


def hasher(name: str):
    if name == "xxh3_64":
        return xxhash.xxh3_64()
    if name == "xxh64":
        return xxhash.xxh64()
    if name == "crc32c":
        import google_crc32c
        return Crc(google_crc32c.extend)
    return Crc(lambda value, data: zlib.crc32(data, value))


def hash_files(directory: Path, name: str) -> float:
    """Seconds to read and hash every file of ``directory`` with checksum ``name`` (the same reads for all)."""
    start = time.perf_counter()
    for rel in files_under(directory):
        digest = hasher(name)
        with open(directory / rel, "rb", buffering=0) as handle:
            while chunk := handle.read(CHUNK):
                digest.update(chunk)
    return time.perf_counter() - start


def with_shardings(shapes, shardings):
    return jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh), shapes, shardings)


def measure_config(name: str, work: Path, repeats: int) -> dict:
    run = load_config(CONFIGS[name], ["train.async_checkpoint=false"])
    mesh = make_mesh(run.mesh.shape, run.mesh.axes)
    trainer = build_trainer(run, mesh)
    params = combine(trainer.state.trainable, trainer.frozen)
    plan = trainer.plan
    params_target = with_shardings(abstract_params(trainer.model_config), plan.shardings.params)
    trainable_abstract, _ = partition(abstract_params(trainer.model_config), plan.mask)
    opt_target = with_shardings(jax.eval_shape(plan.tx.init, trainable_abstract), plan.shardings.state.opt_state)
    rows = []
    for repeat in range(repeats):
        run_dir = work / f"{name}-{repeat}"
        checkpoints = RunCheckpoints(run_dir, keep_last=10, async_save=False)
        step_dir = checkpoints.directory / "1"
        start = time.perf_counter()
        checkpoints.save(1, params, trainer.state.opt_state, trainer.model_config, {"batches": 1})
        save_with_manifest = time.perf_counter() - start
        manifest_file = step_dir / "checksums.json"
        manifest_file.unlink()
        start, cpu = time.perf_counter(), time.thread_time()
        write_manifest(step_dir)
        manifest, manifest_cpu = time.perf_counter() - start, time.thread_time() - cpu
        start, cpu = time.perf_counter(), time.thread_time()
        verdict = verify(step_dir)
        verify_s, verify_cpu = time.perf_counter() - start, time.thread_time() - cpu
        assert verdict.intact, verdict
        start = time.perf_counter()
        restored = checkpoints.restore(1, params_target, opt_target)
        jax.block_until_ready((restored.params, restored.opt_state))
        restore = time.perf_counter() - start
        checkpoints.close()
        row = {"save_s": save_with_manifest - manifest, "manifest_s": manifest, "manifest_cpu_s": manifest_cpu,
               "restore_s": restore, "verify_s": verify_s, "verify_cpu_s": verify_cpu, "files": verdict.files,
               "bytes": verdict.bytes}
        row.update({f"hash_{algo}_s": hash_files(step_dir, algo) for algo in algorithms()})
        rows.append(row)
        print(f"{name} #{repeat}: {json.dumps({k: round(v, 3) for k, v in row.items()})}", file=sys.stderr)
        del restored
    median = {key: statistics.median(r[key] for r in rows) for key in rows[0]}
    return {
        "config": str(CONFIGS[name].relative_to(REPO)), "checkpoint_mib": round(median["bytes"] / 2**20, 1),
        "files": int(median["files"]),
        "median_s": {k: round(v, 4) for k, v in median.items() if k.endswith("_s")},
        "manifest_cost_on_save": round(median["manifest_s"] / median["save_s"], 4),
        "verify_cost_on_restore": round(median["verify_s"] / median["restore_s"], 4),
        # the same with the manifest's own CPU time (one thread): what it costs without other jobs' preemptions
        "manifest_cpu_cost_on_save": round(median["manifest_cpu_s"] / median["save_s"], 4),
        "verify_cpu_cost_on_restore": round(median["verify_cpu_s"] / median["restore_s"], 4),
        "cost_by_checksum": {algo: {"on_save": round(median[f"hash_{algo}_s"] / median["save_s"], 4),
                                    "on_restore": round(median[f"hash_{algo}_s"] / median["restore_s"], 4)}
                             for algo in algorithms()},
        "runs": rows,
    }


def versions() -> dict:
    from importlib.metadata import PackageNotFoundError, version
    out = {"python": platform.python_version()}
    for name in ("jax", "orbax-checkpoint", "tensorstore", "xxhash", "google-crc32c"):
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            out[name] = None
    out["jax_controlllm_commit"] = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, check=False,
                                                  capture_output=True, text=True).stdout.strip()
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--configs", nargs="+", default=list(CONFIGS), choices=list(CONFIGS))
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--out", default=str(REPO / "bench" / "results" / "checkpoint_integrity_cpu.json"))
    args = p.parse_args(argv)
    report = {"benchmark": "checkpoint_integrity",
              "command": "python bench/checkpoint_integrity.py " + " ".join(sys.argv[1:] if argv is None else argv),
              "machine": {"cpu": cpu_model(), "cores": len(os.sched_getaffinity(0)), "platform": platform.platform(),
                          "load_average_1m": os.getloadavg()[0], "device": str(jax.devices()[0].platform)},
              "versions": versions(), "checksum_in_memory": in_memory_speed(args.repeats), "configs": {}}
    with tempfile.TemporaryDirectory(prefix="integrity-") as tmp:
        for name in args.configs:
            report["configs"][name] = measure_config(name, Path(tmp), args.repeats)
    summary = {k: v for k, v in report.items() if k != "configs"}
    summary["configs"] = {n: {k: v for k, v in c.items() if k != "runs"} for n, c in report["configs"].items()}
    print(json.dumps(summary, indent=2))
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
