"""A checkpoint that cannot be written (disk full, a write error mid-save): the run stops with exit 74 and one
readable line naming the step, the cause and the intact checkpoints; those checkpoints are untouched, and once
the cause is gone the same command resumes from them and reproduces the uninterrupted run bit for bit."""
import hashlib
import shlex
import shutil
import subprocess
from pathlib import Path

import jax.numpy as jnp
import pytest
from harness import (
    EXIT_CHECKPOINT_FAILED,
    EXIT_PREEMPTED,
    REPO,
    STEPS,
    check_checkpoint,
    complete_steps,
    file_size_limit,
    interrupted_saves,
    loss_records,
    run_to_end,
    subprocess_env,
    train_command,
)

from jax_controlllm.checkpoint import CheckpointWriteError, RunCheckpoints
from jax_controlllm.config import ModelConfig


def tree_digest(directory: Path) -> str:
    """Names and bytes of every file under ``directory``."""
    digest = hashlib.sha256()
    for path in sorted(p for p in directory.rglob("*") if p.is_file()):
        digest.update(str(path.relative_to(directory)).encode() + b"\0" + path.read_bytes())
    return digest.hexdigest()


@pytest.mark.slow
def test_a_write_error_in_an_async_save_stops_the_run_with_one_line(tmp_path, cache_dir, reference):
    run_dir = tmp_path / "run"
    first = run_to_end(run_dir, cache_dir, "train.inject_sigterm_at_step=3")
    assert first.process.returncode == EXIT_PREEMPTED and complete_steps(run_dir) == [1, 2, 3], first.stderr
    before = {step: tree_digest(run_dir / "checkpoints" / str(step)) for step in (1, 2, 3)}

    # Every write past 100 blocks (50-100 kB) of a file now fails with EFBIG: the next save (step 4) breaks
    # inside Orbax's background commit, as when a disk fills up mid-save.
    failed = run_to_end(run_dir, cache_dir, wrapper=file_size_limit(100))
    assert failed.process.returncode == EXIT_CHECKPOINT_FAILED, failed.stderr[-3000:]
    reason = (f"checkpoint step 4 could not be written in {run_dir / 'checkpoints'}: File too large (errno 27). "
              f"Checkpoints intact: 1, 2, 3. Free space (or fix the cause) and rerun the same command to resume "
              f"from step 3")
    # Orbax and tensorstore print their own reports of the failed writes, from background threads, around it
    # (counted in the text: a background thread's unterminated output may still share its line)
    assert failed.stderr.count(reason) == 1, failed.stderr[-3000:]
    own_frames = [f'File "{REPO / package}' for package in ("jax_controlllm", "launch")]
    assert not any(frame in failed.stderr for frame in own_frames)   # no traceback through the run's own code
    assert complete_steps(run_dir) == [1, 2, 3] and interrupted_saves(run_dir)   # step 4: half-written, ignored
    assert {step: tree_digest(run_dir / "checkpoints" / str(step)) for step in (1, 2, 3)} == before
    records = len(loss_records(run_dir))

    finish = run_to_end(run_dir, cache_dir, "train.save_every=0")
    assert finish.process.returncode == 0 and finish.start_step() == 3, finish.stderr[-3000:]
    assert not interrupted_saves(run_dir)
    assert loss_records(run_dir)[records:] == [(s, reference["losses"][s]) for s in range(4, STEPS + 1)]


def mount_namespace_available(where: Path) -> bool:
    """Whether this machine lets us mount a tmpfs in a private user + mount namespace (no root needed where
    unprivileged user namespaces are allowed)."""
    if shutil.which("unshare") is None:
        return False
    where.mkdir(exist_ok=True)
    probe = ["unshare", "--user", "--map-root-user", "--mount", "sh", "-c",
             f"mount -t tmpfs -o size=1m tmpfs {shlex.quote(str(where))}"]
    return subprocess.run(probe, capture_output=True).returncode == 0


