"""Control LLM against the authors' release (shared/reference/controlllm) and its invariants."""
import dataclasses
import json
import zlib
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from reference import reference_dir

from jax_controlllm.config import MERGE_METHODS, ConfigError, ExpansionConfig, ModelConfig, selected_layers
from jax_controlllm.convert import load_hf, save_hf, to_hf_tensors
from jax_controlllm.convert.merge_back import save_merged_hf
from jax_controlllm.convert.safetensors_io import SafetensorsDir
from jax_controlllm.losses import controlllm_loss
from jax_controlllm.model import block_groups, forward, init_params
from jax_controlllm.model.expand import expand
from jax_controlllm.model.params import trainable_mask

REF = reference_dir("controlllm")
CASES = sorted(p.name for p in REF.iterdir() if (p / "base").is_dir()) if REF.is_dir() else []
needs_ref = pytest.mark.skipif(not CASES, reason="shared/reference/controlllm not present")


def _batch(expected):
    return {"input_ids": expected["input_ids"], "labels": expected["labels"]}


@needs_ref
@pytest.mark.parametrize("case", CASES)
def test_reproduces_release_forward_loss_and_gradients(case):
    config, params = load_hf(REF / case / "model", dtype="float32")
    expected = np.load(REF / case / "expected.npz")
    logits = np.asarray(forward(config, params, expected["input_ids"]))
    assert np.abs(logits - expected["logits"]).max() <= 1e-5

    def total(p):
        out = controlllm_loss(config, p, _batch(expected))
        return out["total"], out

    grads, out = jax.grad(total, has_aux=True)(params)
    assert abs(float(out["ce"]) - float(expected["ce"])) <= 1e-5 * abs(float(expected["ce"]))
    div = float(expected["div"])
    assert abs(float(out["divergence"]) - div) <= 1e-5 * max(abs(div), 1e-12)
    np.testing.assert_allclose(np.asarray(out["divergence_per_layer"]), expected["div_per_layer"], rtol=1e-5)
    hf_grads = to_hf_tensors(config, grads)
    checked = 0
    for key in expected.files:
        if not key.startswith("grad__"):
            continue
        ref = expected[key]
        ours = hf_grads[key[len("grad__"):].replace("__", ".")].reshape(ref.shape)
        assert np.abs(ours - ref).max() <= 1e-4 * np.abs(ref).max(), key
        checked += 1
    assert checked >= 4


@needs_ref
@pytest.mark.parametrize("case", CASES)
def test_reference_trainable_set(case):
    config, params = load_hf(REF / case / "model", dtype="float32")
    info = json.loads((REF / case / "case.json").read_text())
    mask = to_hf_tensors(config, trainable_mask(config))
    ours = {name for name, m in mask.items() if bool(np.asarray(m))}
    assert ours == set(info["trainable_param_names_after_their_freeze"])


@needs_ref
def test_merge_back_matches_release():
    config, params = load_hf(REF / "concat_lerp_mse" / "model", dtype="float32")
    expected = np.load(REF / "merge_back_lerp" / "expected.npz")
    out = Path("/tmp") / f"mb-{np.random.randint(1 << 30)}"
    report = save_merged_hf(config, params, out, sample_ids=expected["input_ids"])
    ours, ref = SafetensorsDir(out), SafetensorsDir(REF / "merge_back_lerp" / "model")
    assert set(ours) == set(ref)
    for name in ref:
        np.testing.assert_allclose(ours[name], ref[name], atol=1e-6, err_msg=name)
    merged_config, merged = load_hf(out, dtype="float32")
    assert merged_config.expansion is None
    np.testing.assert_allclose(np.asarray(forward(merged_config, merged, expected["input_ids"])),
                               expected["logits"], atol=1e-5)
    drift = np.abs(expected["logits"] - expected["logits_expanded"]).max()
    assert report["max_abs_logit_drift"] == pytest.approx(drift, rel=1e-3)


# ----------------------------------------------------------------------------------------------
# Expansion from scratch
# ----------------------------------------------------------------------------------------------

def tiny(**kw):
    base = dict(vocab_size=96, hidden_size=32, intermediate_size=64, num_hidden_layers=4, num_attention_heads=4,
                num_key_value_heads=2, max_position_embeddings=128, rms_norm_eps=1e-5)
    return ModelConfig(**{**base, **kw})


@pytest.fixture(scope="module")
def base():
    config = tiny()
    return config, init_params(config, jax.random.PRNGKey(0))


