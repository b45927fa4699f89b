"""Hugging Face directories: bit-exact round trips, sharded checkpoints, and clear errors on bad input."""
import json
import shutil
import struct

import jax
import numpy as np
import pytest
from hf_models import make_hf_llama

from jax_controlllm.config import ModelConfig
from jax_controlllm.convert import ConversionError, from_hf_tensors, load_hf, save_hf, to_hf_tensors
from jax_controlllm.convert.safetensors_io import SafetensorsDir, SafetensorsError, read_header, save_file
from jax_controlllm.model import init_params

pytest.importorskip("torch")


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("hf") / "llama"
    make_hf_llama(path, num_key_value_heads=2)
    return path


def test_round_trip_hf_ours_hf_is_bit_exact(hf_dir, tmp_path):
    config, params = load_hf(hf_dir, dtype="float32")
    save_hf(config, params, tmp_path / "out")
    before, after = SafetensorsDir(hf_dir), SafetensorsDir(tmp_path / "out")
    assert set(before) == set(after)
    for name in before:
        assert before[name].dtype == after[name].dtype
        np.testing.assert_array_equal(before[name], after[name])


def test_saved_directory_loads_in_transformers(hf_dir, tmp_path):
    import torch
    from transformers import AutoModelForCausalLM

    config, params = load_hf(hf_dir, dtype="float32")
    save_hf(config, params, tmp_path / "out")
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "out", torch_dtype=torch.float32)
    assert model.config.num_key_value_heads == 2


def test_tree_mapping_works_for_gradients_and_back():
    config = ModelConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=3,
                         num_attention_heads=2)
    params = init_params(config, jax.random.PRNGKey(0))
    tensors = to_hf_tensors(config, params)
    assert tensors["model.layers.2.self_attn.q_proj.weight"].shape == (16, 16)
    assert tensors["model.layers.0.mlp.down_proj.weight"].shape == (16, 32)  # [out, in]
    back = from_hf_tensors(config, tensors)
    jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), np.asarray(b)), params, back)
    grads = jax.tree.map(lambda x: x * 0 + 1, params)
    assert set(to_hf_tensors(config, grads)) == set(tensors)


def test_sharded_checkpoint_with_index_loads(hf_dir, tmp_path):
    config, params = load_hf(hf_dir, dtype="float32")
    total = sum(v.nbytes for v in to_hf_tensors(config, params).values())
    save_hf(config, params, tmp_path / "sharded", max_shard_bytes=total // 3 + 1)
    shards = sorted(p.name for p in (tmp_path / "sharded").glob("*.safetensors"))
    assert len(shards) >= 3 and (tmp_path / "sharded" / "model.safetensors.index.json").is_file()
    _, again = load_hf(tmp_path / "sharded", dtype="float32")
    jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), np.asarray(b)), params, again)


def _copy_with(hf_dir, tmp_path, edit):
    out = tmp_path / "edited"
    shutil.copytree(hf_dir, out)
    tensors = dict(SafetensorsDir(out))
    edit(tensors)
    (out / "model.safetensors").unlink()
    save_file(tensors, out / "model.safetensors")
    return out


def test_missing_tensor_names_tensor_and_file(hf_dir, tmp_path):
    out = _copy_with(hf_dir, tmp_path, lambda t: t.pop("model.layers.1.mlp.up_proj.weight"))
    with pytest.raises(ConversionError, match=r"model\.layers\.1\.mlp\.up_proj\.weight.*edited"):
        load_hf(out)


def test_shape_mismatch_names_expected_and_found(hf_dir, tmp_path):
    def edit(t):
        t["model.layers.0.self_attn.q_proj.weight"] = np.zeros((64, 32), np.float32)
    out = _copy_with(hf_dir, tmp_path, edit)
    with pytest.raises(ConversionError, match=r"expected shape \(64, 64\), found \(64, 32\)"):
        load_hf(out)


def test_unsupported_architecture_names_supported(hf_dir, tmp_path):
    out = tmp_path / "mistral"
    shutil.copytree(hf_dir, out)
    cfg = json.loads((out / "config.json").read_text())
    cfg.update(model_type="gpt2", architectures=["GPT2LMHeadModel"])
    (out / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ConversionError, match="supported: LlamaForCausalLM"):
        load_hf(out)


def test_truncated_safetensors_is_an_error(hf_dir, tmp_path):
    out = tmp_path / "trunc"
    shutil.copytree(hf_dir, out)
    data = (out / "model.safetensors").read_bytes()
    (out / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(ConversionError, match="truncated"):
        load_hf(out)


def test_absurd_header_rejected_before_allocation(tmp_path):
    bad = tmp_path / "bad.safetensors"
    header = json.dumps({"w": {"dtype": "F32", "shape": [1 << 40, 1 << 20], "data_offsets": [0, 1 << 62]}}).encode()
    bad.write_bytes(struct.pack("<Q", len(header)) + header + b"\0" * 16)
    with pytest.raises(SafetensorsError, match="truncated or corrupt"):
        read_header(bad)
    bad.write_bytes(struct.pack("<Q", 1 << 60) + b"{}")
    with pytest.raises(SafetensorsError, match="header claims"):
        read_header(bad)


def test_pickled_bin_refused_without_opt_in(hf_dir, tmp_path):
    out = tmp_path / "pickled"
    out.mkdir()
    shutil.copy(hf_dir / "config.json", out / "config.json")
    (out / "pytorch_model.bin").write_bytes(b"not really a pickle")
    with pytest.raises(ConversionError, match="allow_pickle=True"):
        load_hf(out)


def test_failed_save_leaves_no_partial_directory(tmp_path, monkeypatch):
    config = ModelConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                         num_attention_heads=2)
    params = init_params(config, jax.random.PRNGKey(0))
    import jax_controlllm.convert.hf as hf

    def boom(*a, **k):
        raise OSError("disk full")

    monkeypatch.setattr(hf, "save_file", boom)
    with pytest.raises(OSError):
        save_hf(config, params, tmp_path / "out")
    assert not (tmp_path / "out").exists()
    assert not list(tmp_path.iterdir())
