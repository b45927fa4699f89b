"""LoRA (train.mode lora): adapters start at the base exactly, their gradients follow from the kernel's, dropout
is training-only and deterministic, a few steps train only the adapters, and exports are the merged plain Llama."""
import dataclasses
import zlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from test_train_helpers import TINY, paths, tiny_run_config

from jax_controlllm.config import ConfigError, LoraConfig, load_config
from jax_controlllm.losses import controlllm_loss
from jax_controlllm.model import final_hidden, forward, init_params
from jax_controlllm.model.lora import add_lora, merge_lora
from jax_controlllm.sharding import DEFAULT_RULES, logical_to_spec
from jax_controlllm.train import (
    SyntheticTokens,
    build_trainer,
    combine,
    create_run_dir,
    train_loop,
    trained_model_config,
)
from jax_controlllm.train.setup import base_model_config

LORA = ("train.mode=lora", "expansion=null")
IDS = np.random.default_rng(0).integers(0, 256, size=(2, 24))


@pytest.fixture(scope="module")
def base():
    config = dataclasses.replace(tiny_run_config(*LORA).model, trainable_layers=None)
    return config, init_params(config, jax.random.key(0))


def _perturb_b(params: dict, seed: int = 3, scale: float = 0.2) -> dict:
    """Non-zero B everywhere, so the adapters change the function."""
    def perturb(path, x):
        if path[-1].key != "lora_b":
            return x
        return x + scale * jax.random.normal(jax.random.fold_in(jax.random.key(seed), zlib.crc32(str(path).encode())),
                                             x.shape, x.dtype)
    return jax.tree_util.tree_map_with_path(perturb, params)


def _adapted(base, **lora):
    config, params = base
    return add_lora(config, params, LoraConfig(**{"rank": 4, "alpha": 8.0, **lora}), jax.random.key(1))


# ----------------------------------------------------------------------------------------------
# The adapters in the model
# ----------------------------------------------------------------------------------------------

def test_zero_initialised_lora_reproduces_the_base_exactly(base):
    config, params = base
    lora_config, lora_params = _adapted(base)
    q = lora_params["layers"]["group_0"]["block_0"]["self_attn"]["q_proj"]
    assert q["lora_a"].shape == (4, 64, 4) and q["lora_b"].shape == (4, 4, 64)
    assert not np.any(np.asarray(q["lora_b"])) and np.any(np.asarray(q["lora_a"]))
    bound = 1 / np.sqrt(64)   # PEFT's A: kaiming-uniform(a=sqrt(5)) = U(-1/sqrt(in), 1/sqrt(in))
    assert np.abs(np.asarray(q["lora_a"])).max() <= bound and np.abs(np.asarray(q["lora_a"])).max() > 0.8 * bound
    np.testing.assert_array_equal(forward(lora_config, lora_params, IDS), forward(config, params, IDS))


def test_targets_choose_the_adapted_projections(base):
    _, params = _adapted(base, targets=["q_proj", "down_proj"])
    adapted = {p[-2] for p in paths(params) if p[-1] == "lora_a"}
    assert adapted == {"q_proj", "down_proj"}
    _, params = _adapted(base)
    assert {p[-2] for p in paths(params) if p[-1] == "lora_a"} == {"q_proj", "k_proj", "v_proj", "o_proj",
                                                                    "gate_proj", "up_proj", "down_proj"}