IDS = np.random.default_rng(0).integers(0, 96, size=(2, 16))


INIT_CASES = [("concat", m) for m in MERGE_METHODS] + [("hybrid", "lerp"), ("hybrid", "moe"), ("stack", "lerp")]


@pytest.mark.parametrize("expand_type,method", INIT_CASES)
def test_expanded_model_reproduces_base_at_init(base, method, expand_type):
    config, params = base
    exp = ExpansionConfig(expand_type=expand_type, num_exp_layers=2, merge_method=method)
    config2, params2 = expand(config, params, exp, jax.random.PRNGKey(1))
    ref = np.asarray(forward(config, params, IDS))
    out = np.asarray(forward(config2, params2, IDS))
    if method == "prog" and expand_type != "stack":
        assert np.abs(out - ref).max() > 1e-4  # the lateral connection is not the identity at init
    else:
        assert np.abs(out - ref).max() <= 1e-6
    loss = controlllm_loss(config2, params2, {"input_ids": IDS})
    if method not in ("prog", "proj"):  # proj's divergence reads M p, and M is not the identity
        assert float(loss["divergence"]) <= 1e-10


def test_hybrid_layout_matches_release_description(base):
    config, params = base
    config2, _ = expand(config, params, ExpansionConfig("hybrid", 2, merge_method="lerp"), jax.random.PRNGKey(0))
    from jax_controlllm.model.layout import layer_plan
    kinds = [(b.kind, b.trainable) for b in layer_plan(config2)]
    assert kinds == [("llama", False), ("llama", False), ("llama", True), ("llama", False), ("controlled", False)]


