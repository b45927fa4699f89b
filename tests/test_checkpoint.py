"""Checkpoints: round trips, retention, atomicity under a crash, resharding restore, model exports."""
import json
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from test_train_helpers import REPO, check, run_python, subprocess_env

from jax_controlllm.checkpoint import (
    RunCheckpoints,
    load_model,
    model_config_from_json,
    model_config_to_json,
    save_model,
)
from jax_controlllm.config import ConfigError, ExpansionConfig


@pytest.fixture(scope="module")
def tiny_expanded(tiny_model):
    exp = ExpansionConfig(expand_type="concat", num_exp_layers=1, merge_method="dlerp")
    return tiny_model(vocab_size=64, num_hidden_layers=2, expansion=exp)


def assert_trees_equal(a, b):
    assert jax.tree.structure(a) == jax.tree.structure(b)
    jax.tree.map(lambda x, y: np.testing.assert_array_equal(np.asarray(x), np.asarray(y)), a, b)


def test_model_config_json_round_trip_keeps_the_expansion(tiny_expanded):
    config, _ = tiny_expanded
    back = model_config_from_json(json.loads(json.dumps(model_config_to_json(config))))
    assert back == config and isinstance(back.expansion, ExpansionConfig)
    assert back.expansion.num_ori_layers == 2


def test_run_checkpoint_round_trip(tmp_path, tiny_expanded):
    config, params = tiny_expanded
    opt_state = {"mu": jax.tree.map(lambda x: x * 2, params), "count": jnp.int32(7)}
    ckpts = RunCheckpoints(tmp_path, keep_last=2)
    ckpts.save(3, params, opt_state, config, {"format": "synthetic/1", "batches": 3})
    ckpts.wait()
    assert ckpts.latest_step() == 3
    assert ckpts.read_model_config(3) == config
    targets = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding),
                           (params, opt_state))
    restored = ckpts.restore(3, *targets)
    assert restored.step == 3 and restored.model_config == config
    assert restored.data_state == {"format": "synthetic/1", "batches": 3}
    assert_trees_equal(restored.params, params)
    assert_trees_equal(restored.opt_state, opt_state)
    ckpts.close()


def test_retention_keeps_the_last_n_and_every_kth(tmp_path, tiny_expanded):
    tree = {"w": jnp.arange(4.0)}
    config, _ = tiny_expanded
    ckpts = RunCheckpoints(tmp_path, keep_last=2, keep_every=4)
    for step in range(1, 10):
        ckpts.save(step, tree, tree, config, {"batches": step})
    ckpts.close()
    on_disk = sorted(int(p.name) for p in (tmp_path / "checkpoints").iterdir() if p.name.isdigit())
    assert on_disk == [4, 8, 9]


def test_load_model_from_run_step_and_export(tmp_path, tiny_expanded):
    config, params = tiny_expanded
    ckpts = RunCheckpoints(tmp_path / "run")
    for step in (1, 2):
        ckpts.save(step, jax.tree.map(lambda x, s=step: x * s, params), {"count": jnp.int32(step)}, config, {})
    ckpts.close()
    loaded_config, latest = load_model(tmp_path / "run")
    assert loaded_config == config
    assert_trees_equal(latest, jax.tree.map(lambda x: x * 2, params))
    _, first = load_model(tmp_path / "run" / "checkpoints" / "1", as_numpy=True)
    assert isinstance(jax.tree.leaves(first)[0], np.ndarray)
    assert_trees_equal(first, params)

    export = save_model(config, params, tmp_path / "export")
    assert (export / "model_config.json").is_file()
    exported_config, exported = load_model(export)
    assert exported_config == config
    assert_trees_equal(exported, params)
    with pytest.raises(FileExistsError, match="already exists"):
        save_model(config, params, export)
    from jax_controlllm.convert.auto import load_pretrained  # the lead's loader finds our exports too
    assert load_pretrained(export)[0] == config
    with pytest.raises(ConfigError, match="not a checkpoint"):
        load_model(tmp_path)


