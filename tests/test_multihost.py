"""Two processes (jax.distributed on localhost, 4 CPU devices each) train like one process with 8 devices."""
import socket
import subprocess
import sys

import numpy as np
import pytest
from test_train_helpers import REPO, TINY, check, read_metrics, run_cli, subprocess_env, train_losses


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_two_processes_match_one_process_with_eight_devices(tmp_path):
    common = ["--config", str(TINY), "--mesh", "4x2", "--no-progress", "--steps", "4",
              "--set", "train.eval_every=0", "--set", "train.save_every=0", "--set", "train.async_checkpoint=true"]
    port = free_port()
    multi = tmp_path / "two_processes"
    procs = [subprocess.Popen([sys.executable, "-m", "launch.train", *common, "--cpu-devices", "4", "--out", str(multi),
                               "--coordinator", f"localhost:{port}", "--num-processes", "2",
                               "--process-id", str(i)], cwd=REPO, env=subprocess_env(),
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for i in range(2)]
    outputs = [p.communicate(timeout=900) for p in procs]
    for p, (out, err) in zip(procs, outputs):
        assert p.returncode == 0, f"process exit {p.returncode}\n{err[-5000:]}"
    single = tmp_path / "one_process"
    check(run_cli([*common, "--cpu-devices", "8", "--out", str(single)]))

    two, one = train_losses(multi), train_losses(single)
    assert sorted(two) == sorted(one) == list(range(1, 5))
    np.testing.assert_allclose([two[s] for s in range(1, 5)], [one[s] for s in range(1, 5)], rtol=1e-6)
    # only process 0 logs: one record per step, and only its stderr has the progress messages
    assert [r["step"] for r in read_metrics(multi) if "loss" in r] == list(range(1, 5))
    assert "finished 4 steps" in outputs[0][1] and "finished 4 steps" not in outputs[1][1]
    # every process saved its own data position with the checkpoint
    step_dir = multi / "checkpoints" / "4" / "data_state"
    assert sorted(p.name for p in step_dir.glob("*.json")) == ["process_0.json", "process_1.json"]
