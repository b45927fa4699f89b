"""The benchmarks' CPU smoke runs: the same code paths as the GPU measurements, tiny shapes, no timing checks."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

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
    from jax_controlllm.model.expand import expanded_config
    from jax_controlllm.train.metrics import flops_per_token

    preset = train_step.PRESETS["w1"]
    config = expanded_config(ModelConfig(**preset["model"]), ExpansionConfig(**preset["expansion"]))
    assert 40e9 < flops_per_token(config, 4096) < 46e9


def test_lm_head_backward_stays_in_compute_dtype():
    """In bfloat16 every matmul of the LM-head loss and its gradient takes bfloat16 operands (no float32/TF32
    matmul over the vocabulary); the gradients themselves are checked in the test below."""
    import jax
    import jax.numpy as jnp
    import numpy as np

    from jax_controlllm.config import ModelConfig
    from jax_controlllm.losses import cross_entropy_sum

    config = ModelConfig(vocab_size=40, hidden_size=16, intermediate_size=16, num_hidden_layers=1,
                         num_attention_heads=2, loss_chunk=2, train_embeddings=True)
    rng = np.random.default_rng(0)
    params = {"embed_tokens": {"embedding": jnp.asarray(rng.normal(size=(40, 16)), jnp.bfloat16)},
              "lm_head": {"kernel": jnp.asarray(rng.normal(size=(16, 40)), jnp.bfloat16)}}
    h = jnp.asarray(rng.normal(size=(2, 5, 16)), jnp.bfloat16)
    labels = jnp.asarray(rng.integers(0, 40, size=(2, 5)))

    def loss(h, params):
        return cross_entropy_sum(config, params, h, labels)[0]

    def dots(jaxpr):
        for eqn in jaxpr.eqns:
            if eqn.primitive.name == "dot_general":
                yield eqn
            for sub in jax.core.jaxprs_in_params(eqn.params):
                yield from dots(sub)

    found = list(dots(jax.make_jaxpr(jax.grad(loss, argnums=(0, 1)))(h, params).jaxpr))
    assert len(found) >= 3  # logits, d/dh and d/dW
    assert all(v.aval.dtype == jnp.bfloat16 for e in found for v in e.invars)


@pytest.mark.parametrize("chunk", [0, 7, 16])
@pytest.mark.parametrize("tied", [False, True])
def test_fused_lm_head_loss_equals_autodiff(chunk, tied):
    """The chunked LM head + cross-entropy with its fused backward gives the loss and the gradients (w.r.t.
    the hidden states and, when differentiated, the head) of plain autodiff through full logits."""


    import jax
    import jax.numpy as jnp
    import numpy as np

    from jax_controlllm.config import ModelConfig
    from jax_controlllm.losses import IGNORE, cross_entropy_sum, next_token_targets

    config = ModelConfig(vocab_size=50, hidden_size=12, intermediate_size=16, num_hidden_layers=1,
                         num_attention_heads=2, tie_word_embeddings=tied, loss_chunk=chunk)
    rng = np.random.default_rng(0)
    params = {"embed_tokens": {"embedding": jnp.asarray(rng.normal(size=(50, 12)), jnp.float32)}}
    if not tied:
        params["lm_head"] = {"kernel": jnp.asarray(rng.normal(size=(12, 50)), jnp.float32)}
    h = jnp.asarray(rng.normal(size=(2, 21, 12)), jnp.float32)
    labels = rng.integers(0, 50, size=(2, 21))
    labels[0, 3:6] = IGNORE
    segments = np.ones((2, 21), np.int32)
    segments[1, 10:] = 2

    def ours(h, params):
        return cross_entropy_sum(config, params, h, jnp.asarray(labels), jnp.asarray(segments))[0]

    def reference(h, params):
        kernel = params["embed_tokens"]["embedding"].T if tied else params["lm_head"]["kernel"]
        logits = jnp.einsum("bsh,hv->bsv", h[:, :-1], kernel)
        targets, valid = next_token_targets(jnp.asarray(labels), jnp.asarray(segments))
        nll = -jnp.take_along_axis(jax.nn.log_softmax(logits), targets[..., None], -1)[..., 0]
        return jnp.sum(nll * valid)

    np.testing.assert_allclose(ours(h, params), reference(h, params), rtol=1e-5)
    got = jax.grad(ours, argnums=(0, 1))(h, params)
    want = jax.grad(reference, argnums=(0, 1))(h, params)
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
    # only the hidden states differentiated (a frozen head, as in Control LLM): same d/dh
    np.testing.assert_allclose(jax.grad(ours)(h, params), want[0], rtol=1e-5, atol=1e-6)



FRONTIER_BASE = """
base: {{path: {base}, format: hf}}
model: {{param_dtype: float32, frozen_dtype: float32, compute_dtype: float32}}
expansion: {{expand_type: concat, num_exp_layers: 1, layers: [1], merge_method: dlerp}}
knowledge: {{n_new: 4, attributes: [city], max_frequency: 2, seed: 0}}
report: {{retention_probes: false, kl_text: false, export_hf: false}}
train: {{mode: controlllm, steps: 4, batch_size: 2, seq_len: 32, lr: 1.0e-3, warmup_steps: 1, log_every: 1,
        async_checkpoint: false}}
