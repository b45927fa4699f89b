"""The benchmarks' CPU smoke runs: the same code paths as the GPU measurements, tiny shapes, no timing checks."""
import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_train_step_benchmark_smoke(tmp_path):
    record = tmp_path / "rows.json"
    proc = subprocess.run([sys.executable, "bench/train_step.py", "--preset", "smoke", "--steps", "2", "--warmup",
                           "1", "--batch", "2", "--record", str(record)], cwd=ROOT, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    row = json.loads(proc.stdout.strip().splitlines()[-1])
    assert row["tokens_per_s"] > 0 and row["flops_per_token"] > 0 and len(row["step_s_all"]) == 2
    assert row["loss_first_last"][0] > 0 and "versions" in row and row["ratio_vs_peer_best"] > 0
    assert json.loads(record.read_text())[0]["preset"] == "smoke"


def test_flops_per_token_matches_the_peer_estimate():
    """W1's required work is about 43 GFLOP per token by the peer's count (peer_controlllm_h100.json)."""
    sys.path.insert(0, str(ROOT / "bench"))
    import train_step
    from jax_controlllm.config import ExpansionConfig, ModelConfig
    from jax_controlllm.model.control import expanded_config
    from jax_controlllm.train.metrics import flops_per_token

    preset = train_step.PRESETS["w1"]
    config = expanded_config(ModelConfig(**preset["model"]), ExpansionConfig(**preset["expansion"]))
    assert 40e9 < flops_per_token(config, 4096) < 46e9
