"""Training in-process on one device: trainable/frozen split, gradient accumulation, optimizer, non-finite
steps, training modes, synthetic data. Multi-device and CLI behaviour: test_train_cli.py."""
import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from test_train_helpers import paths, read_metrics, tiny_run_config

from jax_controlllm.config import ConfigError
from jax_controlllm.model.params import init_params, trainable_mask
from jax_controlllm.sharding import make_mesh
from jax_controlllm.train import (
    EXIT_NONFINITE,
    EXIT_OK,
    SyntheticTokens,
    build_trainer,
    combine,
    create_run_dir,
    partition,
    train_loop,
    trained_model_config,
)
from jax_controlllm.train.setup import base_model_config
from jax_controlllm.train.state import learning_rate_schedule
from jax_controlllm.train.step import loss_and_grads

# ----------------------------------------------------------------------------------------------
# Pure pieces
# ----------------------------------------------------------------------------------------------

def test_partition_and_combine_round_trip():
    params = {"a": {"x": 1, "y": 2}, "b": {"z": {"w": 3}}, "c": 4}
    mask = {"a": {"x": True, "y": False}, "b": {"z": {"w": False}}, "c": True}
    trainable, frozen = partition(params, mask)
    assert trainable == {"a": {"x": 1}, "c": 4}
    assert frozen == {"a": {"y": 2}, "b": {"z": {"w": 3}}}
    assert combine(trainable, frozen) == params
    with pytest.raises(ValueError, match="in both trees"):
        combine({"a": 1}, {"a": 2})


def test_schedule_warms_up_then_decays_to_min_lr():
    train = tiny_run_config("train.steps=100", "train.warmup_steps=10", "train.lr=1e-3",
                            "train.min_lr=1e-4").train
    lr = learning_rate_schedule(train)
    assert float(lr(0)) == 0.0
    assert float(lr(5)) == pytest.approx(5e-4)
    assert float(lr(10)) == pytest.approx(1e-3)
    assert float(lr(55)) == pytest.approx(1e-4 + 0.5 * (1e-3 - 1e-4), rel=1e-4)
    assert float(lr(100)) == pytest.approx(1e-4)


def test_synthetic_tokens_are_packed_deterministic_and_sliced_per_process():
    full = SyntheticTokens(vocab_size=50, global_batch_size=4, seq_len=24, seed=3, min_doc_len=4, max_doc_len=10)
    halves = [SyntheticTokens(50, 4, 24, 3, process_index=p, process_count=2, min_doc_len=4, max_doc_len=10)
              for p in range(2)]
    for _ in range(2):
        batch = next(full)
        parts = [next(h) for h in halves]
        for key in ("input_ids", "labels", "segment_ids", "positions"):
            assert batch[key].dtype == np.int32 and batch[key].shape == (4, 24)
            np.testing.assert_array_equal(batch[key], np.concatenate([p[key] for p in parts]))
    assert (batch["segment_ids"] >= 1).all() and batch["segment_ids"].max() > 1     # packed documents
    starts = batch["positions"] == 0
    np.testing.assert_array_equal(starts[:, 1:], np.diff(batch["segment_ids"], axis=1) != 0)
    state = full.get_state()
    expected = next(full)
    other = SyntheticTokens(50, 4, 24, 3, min_doc_len=4, max_doc_len=10)
    other.set_state(state)
    np.testing.assert_array_equal(next(other)["input_ids"], expected["input_ids"])
    evals = SyntheticTokens(50, 4, 24, 3, split="eval", min_doc_len=4, max_doc_len=10)
    assert not np.array_equal(next(evals)["input_ids"], next(SyntheticTokens(50, 4, 24, 3))["input_ids"])


def test_modes_choose_the_trainable_leaves():
    full = tiny_run_config("train.mode=full", "expansion=null")
    config = trained_model_config(full, base_model_config(full))
    assert config.expansion is None and config.trainable_layers == (0, 1, 2, 3) and config.train_embeddings
    assert all(jax.tree.leaves(trainable_mask(config)))

    partial = tiny_run_config("train.mode=partial", "expansion=null", "train.trainable_layers=[3]")
    config = trained_model_config(partial, base_model_config(partial))
    mask = trainable_mask(config)
    assert not mask["embed_tokens"]["embedding"] and any(jax.tree.leaves(mask))
    assert not all(jax.tree.leaves(mask["layers"]))

    control = tiny_run_config()
    config = trained_model_config(control, base_model_config(control))
    assert config.expansion.num_ori_layers == 4 and config.num_hidden_layers == 4