data: {{holdout_fraction: 0.0}}
"""


@pytest.mark.slow
def test_retention_frontier_smoke(tmp_path):
    """bench/retention.py --frontier end to end on a tiny random Llama (word tokenizer over the same corpus):
    every method's checkpoints are scored, the summary names each method, and the plot is written."""
    import jax

    from jax_controlllm import knowledge as kn
    from jax_controlllm.config import ModelConfig
    from jax_controlllm.convert import save_hf
    from jax_controlllm.model import init_params

    corpus = kn.build_knowledge_dataset(tmp_path / "vocab", kn.CorpusConfig(kn.EntityConfig(
        n_new=4, n_revised=0, attributes=("city",), max_frequency=2, seed=0), seed=0))
    tokenizer = kn.build_word_tokenizer([r["text"] for r in kn.read_jsonl(corpus["corpus"])])
    config = ModelConfig(vocab_size=tokenizer.get_vocab_size(), hidden_size=32, intermediate_size=64,
                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                         max_position_embeddings=64, bos_token_id=kn.BOS_ID, pad_token_id=0)
    base = tmp_path / "base"
    save_hf(config, init_params(config, jax.random.PRNGKey(0)), base)
    kn.save_word_tokenizer(tokenizer, base)
    (tmp_path / "base.yaml").write_text(FRONTIER_BASE.format(base=base))
    (tmp_path / "frontier.yaml").write_text(
        f"base: {tmp_path / 'base.yaml'}\nmethods:\n  full: [train.mode=full, expansion=null]\n  dlerp: []\n")
    record, png = tmp_path / "frontier.json", tmp_path / "frontier.png"
    out = subprocess.run([sys.executable, "bench/retention.py", "--config", str(tmp_path / "frontier.yaml"),
                          "--out", str(tmp_path / "runs"), "--frontier", "--every", "2", "--patience", "5",
                          "--record", str(record), "--plot", str(png)],
                         cwd=ROOT, capture_output=True, text=True, timeout=600,
                         env={**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONPATH": str(ROOT)})
    assert out.returncode == 0, out.stderr[-3000:]
    result = json.loads(record.read_text())
    steps = {(p["method"], p["step"]) for p in result["points"]}
    assert steps == {("full", 2), ("full", 4), ("dlerp", 2), ("dlerp", 4)}
    assert result["summary"]["full"]["family"] == "full" and result["summary"]["dlerp"]["family"] == "controlllm"
    assert result["summary"]["controlllm"] is None        # no retention measured, so no point qualifies
    assert png.is_file()
    # --report-run: a run's own final report.json (python -m launch.train with a report section) as a point
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONPATH": str(ROOT)}
    run_dir = tmp_path / "reported"
    trained = subprocess.run([sys.executable, "-m", "launch.train", "--config", str(tmp_path / "base.yaml"), "--out",
                              str(run_dir), "--no-progress"], cwd=ROOT, capture_output=True, text=True, env=env,
                             timeout=600)
    assert trained.returncode == 0, trained.stderr[-3000:]
    out = subprocess.run([sys.executable, "bench/retention.py", "--config", str(tmp_path / "frontier.yaml"),
                          "--frontier", "--methods", "--report-run", str(run_dir), "--record", str(record)],
                         cwd=ROOT, capture_output=True, text=True, timeout=600, env=env)
    assert out.returncode == 0, out.stderr[-3000:]
    (point,) = json.loads(record.read_text())["points"]
    report = json.loads((run_dir / "report.json").read_text())
    assert (point["method"], point["step"], point["family"]) == ("reported", 4, "controlllm")
    assert point["acquisition_exact_match"] == report["acquisition"]["trained"]["exact_match"]
    assert point["acquisition_hit10"] == report["acquisition"]["trained"]["hit@10"]
    assert point["settings"]["distill_weight"] == 0.0 and point["settings"]["expansion"]["layers"] == [1]


# The GPU sweep (bench/gpu_sweep.py) and the release's W1 harness (bench/peer_w1.py): their CPU side.

def bench_module(name):
    sys.path.insert(0, str(ROOT / "bench"))
    return __import__(name)


@pytest.mark.parametrize("preset", ["w1", "smoke"])
def test_peer_harness_expands_the_layers_we_expand(preset):
    """The expanded config the release is given controls the same layers as our expansion of the same preset
    (W1: 3, 7, ..., 31), so both sides time the same model."""
    from jax_controlllm.config import ExpansionConfig, ModelConfig
    from jax_controlllm.model.expand import expanded_config
    from jax_controlllm.model.layout import controlled_indices

    peer_w1, train_step = bench_module("peer_w1"), bench_module("train_step")
    spec = train_step.PRESETS[preset]
    expansion = peer_w1.expansion_config(spec, Path("/base"))
    n = spec["model"]["num_hidden_layers"]
    ours = controlled_indices(expanded_config(ModelConfig(**spec["model"]), ExpansionConfig(**spec["expansion"])))
    assert [i for i in range(n) if i not in expansion["freezed_layers"]] == ours
    if preset == "w1":
        assert ours == list(range(3, 32, 4))
        assert (expansion["merge_method"], expansion["interpolation_loss_type"]) == ("dlerp", "mse")


def test_peer_harness_refuses_a_checkout_that_is_not_the_release(tmp_path):
    peer_w1 = bench_module("peer_w1")
    with pytest.raises(SystemExit, match="--checkout .*no src/controlllm/utils/model_expander.py"):
        peer_w1.release_expander(tmp_path)
    expander = tmp_path / "src" / "controlllm" / "utils" / "model_expander.py"
    expander.parent.mkdir(parents=True)
    expander.write_text("# edited\n")
    with pytest.raises(SystemExit, match="--checkout .*model_expander.py differs from linkedin/ControlLLM@7657b9f"):
        peer_w1.release_expander(tmp_path)


def test_sweep_keeps_the_pinned_wheels_to_the_peer_processes(tmp_path):
    gpu_sweep = bench_module("gpu_sweep")
    args = type("Args", (), {"peer_site": tmp_path / "site", "ours_site": tmp_path / "ours"})()
    items = {item["name"]: item for item in gpu_sweep.ITEMS}
    assert gpu_sweep.child_env(items["peer-best"], args)["PYTHONPATH"] == str(tmp_path / "site")
    ours = gpu_sweep.child_env(items["ours-best"], args)["PYTHONPATH"].split(":")
    assert ours[:2] == [str(ROOT), str(tmp_path / "ours")] and str(tmp_path / "site") not in ours


def test_sweep_rows_carry_mfu_and_same_run_ratios():
    gpu_sweep = bench_module("gpu_sweep")
    args = type("Args", (), {"run_id": "r2"})()
    items = {item["name"]: item for item in gpu_sweep.ITEMS}
    fpt = 43e9
    rows = [{"name": "peer-best", "role": "peer", "run_id": "r1", "tokens_per_s": 1000.0},  # another run
            gpu_sweep.annotate({"tokens_per_s": 12000.0, "device": "NVIDIA H200"}, items["peer-best"],
                               ["python3", "bench/peer_w1.py"], args, fpt),
            gpu_sweep.annotate({"tokens_per_s": 9000.0, "device": "NVIDIA H200"}, items["peer-recipe"],
                               ["python3", "bench/peer_w1.py"], args, fpt),
            gpu_sweep.annotate({"tokens_per_s": 15000.0, "device": "NVIDIA H200", "ratio_vs_peer_best": 1.24},
                               items["ours-best"], ["python3", "bench/train_step.py"], args, fpt),
            gpu_sweep.annotate({"tokens_per_s": 10.0, "device": "cpu"}, items["ours-best"], ["python", "x"], args,
                               fpt)]
    gpu_sweep.same_run_ratios(rows, "r2")
    ours = rows[3]
    assert (ours["role"], ours["run_id"], ours["precision"]) == ("ours", "r2", "bf16")
    assert ours["model_flops_utilisation"] == round(43e9 * 15000 / 989e12, 4)
    assert ours["ratio_vs_peer_best_same_run"] == 1.25 and ours["ratio_vs_peer_recipe_same_run"] == round(15 / 9, 3)
    # where micro-batch 4 without checkpointing fits and is faster, it is the peer's best
    rows.append(gpu_sweep.annotate({"tokens_per_s": 12500.0, "device": "NVIDIA H200"}, items["peer-best-mb4"],
                                   ["python3", "bench/peer_w1.py"], args, fpt))
    gpu_sweep.same_run_ratios(rows, "r2")
    assert (ours["ratio_vs_peer_best_same_run"], ours["peer_best_same_run"]) == (1.2, "peer-best-mb4")
    assert "ratio_vs_peer_best" not in ours  # train_step's ratio to the H100 constant does not travel
    assert rows[4]["model_flops_utilisation"] is None  # no peak FLOP/s known for a CPU
    assert "ratio_vs_peer_best_same_run" not in rows[1]


def test_sweep_skips_what_would_pass_its_budget(tmp_path):
    wheels = tmp_path / "wheels"
    wheels.mkdir()
    proc = subprocess.run([sys.executable, "bench/gpu_sweep.py", "--peer-wheels", str(wheels)], cwd=ROOT,
                          check=False, capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0 and f"--peer-wheels {wheels}: no .whl files there" in proc.stderr
    proc = subprocess.run([sys.executable, "bench/gpu_sweep.py", "--budget-s", "0", "--out-dir", str(tmp_path)],
                          cwd=ROOT, check=False, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "ours-best: skipped" in proc.stdout and "peer-best: skipped (no --peer-checkout)" in proc.stdout
    assert not (tmp_path / "h200_train_step.json").exists()


@pytest.mark.slow
def test_gpu_sweep_dry_run_of_our_side(tmp_path):
    proc = subprocess.run([sys.executable, "bench/gpu_sweep.py", "--dry-run", "--only", "ours-best", "eapig-fp32",
                           "--out-dir", str(tmp_path), "--run-id", "ci"], cwd=ROOT, check=False, capture_output=True,
                          text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-2000:]
    (row,) = json.loads((tmp_path / "h200_train_step.json").read_text())
    assert (row["name"], row["role"], row["run_id"], row["precision"], row["device"]) == \
        ("ours-best", "ours", "ci", "bf16", "cpu")
    assert row["tokens_per_s"] > 0 and row["step_s_median"] > 0 and row["flops_per_token"] > 0
    assert "bench/train_step.py" in row["command"] and "jax" in row["versions"]
    eapig = json.loads((tmp_path / "dryrun_eapig_h200_float32.json").read_text())
    assert eapig["run_id"] == "ci" and eapig["prompts_per_second"] > 0 and eapig["dtype"] == "float32"
    assert eapig["peer_reference"]["prompts_per_s"] == 18.04


PEER_CHECKOUT, PEER_PYTHON = os.environ.get("CONTROLLLM_PEER_CHECKOUT"), os.environ.get("CONTROLLLM_PEER_PYTHON")


@pytest.mark.slow
@pytest.mark.skipif(not (PEER_CHECKOUT and PEER_PYTHON and Path(PEER_CHECKOUT).is_dir()),
                    reason="the release's checkout and its environment (CONTROLLLM_PEER_CHECKOUT, "
                           "CONTROLLLM_PEER_PYTHON; bench/README.md) are not on this machine")
def test_gpu_sweep_dry_run_of_the_peer_side(tmp_path):
    proc = subprocess.run([sys.executable, "bench/gpu_sweep.py", "--dry-run", "--only", "peer-best", "peer-recipe",
                           "--peer-checkout", PEER_CHECKOUT, "--peer-python", PEER_PYTHON, "--out-dir",
                           str(tmp_path)], cwd=ROOT, check=False, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-2000:]
    rows = {r["name"]: r for r in json.loads((tmp_path / "h200_train_step.json").read_text())}
    for name, batch, checkpointing in (("peer-best", 2, False), ("peer-recipe", 4, True)):
        row = rows[name]
        assert "error" not in row, row.get("error")
        assert (row["role"], row["batch"], row["gradient_checkpointing"]) == ("peer", batch, checkpointing)
        assert row["tokens_per_s"] > 0 and row["loss_first_last"][0] > 0
        # the smoke shape's 2 controlled layers (64 hidden, 128 MLP, 4 heads / 2 KV) and their dlerp gates
        assert row["trainable_params"] == 2 * (64 * (2 * 64 + 2 * 32) + 3 * 64 * 128 + 2 * 64) + 2 * 128
        assert row["versions"]["transformers"] == "4.49.0"
    # W1 itself, built on the meta device: the parameter counts the release's H100 measurement reported
    proc = subprocess.run([PEER_PYTHON, "bench/peer_w1.py", "--checkout", PEER_CHECKOUT, "--count-params"], cwd=ROOT,
                          check=False, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    counts = json.loads(proc.stdout.strip().splitlines()[-1])
    assert (counts["trainable_params"], counts["total_params"]) == (1744961536, 9775222792)


def test_sweep_driver_leaves_the_gpu_to_its_children():
    """The driver computes the FLOP count with JAX imported but no backend started: on a GPU a started backend
    would hold most of its memory for the whole sweep and starve every measured process."""
    check = ("import gpu_sweep; from jax._src import xla_bridge; gpu_sweep.required_flops_per_token('w1'); "
             "gpu_sweep.peak_flops('NVIDIA H200'); print(sorted(xla_bridge._backends))")
    proc = subprocess.run([sys.executable, "-c", check], cwd=ROOT / "bench", check=False, capture_output=True,
                          text=True, timeout=300, env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.strip().splitlines()[-1] == "[]"


def test_default_job_screen_orders_jobs_seed_by_seed_and_summarises(tmp_path):
    """bench/default_job_screen.py: every setting's first seed before any second (a budget cut leaves each setting
    the same seeds), the per-setting summary, and a malformed grid refused in one line."""
    screen = bench_module("default_job_screen")
    assert screen.jobs({"a": [], "b": ["train.lr=1e-4"]}, [1, 2]) == [("a", 1), ("b", 1), ("a", 2), ("b", 2)]
    rows = [{"setting": "a", "knowledge_seed": s, "exact_match": e, "retention": r, "kl_from_base": 0.1,
             "meets_target": e >= 0.6 and r >= 0.9} for s, e, r in ((1, 0.8, 0.95), (2, 0.9, 0.86))]
    summary = screen.table(rows)["a"]
    assert summary["seeds"] == [1, 2] and summary["min_retention"] == 0.86 and summary["min_exact_match"] == 0.8
    assert summary["all_meet_target"] is False
    bad = tmp_path / "grid.yaml"
    bad.write_text("control: train.lr=1e-4\n")
    with pytest.raises(SystemExit, match="expected a mapping from setting name to a list"):
        screen.load_grid(bad)
    cmd = screen.command(tmp_path / "run", 3, ["train.lr=1e-4"])
    assert cmd[-2:] == ["--set", "train.lr=1e-4"] and "knowledge.seed=3" in cmd and "train.save_every=0" in cmd