# Inside the namespace: a 6 MiB tmpfs holds three checkpoints of the tiny model; the fourth does not fit.
# Then "free space" (grow the filesystem) and rerun the same command. The run directory is copied out after each
# start, since the tmpfs vanishes with the namespace.
SMALL_DISK_SCRIPT = """
mount -t tmpfs -o size=6m tmpfs {mnt} || exit 97
{first} > {out}/first.log 2>&1; echo $? > {out}/first.rc
cp -a {mnt}/run {out}/after_failure
mount -o remount,size=256m {mnt}
{second} > {out}/second.log 2>&1; echo $? > {out}/second.rc
cp -a {mnt}/run {out}/final
"""


@pytest.mark.slow
def test_a_full_disk_stops_the_run_before_the_save_that_cannot_fit(tmp_path, cache_dir, reference):
    mnt, out = tmp_path / "mnt", tmp_path / "out"
    if not mount_namespace_available(mnt):
        pytest.skip("cannot mount a tmpfs here (no user namespaces); the write-error test covers the fallback")
    out.mkdir()
    run_dir = mnt / "run"
    script = SMALL_DISK_SCRIPT.format(mnt=shlex.quote(str(mnt)), out=shlex.quote(str(out)),
                                      first=shlex.join(train_command(run_dir)),
                                      second=shlex.join(train_command(run_dir, "train.save_every=0")))
    result = subprocess.run(["unshare", "--user", "--map-root-user", "--mount", "sh", "-c", script],
                            env=subprocess_env(cache_dir), capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr
    first_log = (out / "first.log").read_text().strip().splitlines()
    assert int((out / "first.rc").read_text()) == EXIT_CHECKPOINT_FAILED, first_log
    assert len(first_log) == 2, first_log      # the start-up line and the reason: nothing else, no traceback
    failed = out / "after_failure"
    kept = complete_steps(failed)
    assert kept and kept == list(range(1, len(kept) + 1)), kept
    assert first_log[-1].startswith(f"checkpoint step {kept[-1] + 1} could not be written in {run_dir / 'checkpoints'}"
                                    f": not enough free space")
    assert first_log[-1].endswith(f"Checkpoints intact: {', '.join(map(str, kept))}. Free space (or fix the "
                                  f"cause) and rerun the same command to resume from step {kept[-1]}")
    assert not interrupted_saves(failed)       # refused before writing anything
    for step in kept:
        check_checkpoint(failed, step)

    assert int((out / "second.rc").read_text()) == 0, (out / "second.log").read_text()
    second_log = (out / "second.log").read_text()
    assert f"starting at step {kept[-1]}" in second_log
    records = loss_records(out / "final")
    done_before = len(loss_records(failed))
    assert records[:done_before] == [(s, reference["losses"][s]) for s in range(1, done_before + 1)]
    assert records[done_before:] == [(s, reference["losses"][s]) for s in range(kept[-1] + 1, STEPS + 1)]


def test_the_free_space_check_refuses_a_save_before_writing(tmp_path, monkeypatch):
    """In-process, with the filesystem's answer replaced: 1 MiB free."""
    import os

    from jax_controlllm import checkpoint

    real = os.statvfs(tmp_path)
    fake = os.statvfs_result((real.f_bsize, 4096, real.f_blocks, 256, 256, real.f_files, real.f_ffree,
                              real.f_favail, real.f_flag, real.f_namemax))
    checkpoints = RunCheckpoints(tmp_path, async_save=False)
    tree = {"w": jnp.zeros((1024, 1024))}                 # 4 MiB
    monkeypatch.setattr(checkpoint.os, "statvfs", lambda path: fake)
    with pytest.raises(CheckpointWriteError, match=r"checkpoint step 1 could not be written in .*: not enough "
                                                   r"free space \(9\.4 MiB and 256 inodes needed, 1\.0 MiB"):
        checkpoints.save(1, tree, tree, ModelConfig(), {})
    assert list((tmp_path / "checkpoints").iterdir()) == []
    monkeypatch.undo()
    checkpoints.save(1, tree, tree, ModelConfig(), {})
    checkpoints.close()
    assert complete_steps(tmp_path) == [1]
