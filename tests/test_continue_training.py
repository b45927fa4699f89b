"""Control LLM training continues from expanded checkpoints: the release's own (shared/reference/controlllm),
our release-format exports and our standalone checkpoints. The expansion comes from the checkpoint, the
trainable set is a fresh expansion's (the release's for its checkpoints), and contradictions fail in one line."""
import json

import numpy as np
import pytest
from reference import reference_dir
from test_train_helpers import tiny_run_config, train_losses

from jax_controlllm.checkpoint import save_model
from jax_controlllm.config import ConfigError
from jax_controlllm.convert import load_hf, to_hf_tensors
from jax_controlllm.convert.export import export_hf
from jax_controlllm.model.params import trainable_mask
from jax_controlllm.sharding import make_mesh
from jax_controlllm.train import EXIT_OK, build_trainer, create_run_dir, train_loop
from jax_controlllm.train.setup import base_model_config, trained_model_config

REF = reference_dir("controlllm")
needs_ref = pytest.mark.skipif(not (REF / "concat_dlerp_mse").is_dir(), reason="shared/reference/controlllm missing")
CONTINUE = ("expansion=null", "train.steps=3", "train.save_every=0", "train.eval_every=0", "train.warmup_steps=1")


def trainable_names(trainer) -> set[str]:
    mask = to_hf_tensors(trainer.model_config, trainable_mask(trainer.model_config))
    return {name for name, m in mask.items() if bool(np.asarray(m))}


def continue_three_steps(path, tmp_path, *overrides):
    run = tiny_run_config(f"base.path={path}", *CONTINUE, *overrides)
    trainer = build_trainer(run, make_mesh("1"))
    start = to_hf_tensors(trainer.model_config, trainer.params())   # the loop donates the state's buffers
    result = train_loop(trainer, tmp_path, create_run_dir(tmp_path, trainer.run), progress=False)
    assert result.exit_code == EXIT_OK and result.step == 3
    losses = train_losses(tmp_path)
    assert sorted(losses) == [1, 2, 3] and all(np.isfinite(v) for v in losses.values())
    return trainer, start


@needs_ref
@pytest.mark.parametrize("case", ["concat_dlerp_mse", "hybrid_dlerp_mse", "stack"])
def test_continues_from_a_release_checkpoint_with_the_release_trainable_set(case, tmp_path):
    trainer, _ = continue_three_steps(REF / case / "model", tmp_path)
    info = json.loads((REF / case / "case.json").read_text())
    assert trainable_names(trainer) == set(info["trainable_param_names_after_their_freeze"])
    config, _ = load_hf(REF / case / "model")
    assert trainer.model_config.expansion == config.expansion


@pytest.fixture(scope="module")
def expanded_run(tmp_path_factory):
    """A short fresh Control LLM run of the tiny config, and its trained model."""
    root = tmp_path_factory.mktemp("fresh")
    run = tiny_run_config("train.steps=2", "train.save_every=0", "train.eval_every=0")
    trainer = build_trainer(run, make_mesh("1"))
    train_loop(trainer, root, create_run_dir(root, trainer.run), progress=False)
    from jax_controlllm.checkpoint import load_model
    config, params = load_model(root)
    return trainer, config, params


@pytest.mark.parametrize("kind", ["release_export", "standalone"])
def test_continues_from_our_checkpoints_training_what_a_fresh_expansion_trains(expanded_run, kind, tmp_path):
    fresh, config, params = expanded_run
    path = tmp_path / kind
    if kind == "release_export":
        export_hf(config, params, path)
    else:
        save_model(config, params, path)
    trainer, start = continue_three_steps(path, tmp_path / "run")
    assert trainable_names(trainer) == trainable_names(fresh)
    assert trainer.model_config.expansion == config.expansion
    saved = to_hf_tensors(config, params)
    for name in ("model.layers.1.expanded_layer.mlp.up_proj.weight", "model.layers.3.interp_weight.fc.weight"):
        np.testing.assert_array_equal(start[name], saved[name])


def test_expansion_contradicting_the_checkpoint_or_plain_modes_fail_in_one_line(expanded_run, tmp_path):
    _, config, params = expanded_run
    save_model(config, params, tmp_path / "ckpt")
    same = tiny_run_config(f"base.path={tmp_path / 'ckpt'}")          # tiny.yaml restates the same expansion
    trained_model_config(same, base_model_config(same))
    run = tiny_run_config(f"base.path={tmp_path / 'ckpt'}", "expansion.merge_method=lerp",
                          "expansion.num_exp_layers=4")
    with pytest.raises(ConfigError) as err:
        base_model_config(run)
    message = str(err.value)
    assert "\n" not in message and message.startswith("expansion: contradicts")
    assert "merge_method (lerp here, dlerp in the checkpoint)" in message and "layers ([0, 1, 2, 3] here" in message
    for mode in ("full", "partial"):
        run = tiny_run_config(f"base.path={tmp_path / 'ckpt'}", "expansion=null", f"train.mode={mode}",
                              "train.trainable_layers=[1]")
        with pytest.raises(ConfigError, match=f"train.mode: {mode} is not defined .* --merge-back"):
            base_model_config(run)
