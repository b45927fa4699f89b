"""TPU tooling that runs without a TPU: the ahead-of-time memory check (needs libtpu) and the pod scripts."""
import importlib.util
import subprocess
import sys

import pytest
from test_train_helpers import REPO, subprocess_env

from launch.tpu.pod import main as pod_main

RECIPE = REPO / "configs" / "llama3.1_8b_openmath2_concat16_dlerp.yaml"


@pytest.mark.slow
@pytest.mark.skipif(importlib.util.find_spec("libtpu") is None,
                    reason="needs libtpu for the TPU compiler: pip install \"jax[tpu]==<installed jax version>\"")
def test_aot_memory_report_for_the_8b_recipe_on_v5e_4x8():
    """Compiles the real train step of the 8B recipe for 32 v5e chips on this CPU machine. To keep the test to
    a few minutes the context is 1024 tokens (the full 8192 compiles in ~8 min; docs/training.md has its report)."""
    args = ["--config", str(RECIPE), "--aot-topology", "v5e:4x8", "--set", "train.seq_len=1024",
            "--set", "train.grad_accum=1", "--set", "train.batch_size=4"]
    result = subprocess.run([sys.executable, "-m", "launch.train", *args], cwd=REPO, env=subprocess_env(),
                            capture_output=True, text=True, timeout=1800)
    assert result.returncode == 0, result.stderr[-4000:]
    report = result.stdout
    assert "AOT compile of the train step for v5e:4x8 (32 devices, mesh fsdp=4 x tensor=8)" in report
    assert "3.490B trainable, 8.030B frozen" in report
    for line in ("arguments", "outputs", "temporaries", "peak", "HBM per device"):
        assert line in report
    assert "FITS" in report


def test_aot_without_libtpu_is_a_clear_error(monkeypatch, capsys):
    if importlib.util.find_spec("libtpu") is not None:
        pytest.skip("libtpu is installed")
    from launch.train import main
    assert main(["--config", str(RECIPE), "--aot-topology", "v5e:4x8"]) == 1
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("error: --aot-topology v5e:4x8: cannot describe this TPU topology")
    assert 'pip install "jax[tpu]==' in err


def test_pod_scripts_print_the_gcloud_commands(capsys):
    common = ["--name", "cllm", "--zone", "us-west4-a", "--dry-run"]
    assert pod_main(["create", *common, "--type", "v4-32", "--spot"]) == 0
    assert pod_main(["train", *common, "--", "--config", "configs/x.yaml", "--mesh", "4x8"]) == 0
    assert pod_main(["delete", *common]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[0] == ("gcloud compute tpus tpu-vm create cllm --zone=us-west4-a --accelerator-type=v4-32 "
                        "--version=tpu-ubuntu2204-base --spot")
    assert "--worker=all" in lines[1] and "python -m launch.train --distributed" in lines[1]
    assert "--config configs/x.yaml --mesh 4x8" in lines[1]
    assert lines[2] == "gcloud compute tpus tpu-vm delete cllm --zone=us-west4-a --quiet"


def test_pod_train_needs_train_arguments():
    result = subprocess.run([sys.executable, "-m", "launch.tpu.pod", "train", "--name", "x", "--zone", "z",
                             "--dry-run"], cwd=REPO, env=subprocess_env(), capture_output=True, text=True)
    assert result.returncode == 2 and "give the launch.train arguments after --" in result.stderr
