"""Mesh parsing, axis names, rules and the shardings of parameters and batches."""
import jax
import pytest
from jax.sharding import PartitionSpec as P
from test_train_helpers import check, run_python

from jax_controlllm.config import ModelConfig
from jax_controlllm.model.params import param_shardings
from jax_controlllm.sharding import (
    DEFAULT_RULES,
    MeshError,
    ShardingError,
    batch_axes,
    batch_sharding,
    data_parallel_size,
    logical_to_spec,
    make_mesh,
    mesh_axis_names,
    mesh_rules,
    parse_mesh_shape,
)


@pytest.mark.parametrize("text, devices, dims", [
    ("4x8", 32, (4, 8)), ("2x2x8", 32, (2, 2, 8)), ("-1x8", 32, (4, 8)), ("8x-1", 16, (8, 2)), ("1", 1, (1,)),
    ("-1", 8, (8,)), ("2X4", 8, (2, 4)),
])
def test_parse_mesh_shape(text, devices, dims):
    assert parse_mesh_shape(text, devices) == dims


def test_mesh_size_mismatch_names_both_sizes_and_the_cpu_flag():
    with pytest.raises(MeshError) as err:
        parse_mesh_shape("4x8", 8, platform="cpu")
    message = str(err.value)
    assert "needs 32 devices but 8 are available" in message
    assert "--cpu-devices 32" in message and "--xla_force_host_platform_device_count=32" in message
    with pytest.raises(MeshError) as err:
        parse_mesh_shape("4x8", 8, platform="tpu")
    assert "xla_force_host_platform_device_count" not in str(err.value)


@pytest.mark.parametrize("text", ["4by8", "0x8", "-1x-1", "-2x4", ""])
def test_malformed_mesh_is_an_error(text):
    with pytest.raises(MeshError):
        parse_mesh_shape(text, 8)


def test_inferred_axis_must_divide_the_devices():
    with pytest.raises(MeshError, match="cannot be split"):
        parse_mesh_shape("-1x3", 8)


def test_axis_names_default_by_rank_and_explicit():
    assert mesh_axis_names(1) == ("fsdp",)
    assert mesh_axis_names(2) == ("fsdp", "tensor")
    assert mesh_axis_names(3) == ("data", "fsdp", "tensor")
    assert mesh_axis_names(2, ["data", "tensor"]) == ("data", "tensor")
    with pytest.raises(MeshError, match="one name per dimension"):
        mesh_axis_names(2, ["data"])
    with pytest.raises(MeshError, match="distinct"):
        mesh_axis_names(2, ["x", "x"])
    with pytest.raises(MeshError, match="explicit axis names"):
        mesh_axis_names(4)


def test_rules_override_defaults_and_reject_unknown_names():
    rules = mesh_rules({"embed": None, "mlp": ["fsdp", "tensor"], "vocab": "fsdp"})
    assert rules["embed"] is None and rules["mlp"] == ("fsdp", "tensor") and rules["vocab"] == ("fsdp",)
    assert rules["heads"] == DEFAULT_RULES["heads"]
    with pytest.raises(ShardingError, match="unknown logical axis 'embeddings'"):
        mesh_rules({"embeddings": "fsdp"})
    with pytest.raises(ShardingError, match="expected a mesh axis name"):
        mesh_rules({"embed": 3})


def test_single_device_mesh_and_batch_sharding():
    mesh = make_mesh("1")
    assert mesh.axis_names == ("fsdp",)
    assert mesh.axis_types == (jax.sharding.AxisType.Auto,)
    assert batch_axes(mesh) == ("fsdp",) and data_parallel_size(mesh) == 1
    assert batch_sharding(mesh).spec == P("fsdp", None)


def test_param_shardings_follow_logical_axes():
    config = ModelConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2)
    mesh = make_mesh("1", ["fsdp"])
    shardings = param_shardings(config, mesh)
    assert shardings["embed_tokens"]["embedding"].spec == P(None, "fsdp")       # (vocab, embed); no tensor axis
    kernel = shardings["layers"]["group_0"]["block_0"]["mlp"]["down_proj"]["kernel"]
    assert kernel.spec == P(None, None, "fsdp")                                  # (layers, mlp, embed)


def test_logical_to_spec_on_a_3d_mesh_and_non_dividing_dims():
    names, sizes = ("data", "fsdp", "tensor"), {"data": 2, "fsdp": 2, "tensor": 4}
    assert logical_to_spec(("act_batch", "act_seq", "act_mlp"), DEFAULT_RULES, names, (8, 16, 64), sizes) == \
        P(("data", "fsdp"), None, "tensor")
    # 6 heads do not split 4 ways: replicated rather than an error (tiny models on big meshes)
    assert logical_to_spec(("embed", "heads"), DEFAULT_RULES, names, (32, 6), sizes) == P("fsdp", None)


@pytest.mark.slow
def test_shardings_on_a_simulated_4x8_mesh():
    """32 CPU devices in a subprocess: parameters are FSDP over fsdp and tensor-parallel over tensor."""
    code = """
import jax
from jax.sharding import PartitionSpec as P
from jax_controlllm.config import ModelConfig
from jax_controlllm.model.params import param_shardings
from jax_controlllm.sharding import make_mesh, batch_sharding
config = ModelConfig(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                     num_attention_heads=8, num_key_value_heads=8)
mesh = make_mesh("4x8")
assert dict(mesh.shape) == {"fsdp": 4, "tensor": 8}, mesh.shape
s = param_shardings(config, mesh)
assert s["layers"]["group_0"]["block_0"]["mlp"]["up_proj"]["kernel"].spec == P(None, "fsdp", "tensor")
assert s["layers"]["group_0"]["block_0"]["self_attn"]["o_proj"]["kernel"].spec == P(None, "tensor", "fsdp")
assert s["lm_head"]["kernel"].spec == P("fsdp", "tensor")
shard = s["lm_head"]["kernel"].shard_shape((64, 256))
assert shard == (16, 32), shard
assert batch_sharding(mesh).spec == P("fsdp", None)
mesh3 = make_mesh("2x2x8", ["data", "fsdp", "tensor"])
assert batch_sharding(mesh3).spec == P(("data", "fsdp"), None)
try:
    make_mesh("8x8")
except Exception as err:
    assert "needs 64 devices but 32 are available" in str(err), err
else:
    raise AssertionError("8x8 on 32 devices should fail")
print("OK")
"""
    assert "OK" in check(run_python(code, devices=32)).stdout