def test_every_kth_layer_controlled_compiles_as_a_scan_over_groups():
    """Compiled block bodies and segments do not grow with depth: 32 and 64 layers give the same structure."""
    structures = []
    for layers in (32, 64):
        config = ModelConfig(vocab_size=16, hidden_size=8, intermediate_size=16, num_hidden_layers=layers,
                             num_attention_heads=2)
        from jax_controlllm.model.expand import expanded_config
        config2 = expanded_config(config, ExpansionConfig("concat", layers // 4))
        segs = block_groups(config2)
        structures.append([(len(s.pattern), s.repeats * 4 // layers) for s in segs if s.repeats > 1])
        assert sum(len(s.pattern) for s in segs) <= 6 and len(segs) <= 3
    # the frozen prefix (layers 0-2) is its own segment: it needs no backward pass
    assert [b.kind for b in segs[0].pattern] == ["llama"] and segs[0].repeats == 3
    assert segs[-1].repeats == 64 // 4 - 1 and [b.kind for b in segs[-1].pattern].count("controlled") == 1


@pytest.mark.parametrize("method", ["lerp", "dlerp", "moe", "slerp", "proj"])
def test_save_load_round_trip_is_exact(tmp_path, base, method):
    config, params = base
    exp = ExpansionConfig("concat", 2, merge_method=method, interpolation_norm_alpha=-1)
    config2, params2 = expand(config, params, exp, jax.random.PRNGKey(3))
    save_hf(config2, params2, tmp_path / "m")
    hf = json.loads((tmp_path / "m" / "config.json").read_text())
    assert hf["model_type"] == "causallmexpansion" and hf["architectures"] == ["CausalLMExpansion"]
    assert set(hf["expansion"]) >= {"expand_type", "merge_method", "freezed_layers", "expanded_from",
                                    "num_ori_layers", "num_exp_layers", "interpolation_factor",
                                    "interpolation_loss_alpha", "interpolation_loss_type",
                                    "interpolation_norm_alpha", "freeze_interpolation_factor",
                                    "freeze_ori_layers", "freeze_ori_non_layers"}
    names = set(SafetensorsDir(tmp_path / "m"))
    assert "model.layers.1.pretrained_layer.self_attn.q_proj.weight" in names
    assert "model.layers.3.expanded_layer.input_layernorm.interpolation_factor" in names
    gate = {"lerp": "model.layers.1.interpolation_factor", "slerp": "model.layers.1.interpolation_factor",
            "dlerp": "model.layers.1.interp_weight.fc.weight", "moe": "model.layers.1.gating.gate_network.0.weight",
            "proj": "model.layers.1.linear_proj.weight"}[method]
    assert gate in names
    config3, params3 = load_hf(tmp_path / "m", dtype="float32")
    assert config3.expansion == dataclasses.replace(config2.expansion)
    jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), np.asarray(b)), params2, params3)


def test_divergence_options(base):
    config, params = base
    config2, params2 = expand(config, params, ExpansionConfig("concat", 2, merge_method="dlerp"), jax.random.PRNGKey(0))
    # perturb the expanded branches so the branches differ
    params2 = jax.tree_util.tree_map_with_path(
        lambda path, x: x + 0.05 * jax.random.normal(jax.random.PRNGKey(zlib.crc32(str(path).encode())), x.shape)
        if "expanded_layer" in str(path) else x, params2)
    mask = np.ones_like(IDS)
    mask[1, 4:] = 0
    batch = {"input_ids": IDS, "attention_mask": mask}
    masked = controlllm_loss(config2, params2, batch)
    ref_cfg = dataclasses.replace(config2,
                                  expansion=dataclasses.replace(config2.expansion, divergence_mask="reference"))
    unmasked = controlllm_loss(ref_cfg, params2, batch)
    assert float(masked["divergence"]) != pytest.approx(float(unmasked["divergence"]), rel=1e-2)
    off = dataclasses.replace(config2, expansion=dataclasses.replace(config2.expansion, interpolation_loss_alpha=0))
    assert float(controlllm_loss(off, params2, batch)["divergence"]) == 0.0
    cos = dataclasses.replace(config2,
                              expansion=dataclasses.replace(config2.expansion, interpolation_loss_type="cosine"))
    assert float(controlllm_loss(cos, params2, batch)["divergence"]) > 0
    gated = dataclasses.replace(config2, expansion=dataclasses.replace(config2.expansion, interpolation_loss_alpha=-1))
    assert 0 < float(controlllm_loss(gated, params2, batch)["divergence"]) < float(masked["divergence"])


def test_divergence_reaches_earlier_trainable_layers(base):
    """No stop-gradient on the pretrained branch: the divergence of the last controlled layer sends gradient
    into the expanded branch of the earlier one through h."""
    config, params = base
    config2, params2 = expand(config, params, ExpansionConfig("concat", 2, merge_method="lerp",
                                                              freeze_interpolation_factor=False), jax.random.PRNGKey(0))
    params2 = jax.tree_util.tree_map_with_path(
        lambda path, x: x + 0.05 * jax.random.normal(jax.random.PRNGKey(7), x.shape)
        if "expanded_layer" in str(path) else x, params2)

    def last_div(p):
        return controlllm_loss(config2, p, {"input_ids": IDS})["divergence_per_layer"][1]

    grads = to_hf_tensors(config2, jax.grad(last_div)(params2))
    assert np.abs(grads["model.layers.1.expanded_layer.mlp.down_proj.weight"]).max() > 0


def test_trainable_mask_freezes_what_the_spec_says(base):
    config, params = base
    c2, p2 = expand(config, params, ExpansionConfig("concat", 2, merge_method="dlerp",
                                                    interpolation_norm_alpha=-1), jax.random.PRNGKey(0))
    mask = {k: bool(np.asarray(v)) for k, v in to_hf_tensors(c2, trainable_mask(c2)).items()}
    assert not mask["model.embed_tokens.weight"] and not mask["lm_head.weight"] and not mask["model.norm.weight"]
    assert not mask["model.layers.0.self_attn.q_proj.weight"]
    assert not mask["model.layers.1.pretrained_layer.mlp.up_proj.weight"]
    assert mask["model.layers.1.expanded_layer.mlp.up_proj.weight"]
    assert mask["model.layers.1.interp_weight.fc.weight"] and not mask["model.layers.1.interp_weight.fc.bias"]
    assert mask["model.layers.1.expanded_layer.input_layernorm.interpolation_factor"]
    # frozen weights and trainable weights take their own dtypes
    bf = dataclasses.replace(config, frozen_dtype="bfloat16")
    bf_params = jax.tree.map(lambda x: x.astype(jnp.bfloat16), params)
    c3, p3 = expand(bf, bf_params, ExpansionConfig("concat", 2), jax.random.PRNGKey(0))
    t3 = to_hf_tensors(c3, p3)
    assert t3["model.layers.1.pretrained_layer.mlp.up_proj.weight"].dtype == jnp.bfloat16
    assert t3["model.layers.1.expanded_layer.mlp.up_proj.weight"].dtype == np.float32


def test_stack_copies_have_zero_output_projections(base):
    config, params = base
    c2, p2 = expand(config, params, ExpansionConfig("stack", 2), jax.random.PRNGKey(0))
    t = to_hf_tensors(c2, p2)
    assert c2.num_hidden_layers == 6
    for i in (2, 5):
        assert not t[f"model.layers.{i}.self_attn.o_proj.weight"].any()
        assert not t[f"model.layers.{i}.mlp.down_proj.weight"].any()
        np.testing.assert_array_equal(t[f"model.layers.{i}.self_attn.q_proj.weight"],
                                      t[f"model.layers.{i - 1}.self_attn.q_proj.weight"])


def test_layer_selection_rule_and_errors():
    assert selected_layers(ExpansionConfig(num_exp_layers=8), 32) == [3, 7, 11, 15, 19, 23, 27, 31]
    with pytest.raises(ConfigError, match="expansion.layers"):
        selected_layers(ExpansionConfig(num_exp_layers=12), 32)
    assert selected_layers(ExpansionConfig(num_exp_layers=3, layers=[0, 5, 9]), 32) == [0, 5, 9]
    with pytest.raises(ConfigError, match="out of range"):
        selected_layers(ExpansionConfig(layers=[40]), 32)
    with pytest.raises(ConfigError, match="num_exp_layers"):
        selected_layers(ExpansionConfig(num_exp_layers=40), 32)


def test_bad_expansion_fails_before_compute(base):
    config, params = base
    with pytest.raises(ConfigError, match="merge_method"):
        expand(config, params, ExpansionConfig(merge_method="average"), jax.random.PRNGKey(0))
    with pytest.raises(ConfigError, match="expand_type"):
        expand(config, params, ExpansionConfig(expand_type="widen"), jax.random.PRNGKey(0))
    with pytest.raises(ConfigError, match="num_exp_layers"):
        expand(config, params, ExpansionConfig(num_exp_layers=5), jax.random.PRNGKey(0))
    c2, p2 = expand(config, params, ExpansionConfig(num_exp_layers=2), jax.random.PRNGKey(0))
    with pytest.raises(ConfigError, match="already expanded"):
        expand(c2, p2, ExpansionConfig(num_exp_layers=2), jax.random.PRNGKey(0))


def test_slerp_rows_follow_the_release_rule():
    from jax_controlllm.convert.merge_back import slerp_rows
    rng = np.random.default_rng(0)
    w_p, w_e = rng.normal(size=(3, 8)).astype(np.float32), rng.normal(size=(3, 8)).astype(np.float32)
    out = slerp_rows(w_p, w_e, 0.3)
    for row in range(3):
        a, b = w_p[row], w_e[row]
        c = np.clip(a @ b / np.linalg.norm(a) / np.linalg.norm(b), -1 + 1e-6, 1 - 1e-6)
        th = np.arccos(c)
        want = np.sin(0.7 * th) / (np.sin(th) + 1e-6) * a + np.sin(0.3 * th) / (np.sin(th) + 1e-6) * b
        np.testing.assert_allclose(out[row], want, rtol=1e-5)
    assert slerp_rows(w_p[0], w_e[0], 0.3).shape == (8,)  # a norm weight is one row


@pytest.mark.parametrize("method", ["moe", "proj", "prog"])
def test_merge_back_refuses_unfoldable_methods(tmp_path, base, method):
    config, params = base
    c2, p2 = expand(config, params, ExpansionConfig("concat", 2, merge_method=method), jax.random.PRNGKey(0))
    with pytest.raises(ConfigError, match="no weight-space fold"):
        save_merged_hf(c2, p2, tmp_path / "m")
    assert not (tmp_path / "m").exists()


def test_hybrid_merge_back_gives_plain_llama(tmp_path, base):
    config, params = base
    c2, p2 = expand(config, params, ExpansionConfig("hybrid", 2, merge_method="lerp"), jax.random.PRNGKey(0))
    report = save_merged_hf(c2, p2, tmp_path / "m")
    c3, p3 = load_hf(tmp_path / "m", dtype="float32")
    assert c3.expansion is None and c3.num_hidden_layers == 5
    # at init both branches are equal, so the lerp fold is exact
    assert report["max_abs_logit_drift"] < 1e-5
    np.testing.assert_allclose(np.asarray(forward(c3, p3, IDS)), np.asarray(forward(config, params, IDS)), atol=1e-5)