def test_lora_gradients_follow_from_the_kernel_gradient_of_the_merged_model(base):
    """y = x (W + s A B): dL/dA = s (dL/dW') B^T and dL/dB = s A^T (dL/dW'), where dL/dW' is the plain (merged)
    model's kernel gradient, computed without any LoRA code."""
    lora_config, lora_params = _adapted(base, targets=["v_proj", "up_proj", "down_proj"])
    lora_params = _perturb_b(lora_params)
    plain_config, merged = merge_lora(lora_config, lora_params)
    batch = {"input_ids": IDS}
    g_lora = jax.grad(lambda p: controlllm_loss(lora_config, p, batch)["total"])(lora_params)
    g_plain = jax.grad(lambda p: controlllm_loss(plain_config, p, batch)["total"])(merged)
    s = lora_config.lora.scale
    for module, name in (("self_attn", "v_proj"), ("mlp", "up_proj"), ("mlp", "down_proj")):
        adapter = lora_params["layers"]["group_0"]["block_0"][module][name]
        got = g_lora["layers"]["group_0"]["block_0"][module][name]
        g_w = np.asarray(g_plain["layers"]["group_0"]["block_0"][module][name]["kernel"], np.float64)
        a, b = np.asarray(adapter["lora_a"], np.float64), np.asarray(adapter["lora_b"], np.float64)
        want_a = s * np.einsum("lio,lro->lir", g_w, b)
        want_b = s * np.einsum("lir,lio->lro", a, g_w)
        assert np.abs(want_a).max() > 1e-4 and np.abs(want_b).max() > 1e-4
        np.testing.assert_allclose(got["lora_a"], want_a, rtol=2e-3, atol=1e-6, err_msg=name)
        np.testing.assert_allclose(got["lora_b"], want_b, rtol=2e-3, atol=1e-6, err_msg=name)
        # the frozen kernel's gradient is the merged model's too (the base sees the same upstream gradient)
        np.testing.assert_allclose(got["kernel"], g_w, rtol=2e-3, atol=1e-6)


def test_dropout_only_with_a_key_and_deterministic_given_it(base):
    rng = jax.random.key(7)
    no_dropout = _adapted(base, dropout=0.0)
    config, params = no_dropout[0], _perturb_b(no_dropout[1])
    plain = final_hidden(config, params, IDS)
    np.testing.assert_array_equal(final_hidden(config, params, IDS, lora_rng=rng), plain)   # rate 0: key unused

    dropped = dataclasses.replace(config, lora=dataclasses.replace(config.lora, dropout=0.5))
    np.testing.assert_array_equal(final_hidden(dropped, params, IDS), plain)                # no key: evaluation
    first = final_hidden(dropped, params, IDS, lora_rng=rng)
    assert not np.allclose(first, plain, atol=1e-4)
    np.testing.assert_array_equal(final_hidden(dropped, params, IDS, lora_rng=rng), first)
    assert not np.allclose(final_hidden(dropped, params, IDS, lora_rng=jax.random.key(8)), first, atol=1e-4)


def test_lora_leaves_shard_by_their_logical_axes(base):
    lora_config, _ = _adapted(base)
    from jax_controlllm.model import param_specs
    q = param_specs(lora_config)["layers"]["group_0"]["block_0"]["self_attn"]["q_proj"]
    mesh = {"fsdp": 2, "tensor": 2}
    a = logical_to_spec(q["lora_a"].logical_axes, DEFAULT_RULES, mesh, q["lora_a"].shape, mesh)
    b = logical_to_spec(q["lora_b"].logical_axes, DEFAULT_RULES, mesh, q["lora_b"].shape, mesh)
    assert tuple(a) == (None, "fsdp", None) and tuple(b) == (None, None, "tensor")
    assert q["lora_a"].trainable and q["lora_b"].trainable and not q["kernel"].trainable


# ----------------------------------------------------------------------------------------------
# Config
# ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("overrides, key, fix", [
    (["lora.rank=0"], "lora.rank:", "at least 1"),
    (["lora.alpha=0"], "lora.alpha:", "positive"),
    (["lora.dropout=1.0"], "lora.dropout:", "[0, 1)"),
    (["lora.targets=[q_proj, w_proj]"], "lora.targets:", "choose from q_proj"),
    (["lora.targets=[]"], "lora.targets:", "non-empty"),
    (["lora.rnak=4"], "unknown config key 'lora.rnak'", "did you mean 'rank'"),
])
def test_bad_lora_config_is_one_line_naming_the_key(overrides, key, fix):
    with pytest.raises(ConfigError) as err:
        tiny_run_config(*LORA, *overrides)
    message = str(err.value)
    assert "\n" not in message and key in message and fix in message, message