@pytest.mark.parametrize("overrides, message", [
    (["expansion=null"], "train.mode controlllm needs an expansion section"),
    (["train.mode=full"], "remove the expansion section"),
    (["train.mode=partial", "expansion=null"], "partial needs the layer indices"),
    (["train.mode=partial", "expansion=null", "train.trainable_layers=[7]"], "out of range for 4 layers"),
])
def test_mode_errors_say_what_to_change(overrides, message):
    run = tiny_run_config(*overrides)
    with pytest.raises(ConfigError, match=message):
        trained_model_config(run, base_model_config(run))


# ----------------------------------------------------------------------------------------------
# The step
# ----------------------------------------------------------------------------------------------

def test_gradient_accumulation_matches_one_big_batch():
    run = tiny_run_config()
    config = trained_model_config(run, base_model_config(run))
    base = base_model_config(run)
    from jax_controlllm.model.expand import expand
    _, params = expand(base, init_params(base, jax.random.key(0)), run.expansion, jax.random.key(1))
    trainable, frozen = partition(params, trainable_mask(config))
    # make the expanded branch differ from the pretrained one, so the divergence term is not zero
    trainable = jax.tree.map(lambda x: x * 1.05 if x.ndim > 1 else x, trainable)
    batch = {k: jnp.asarray(v) for k, v in next(SyntheticTokens(256, 8, 32, 0, min_doc_len=4,
                                                                max_doc_len=24)).items()}
    one = jax.jit(lambda t: loss_and_grads(config, t, frozen, batch, 1, 1.0))
    four = jax.jit(lambda t: loss_and_grads(config, t, frozen, batch, 4, 1.0))
    (m1, g1), (m4, g4) = one(trainable), four(trainable)
    assert float(m1["divergence"]) > 0
    for key in ("ce", "divergence", "divergence_per_layer", "merge_weight_per_layer"):
        np.testing.assert_allclose(m4[key], m1[key], rtol=1e-5, err_msg=key)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-7), g4, g1)
    assert set(jax.tree.leaves(jax.tree.map(lambda g: g.dtype, g4))) == {jnp.dtype(jnp.float32)}


def test_lambda_schedule_scales_the_divergence_gradient():
    """train.divergence_scale_end: the step's gradient is that of CE + s · divergence, s going linearly from 1
    at the first step to the end value at the last; metrics keep the unscaled divergence."""
    from jax_controlllm.losses import controlllm_loss
    from jax_controlllm.model.expand import expand
    from jax_controlllm.train.step import divergence_scale
    run = tiny_run_config("train.steps=11", "train.divergence_scale_end=0.25")
    assert [float(divergence_scale(run.train, jnp.int32(s))) for s in (0, 5, 10, 50)] == [1.0, 0.625, 0.25, 0.25]
    assert float(divergence_scale(tiny_run_config().train, jnp.int32(7))) == 1.0
    base = base_model_config(run)
    config = trained_model_config(run, base)
    _, params = expand(base, init_params(base, jax.random.key(0)), run.expansion, jax.random.key(1))
    trainable, frozen = partition(params, trainable_mask(config))
    trainable = jax.tree.map(lambda x: x * 1.05 if x.ndim > 1 else x, trainable)
    batch = {k: jnp.asarray(v) for k, v in next(SyntheticTokens(256, 4, 32, 0, min_doc_len=4,
                                                                max_doc_len=24)).items()}
    for scale in (0.0, 2.5):
        metrics, grads = loss_and_grads(config, trainable, frozen, batch, 1, 1.0, None, scale)

        def independent(t):
            out = controlllm_loss(config, combine(t, frozen), batch)
            return out["ce"] + scale * out["divergence"]
        expected = jax.grad(independent)(trainable)
        assert float(metrics["divergence"]) > 0
        jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-7), grads, expected)
    with pytest.raises(ConfigError, match="train.divergence_scale_end"):
        tiny_run_config("train.divergence_scale_end=-1")


@pytest.fixture(scope="module")
def tiny_trainer():
    """One compiled tiny trainer (and a copy of its initial state) shared by the loop tests."""
    run = tiny_run_config("train.inject_nan_at_step=3", "train.eval_every=0", "train.save_every=0")
    trainer = build_trainer(run, make_mesh("1"))
    initial = jax.tree.map(jnp.copy, trainer.state)
    return trainer, initial


def _fresh(trainer_and_state, **train_changes):
    trainer, initial = trainer_and_state
    run = dataclasses.replace(trainer.run, train=dataclasses.replace(trainer.run.train, **train_changes))
    return dataclasses.replace(trainer, run=run, state=jax.tree.map(jnp.copy, initial))