CRASH_MID_SAVE = """
import os, sys
import jax.numpy as jnp
from jax_controlllm.checkpoint import RunCheckpoints
from jax_controlllm.config import ModelConfig
ckpts = RunCheckpoints(sys.argv[1], async_save=True)
small = {"w": jnp.ones((4,))}
ckpts.save(1, small, small, ModelConfig(), {"batches": 1})
ckpts.wait()
big = {"w": jnp.ones((64, 1024, 1024))}   # 256 MiB: still being written when the process dies
ckpts.save(2, big, big, ModelConfig(), {"batches": 2})
print("saving step 2", flush=True)
os._exit(9)
"""


def test_a_crash_mid_save_leaves_no_checkpoint_that_restore_would_pick(tmp_path):
    result = subprocess.run([sys.executable, "-c", CRASH_MID_SAVE, str(tmp_path)], cwd=REPO,
                            env=subprocess_env(), capture_output=True, text=True, timeout=300)
    assert result.returncode == 9 and "saving step 2" in result.stdout, result.stderr
    entries = sorted(p.name for p in (tmp_path / "checkpoints").iterdir())
    assert "2" not in entries, entries
    assert any(name.startswith("2.orbax-checkpoint-tmp") for name in entries), entries  # the interrupted save
    assert RunCheckpoints(tmp_path, read_only=True).latest_step() == 1
    reopened = RunCheckpoints(tmp_path)      # a new run cleans the leftovers up and resumes from step 1
    assert reopened.latest_step() == 1
    reopened.close()
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["1"]


SAVE_ON_4X8 = """
import sys, jax, numpy as np
from jax_controlllm.checkpoint import RunCheckpoints
from jax_controlllm.sharding import make_mesh
from jax_controlllm.train import build_trainer
from test_train_helpers import find_leaf, tiny_run_config
run = tiny_run_config()
trainer = build_trainer(run, make_mesh("4x8"))
spec = find_leaf(trainer.state.trainable, "expanded_layer", "mlp", "up_proj", "kernel").sharding.spec
assert tuple(spec) == (None, "fsdp", "tensor"), spec
opt_state = jax.tree.map(lambda x: x + (1 if x.dtype.kind == "i" else 1.5), trainer.state.opt_state)  # not zeros
ckpts = RunCheckpoints(sys.argv[1])
ckpts.save(0, trainer.params(), opt_state, trainer.model_config, {"format": "synthetic/1", "batches": 0})
ckpts.close()
np.savez(sys.argv[2], *[np.asarray(x) for x in jax.tree.leaves((trainer.params(), opt_state))])
print("saved")
"""

RESTORE_ON_2X4 = """
import sys, jax, numpy as np
from jax_controlllm.sharding import make_mesh
from jax_controlllm.train import build_trainer
from jax_controlllm.train.rundir import open_checkpoints
from test_train_helpers import find_leaf, tiny_run_config
run = tiny_run_config()
mesh = make_mesh("2x4")
trainer = build_trainer(run, mesh, open_checkpoints(sys.argv[1], run))
assert trainer.start_step == 0 and trainer.source == "checkpoint step 0", trainer.source
restored = jax.tree.leaves((trainer.params(), trainer.state.opt_state))
saved = np.load(sys.argv[2])
assert len(restored) == len(saved.files)
for i, x in enumerate(restored):
    np.testing.assert_array_equal(np.asarray(x), saved[f"arr_{i}"])
kernel = find_leaf(trainer.state.trainable, "expanded_layer", "mlp", "up_proj", "kernel")
assert kernel.sharding.mesh.shape == {"fsdp": 2, "tensor": 4}, kernel.sharding.mesh.shape
expected = (kernel.shape[0], 64 // 2, 128 // 4)      # (repeats, embed over fsdp, mlp over tensor)
assert kernel.addressable_shards[0].data.shape == expected, kernel.addressable_shards[0].data.shape
print("restored")
"""


@pytest.mark.slow
def test_checkpoint_from_4x8_restores_on_2x4(tmp_path):
    arrays = tmp_path / "saved.npz"
    env_code = "import sys; sys.path.insert(0, 'tests')\n"
    assert "saved" in check(run_python(env_code + SAVE_ON_4X8.replace("sys.argv[1]", repr(str(tmp_path)))
                                       .replace("sys.argv[2]", repr(str(arrays))), devices=32)).stdout
    assert "restored" in check(run_python(env_code + RESTORE_ON_2X4.replace("sys.argv[1]", repr(str(tmp_path)))
                                          .replace("sys.argv[2]", repr(str(arrays))), devices=8)).stdout
