"""``python -m launch.train``: bad input, mesh invariance, preemption and exact resume."""
import json

import numpy as np
import pytest
from test_train_helpers import TINY, check, read_metrics, run_cli, train_losses

from launch.train import main

# ----------------------------------------------------------------------------------------------
# Bad input: one line naming the problem and the fix, no traceback, no run directory
# ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("args, problem, fix", [
    (["--mesh", "4x8"], "mesh '4x8' needs 32 devices but 1 are available", "--cpu-devices 32"),
    (["--set", "train.lrr=1e-3"], "unknown config key 'train.lrr'", "did you mean 'lr'"),
    (["--set", "base.path=/no/such/model"], "base.path: /no/such/model does not exist", "give a Hugging Face"),
    (["--set", "expansion.num_exp_layers=3"], "expansion.num_exp_layers", "expansion.layers"),
    (["--set", "data.sorce=synthetic"], "unknown config key 'data.sorce'", "valid keys: source"),
])
def test_bad_input_is_one_line_without_a_run_directory(args, problem, fix, tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["--config", str(TINY), "--out", str(out), "--no-progress", *args]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("error: ") and problem in err[-1] and fix in err[-1], err
    assert "Traceback" not in "\n".join(err)
    assert not out.exists()


def test_batch_that_does_not_divide_over_the_data_axes(tmp_path):
    """In a subprocess: 4 simulated devices, batch 6 cannot be split 4 ways."""
    out = tmp_path / "run"
    result = run_cli(["--config", str(TINY), "--out", str(out), "--cpu-devices", "4", "--mesh", "4",
                      "--set", "train.batch_size=6", "--set", "train.grad_accum=1"])
    check(result, expect=1)
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("error: train.batch_size: 6 sequences") and "4 data-parallel devices" in last
    assert "multiple of 4" in last
    assert "Traceback" not in result.stderr and not out.exists()


# ----------------------------------------------------------------------------------------------
# Full runs (subprocesses)
# ----------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("jax_cache")


@pytest.fixture(scope="module")
def run_4x8(tmp_path_factory, cache_dir):
    """The tiny config on 32 simulated devices (also used by test_checkpoint's resharding test)."""
    out = tmp_path_factory.mktemp("run_4x8")
    check(run_cli(["--config", str(TINY), "--out", str(out), "--cpu-devices", "32", "--mesh", "4x8"], cache_dir))
    return out


# One device, checkpoints only at the end (through the async path): the reference of the two tests below.
SINGLE = ["--config", str(TINY), "--mesh", "1x1", "--set", "train.save_every=0", "--set", "train.async_checkpoint=true"]


@pytest.fixture(scope="module")
def run_1x1(tmp_path_factory, cache_dir):
    out = tmp_path_factory.mktemp("run_1x1")
    check(run_cli([*SINGLE, "--out", str(out)], cache_dir))
    return out


@pytest.mark.slow
def test_4x8_mesh_gives_the_losses_of_one_device(run_4x8, run_1x1):
    single = run_1x1
    sharded, reference = train_losses(run_4x8), train_losses(single)
    assert sorted(reference) == list(range(1, 11)) and sorted(sharded) == sorted(reference)
    np.testing.assert_allclose([sharded[s] for s in range(1, 11)], [reference[s] for s in range(1, 11)], rtol=1e-5)
    evals = [{r["step"]: r["eval_loss"] for r in read_metrics(d) if "eval_loss" in r} for d in (run_4x8, single)]
    assert sorted(evals[0]) == [5, 10]
    np.testing.assert_allclose([evals[0][s] for s in (5, 10)], [evals[1][s] for s in (5, 10)], rtol=1e-5)
    # the run directory: resolved config, metrics with the promised keys, TensorBoard events, checkpoints
    record = read_metrics(run_4x8)[0]
    assert {"step", "loss", "ce", "divergence", "grad_norm", "lr", "merge_weight_per_layer"} <= set(record)
    assert "shape: 4x8" in (run_4x8 / "config.yaml").read_text()
    assert any((run_4x8 / "tensorboard").glob("events.out.tfevents.*"))
    assert sorted(p.name for p in (run_4x8 / "checkpoints").iterdir() if p.name.isdigit()) == ["10", "5"]


@pytest.mark.slow
def test_sigterm_then_resume_matches_an_uninterrupted_run_bit_for_bit(run_1x1, tmp_path, cache_dir):
    stopped = tmp_path / "stopped"
    preempt = [*SINGLE, "--out", str(stopped), "--set", "train.inject_sigterm_at_step=5"]
    first = check(run_cli(preempt, cache_dir), expect=75)
    assert "SIGTERM after step 5: checkpoint saved" in first.stderr
    assert sorted(train_losses(stopped)) == [1, 2, 3, 4, 5]
    assert sorted(p.name for p in (stopped / "checkpoints").iterdir()) == ["5"]
    data_state = json.loads((stopped / "checkpoints" / "5" / "data_state" / "process_0.json").read_text())
    assert data_state == {"format": "synthetic/1", "batches": 5}
    second = check(run_cli(preempt, cache_dir))      # the same command resumes
    assert "from checkpoint step 5" in second.stderr
    resumed, reference = train_losses(stopped), train_losses(run_1x1)
    assert sorted(resumed) == list(range(1, 11))
    assert [resumed[s] for s in range(1, 11)] == [reference[s] for s in range(1, 11)]  # exact
    evals = [[r["eval_loss"] for r in read_metrics(d) if "eval_loss" in r] for d in (run_1x1, stopped)]
    assert evals[0] == evals[1] and len(evals[0]) == 2


def test_mesh_flags_become_config_overrides():
    from jax_controlllm.config import load_config
    from launch.train import overrides_from, parse_args
    args = parse_args(["--config", str(TINY), "--mesh", "1x1x1", "--mesh-axes", "data,fsdp,tensor",
                       "--steps", "7", "--set", "train.lr=0.5"])
    run = load_config(args.config, overrides_from(args))
    assert run.mesh.shape == "1x1x1" and run.mesh.axes == ("data", "fsdp", "tensor")
    assert run.train.steps == 7 and run.train.lr == 0.5


@pytest.mark.slow
def test_resume_with_the_data_pipeline_continues_the_token_stream(tmp_path, cache_dir):
    """Real data (JSONL + a tokenizer): the pipeline's state travels with the checkpoint."""
    from jax_controlllm.data.testing import build_tiny_tokenizer
    tokenizer = build_tiny_tokenizer(tmp_path / "tokenizer")
    corpus = tmp_path / "corpus.jsonl"
    corpus.write_text("".join(json.dumps({"text": f"Document {i}: the quick brown fox number {i * 7} jumps."}) + "\n"
                              for i in range(120)))
    common = ["--config", str(TINY), "--steps", "4", "--set", "model.vocab_size=512",
              "--set", f"data={{sources: [{corpus}], tokenizer: {tokenizer}}}",
              "--set", "train.eval_every=0", "--set", "train.save_every=0"]
    straight, stopped = tmp_path / "straight", tmp_path / "stopped"
    check(run_cli([*common, "--out", str(straight)], cache_dir))
    preempt = [*common, "--out", str(stopped), "--set", "train.inject_sigterm_at_step=2"]
    check(run_cli(preempt, cache_dir), expect=75)
    saved = json.loads((stopped / "checkpoints" / "2" / "data_state" / "process_0.json").read_text())
    assert saved["batches"] == 2 and saved["format"] == "jax_controlllm.data/1"
    check(run_cli(preempt, cache_dir))
    resumed, reference = train_losses(stopped), train_losses(straight)
    assert [resumed[s] for s in range(1, 5)] == [reference[s] for s in range(1, 5)]


def test_sigterm_during_start_up_exits_75_without_a_traceback(tmp_path):
    """A preemption while the run starts (imports, weight loading, compilation) is "rerun to resume" (75),
    like one during training, not a bare -15."""
    import os
    import signal
    import subprocess
    import sys
    import time

    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    proc = subprocess.Popen([sys.executable, "-m", "launch.train", "--config", str(TINY), "--out", str(tmp_path / "r"),
                             "--no-progress"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    time.sleep(1.5)  # inside main(): importing JAX and building the trainer take longer than this
    proc.send_signal(signal.SIGTERM)
    _, stderr = proc.communicate(timeout=300)
    assert proc.returncode == 75, stderr[-2000:]
    assert "Traceback" not in stderr
    assert "SIGTERM" in stderr.strip().splitlines()[-1]


def test_launcher_exit_status_constant_matches_the_library():
    import launch.train
    from jax_controlllm.train import EXIT_PREEMPTED
    assert launch.train.EXIT_PREEMPTED == EXIT_PREEMPTED