def test_only_trainable_leaves_have_optimizer_state(tiny_trainer):
    trainer, _ = tiny_trainer
    trainable, frozen = trainer.state.trainable, trainer.frozen
    mask = trainable_mask(trainer.model_config)
    assert jax.tree.structure(partition(mask, mask)[0]) == jax.tree.structure(trainable)
    # trainable: the expanded copies and the gate kernels; frozen: everything else (gate bias included,
    # freeze_interpolation_factor being on by default)
    assert all("expanded_layer" in p or p[-3:] == ("interp_weight", "fc", "kernel") for p in paths(trainable))
    assert any(p[-3:] == ("interp_weight", "fc", "kernel") for p in paths(trainable))
    assert not any("expanded_layer" in p for p in paths(frozen))
    assert any("pretrained_layer" in p for p in paths(frozen)) and "embed_tokens" in frozen
    assert any(p[-3:] == ("interp_weight", "fc", "bias") for p in paths(frozen))
    adam = trainer.state.opt_state[1][0]
    assert jax.tree.structure(adam.mu) == jax.tree.structure(trainable)
    n_trainable = sum(x.size for x in jax.tree.leaves(trainable))
    n_moments = sum(x.size for x in jax.tree.leaves((adam.mu, adam.nu)))
    assert n_moments == 2 * n_trainable


def test_nonfinite_loss_stops_with_a_checkpoint_of_the_last_good_step(tiny_trainer, tmp_path):
    trainer = _fresh(tiny_trainer)
    result = train_loop(trainer, tmp_path, create_run_dir(tmp_path, trainer.run), progress=False)
    assert result.exit_code == EXIT_NONFINITE and result.step == 2
    assert "not finite" in result.reason and "skip_nonfinite_steps" in result.reason
    assert sorted(int(p.name) for p in (tmp_path / "checkpoints").iterdir() if p.name.isdigit()) == [2]
    records = read_metrics(tmp_path)
    assert [r["step"] for r in records] == [1, 2, 3] and records[-1]["skipped"]
    from jax_controlllm.checkpoint import RunCheckpoints
    assert RunCheckpoints(tmp_path, read_only=True).read_model_config(2) == trainer.model_config


def test_skipped_nonfinite_step_leaves_the_weights_untouched(tiny_trainer, tmp_path):
    trainer = _fresh(tiny_trainer, skip_nonfinite_steps=1, steps=4, save_every=1)
    result = train_loop(trainer, tmp_path, create_run_dir(tmp_path, trainer.run), progress=False)
    assert result.exit_code == EXIT_OK and result.step == 4
    records = {r["step"]: r for r in read_metrics(tmp_path)}
    assert records[3]["skipped"] and not np.isfinite(records[3]["loss"])
    assert not records[4]["skipped"] and np.isfinite(records[4]["loss"])
    from jax_controlllm.checkpoint import load_model
    params = {step: load_model(tmp_path / "checkpoints" / str(step), as_numpy=True)[1] for step in (2, 3, 4)}
    jax.tree.map(np.testing.assert_array_equal, params[3], params[2])           # step 3 changed nothing
    moved = jax.tree.map(lambda a, b: not np.array_equal(a, b), params[4], params[3])
    assert any(jax.tree.leaves(moved))                                          # step 4 trained again
    assert all(np.isfinite(x).all() for x in jax.tree.leaves(params[4]))


# ----------------------------------------------------------------------------------------------
# Starting from a base model
# ----------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def base_dirs(tmp_path_factory):
    """A random plain tiny Llama written as a Hugging Face directory and as one of our exports."""
    from jax_controlllm.checkpoint import save_model
    from jax_controlllm.convert import save_hf
    run = tiny_run_config()
    base = dataclasses.replace(run.model, trainable_layers=None)
    params = jax.jit(lambda key: init_params(base, key))(jax.random.key(42))
    root = tmp_path_factory.mktemp("bases")
    save_hf(base, params, root / "hf")
    save_model(base, params, root / "export")
    return root, base, params


@pytest.mark.parametrize("kind", ["hf", "export"])
def test_training_starts_from_the_base_weights_expanded(base_dirs, kind):
    from jax_controlllm.convert import to_hf_tensors
    root, base, base_params = base_dirs
    run = tiny_run_config(f"base.path={root / kind}")
    trainer = build_trainer(run, make_mesh("1"))
    assert trainer.source == f"base model {root / kind}" and trainer.model_config.expansion is not None
    got = to_hf_tensors(trainer.model_config, trainer.params())
    want = to_hf_tensors(base, base_params)
    for layer in (1, 3):  # the expanded layers: both branches start as the base layer
        for branch in ("pretrained_layer", "expanded_layer"):
            np.testing.assert_array_equal(got[f"model.layers.{layer}.{branch}.mlp.up_proj.weight"],
                                          want[f"model.layers.{layer}.mlp.up_proj.weight"])
    np.testing.assert_array_equal(got["model.layers.0.self_attn.q_proj.weight"],
                                  want["model.layers.0.self_attn.q_proj.weight"])
    np.testing.assert_array_equal(got["lm_head.weight"], want["lm_head.weight"])