def test_lora_needs_its_mode_and_a_plain_model():
    with pytest.raises(ConfigError, match="a lora section needs train.mode: lora"):
        tiny_run_config("lora.rank=4")
    run = tiny_run_config("train.mode=lora")          # tiny.yaml has an expansion section
    with pytest.raises(ConfigError, match="expansion: train.mode lora tunes the plain model"):
        trained_model_config(run, base_model_config(run))
    control = tiny_run_config()
    expanded = trained_model_config(control, base_model_config(control))
    with pytest.raises(ConfigError, match="^lora: LoRA adapts a plain Llama but this model is expanded"):
        dataclasses.replace(expanded, lora=LoraConfig()).validate()


def test_mode_lora_without_a_section_takes_the_defaults():
    run = tiny_run_config(*LORA)
    config = trained_model_config(run, base_model_config(run))
    assert config.lora == LoraConfig() and config.trainable_layers is None and not config.train_embeddings
    assert LoraConfig().targets == ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


# ----------------------------------------------------------------------------------------------
# Training, checkpoints and exports
# ----------------------------------------------------------------------------------------------

def _one_device():
    return jax.sharding.Mesh(np.array(jax.devices()[:1]), ("fsdp",))


@pytest.fixture(scope="module")
def lora_trainer():
    """A compiled tiny LoRA trainer (dropout on, bf16 frozen base) and a copy of its initial state."""
    run = tiny_run_config(*LORA, "lora.rank=4", "lora.alpha=16", "lora.dropout=0.1", "train.steps=6",
                          "train.save_every=3", "train.eval_every=3", "train.lr=1e-2", "train.warmup_steps=1",
                          "model.frozen_dtype=bfloat16")
    trainer = build_trainer(run, _one_device())
    return trainer, jax.tree.map(jnp.copy, trainer.state)


def test_lora_steps_lower_the_loss_and_move_only_the_adapters(lora_trainer):
    trainer, initial = lora_trainer
    assert {p[-1] for p in paths(initial.trainable)} == {"lora_a", "lora_b"}
    assert not any(p[-1] in ("lora_a", "lora_b") for p in paths(trainer.frozen))
    assert {x.dtype for x in jax.tree.leaves(trainer.frozen)} == {jnp.dtype(jnp.bfloat16)}
    adam = initial.opt_state[1][0]
    assert jax.tree.structure(adam.mu) == jax.tree.structure(initial.trainable)   # moments for A and B only

    frozen_before = jax.tree.map(np.asarray, trainer.frozen)
    batch = jax.device_put(next(SyntheticTokens(256, 8, 32, 0, min_doc_len=4, max_doc_len=24)),
                           trainer.shardings.batch)
    state, losses = jax.tree.map(jnp.copy, initial), []
    for _ in range(6):
        state, metrics = trainer.step_fn(state, trainer.frozen, batch)
        losses.append(float(metrics["loss"]))
    assert losses[-1] < losses[0] - 0.1, losses
    jax.tree.map(np.testing.assert_array_equal, jax.tree.map(np.asarray, trainer.frozen), frozen_before)
    for path, before, after in zip(paths(initial.trainable), jax.tree.leaves(initial.trainable),
                                   jax.tree.leaves(state.trainable)):
        assert not np.array_equal(before, after), path


@pytest.fixture(scope="module")
def lora_run(lora_trainer, tmp_path_factory):
    """Six steps of the LoRA trainer through the loop, checkpoints at 3 and 6."""
    trainer, initial = lora_trainer
    out = tmp_path_factory.mktemp("lora_run")
    trainer = dataclasses.replace(trainer, state=jax.tree.map(jnp.copy, initial))
    result = train_loop(trainer, out, create_run_dir(out, trainer.run), progress=False)
    assert result.exit_code == 0 and result.step == 6
    return out, trainer


def test_a_lora_run_resumes_and_exports_as_the_merged_plain_llama(lora_run, tmp_path):
    out, trainer = lora_run
    from jax_controlllm.checkpoint import RunCheckpoints, load_model
    from jax_controlllm.convert import load_hf, save_hf
    resumed = build_trainer(trainer.run, trainer.mesh, RunCheckpoints(out, read_only=True))
    assert resumed.start_step == 6 and resumed.model_config.lora == trainer.model_config.lora
    config, params = load_model(out)
    assert config.lora.dropout == 0.1
    jax.tree.map(np.testing.assert_array_equal, combine(resumed.state.trainable, resumed.frozen), params)
    assert any(np.any(np.asarray(x)) for p, x in zip(paths(params), jax.tree.leaves(params)) if p[-1] == "lora_b")

    report = save_hf(config, params, tmp_path / "hf")
    assert report["lora_merged"]["rank"] == 4
    merged_config, merged = load_hf(tmp_path / "hf", dtype="float32")
    assert merged_config.lora is None
    assert not any("lora" in "/".join(p) for p in paths(merged))
    # merged in float32 over the bf16 base: the export computes what the unmerged model computes
    np.testing.assert_allclose(forward(merged_config, merged, IDS), forward(config, params, IDS), atol=1e-4)


def test_convert_cli_exports_a_lora_run_checked_against_its_unmerged_logits(lora_run, tmp_path):
    from launch.convert import orbax_to_hf
    out, _ = lora_run
    report = orbax_to_hf(str(out), str(tmp_path / "hf"))
    assert report["lora_merged"]["alpha"] == 16 and report["max_abs_logit_error"] < 1e-4
    assert "lora" not in (tmp_path / "hf" / "config.json").read_text()


def test_merged_export_matches_the_unmerged_forward_in_transformers(base, tmp_path):
    torch = pytest.importorskip("torch")
    from hf_models import hf_logits
    from transformers import LlamaForCausalLM

    from jax_controlllm.convert import save_hf
    lora_config, params = _adapted(base, targets=["q_proj", "o_proj", "gate_proj", "down_proj"])
    params = _perturb_b(params)
    save_hf(lora_config, params, tmp_path / "hf")
    model = LlamaForCausalLM.from_pretrained(tmp_path / "hf", torch_dtype=torch.float32).eval()
    want = np.asarray(forward(lora_config, params, IDS))
    assert np.abs(want - np.asarray(forward(*base, IDS))).max() > 0.1          # the adapters matter
    np.testing.assert_allclose(hf_logits(model, IDS), want, atol=2e-4)
    # and the HF orientation is weight[out, in] + (alpha / r) B_peft A_peft with A_peft = lora_a^T, B_peft = lora_b^T
    gate = params["layers"]["group_0"]["block_0"]["mlp"]["gate_proj"]
    a, b, w = (np.asarray(gate[k][1], np.float64) for k in ("lora_a", "lora_b", "kernel"))
    torch_weight = model.model.layers[1].mlp.gate_proj.weight.detach().numpy()
    np.testing.assert_allclose(torch_weight, w.T + lora_config.lora.scale * b.T @ a.T, atol=1e-6)


def test_a_lora_run_as_base_has_its_adapters_merged(lora_run, tmp_path):
    out, _ = lora_run
    from jax_controlllm.checkpoint import load_model
    run = tiny_run_config("train.mode=full", "expansion=null", f"base.path={out}", "train.steps=1")
    trainer = build_trainer(run, _one_device())
    assert trainer.model_config.lora is None and trainer.source == f"base model {out}"
    config, params = load_model(out)
    want = np.asarray(forward(config, params, IDS))
    got = np.asarray(forward(trainer.model_config, trainer.params(), IDS))
    np.testing.assert_allclose(got, want, atol=1e-4)


def test_tiny_yaml_config_loads_with_a_lora_section(tmp_path):
    path = tmp_path / "lora.yaml"
    expansion = "expansion:\n  expand_type: concat\n  num_exp_layers: 2\n  merge_method: dlerp\n"
    lora = "lora:\n  rank: 8\n  targets: [q_proj, v_proj]\n"
    path.write_text(TINY.read_text().replace(expansion, lora).replace("mode: controlllm", "mode: lora"))
    run = load_config(path)
    assert run.lora == LoraConfig(rank=8, targets=["q_proj", "v_proj"]) and run.expansion is None


@pytest.mark.parametrize("change", ["lora.rank=8", "lora.dropout=0.2", "lora.targets=[q_proj]"])
def test_resuming_a_lora_run_with_other_adapters_is_refused(tmp_path, change):
    from jax_controlllm.train.rundir import check_config_drift, write_config
    write_config(tmp_path, tiny_run_config(*LORA, "lora.rank=4"))
    with pytest.raises(ConfigError, match=f"different {change.split('=')[0]}.*start a new run"):
        check_config_drift(tmp_path, tiny_run_config(*LORA, "lora.rank=4", change))
    assert check_config_drift(tmp_path, tiny_run_config(*LORA, "lora.rank=4")) is None


def test_the_circuit_graph_of_a_lora_model_is_that_of_its_merged_weights(base):
    from jax_controlllm.circuits.nodes import circuit_model
    lora_config, params = _adapted(base)
    params = _perturb_b(params)
    graph, merged = circuit_model(lora_config, params), circuit_model(*merge_lora(lora_config, params))
    assert graph.config == merged.config and graph.config.lora is None
    jax.tree.map(np.testing.assert_array_equal, graph.weights, merged.weights)


@pytest.mark.slow
def test_sharded_lora_with_dropout_resumes_exactly_and_matches_one_device(tmp_path):
    """2x2 mesh (the adapters sharded by their logical axes), preempted at step 3 and resumed: the losses of an
    uninterrupted 2x2 run exactly, and those of one device up to float rounding."""
    from test_train_helpers import check, run_cli, train_losses
    common = ["--config", str(TINY), "--set", "expansion=null", "--set", "train.mode=lora", "--set", "lora.rank=4",
              "--set", "lora.dropout=0.1", "--set", "train.steps=6", "--set", "train.save_every=0",
              "--set", "train.eval_every=0"]
    sharded = [*common, "--cpu-devices", "4", "--mesh", "2x2"]
    cache = tmp_path / "cache"
    check(run_cli([*sharded, "--out", str(tmp_path / "straight")], cache))
    check(run_cli([*common, "--mesh", "1", "--out", str(tmp_path / "one")], cache))
    preempt = [*sharded, "--out", str(tmp_path / "stopped"), "--set", "train.inject_sigterm_at_step=3"]
    check(run_cli(preempt, cache), expect=75)
    check(run_cli(preempt, cache))
    straight, resumed, one = (train_losses(tmp_path / d) for d in ("straight", "stopped", "one"))
    assert sorted(straight) == list(range(1, 7))
    assert [resumed[s] for s in range(1, 7)] == [straight[s] for s in range(1, 7)]
    np.testing.assert_allclose([one[s] for s in range(1, 7)], [straight[s] for s in range(1, 7)], rtol=1e-5)


def test_generation_and_perplexity_of_a_lora_model_are_its_merged_models(base):
    from jax_controlllm.evaluate import perplexity
    from jax_controlllm.generate import generate_ids
    lora_config, params = _adapted(base)
    params = _perturb_b(params)
    plain_config, merged = merge_lora(lora_config, params)
    prompts = [[5, 9, 13], [7, 7]]
    got = [g.tokens for g in generate_ids(lora_config, params, prompts, 6)]
    assert got == [g.tokens for g in generate_ids(plain_config, merged, prompts, 6)]
    lora_loss, merged_loss = (perplexity(c, p, [IDS])["loss"] for c, p in ((lora_config, params),
                                                                          (plain_config, merged)))
    assert lora_loss == pytest.approx(merged_loss, rel=1e-5)
