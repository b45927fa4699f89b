"""``python -m launch.convert``: exports of our checkpoints load in transformers with our logits, release-format
and merged-back exports reload with the right logits, imports round-trip, and wrong inputs fail in one line."""
import json
import os
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest

from jax_controlllm.checkpoint import save_model
from jax_controlllm.config import ExpansionConfig, ModelConfig
from jax_controlllm.convert import load_hf, save_hf
from jax_controlllm.model import forward, init_params
from jax_controlllm.model.expand import expand
from launch import convert

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory):
    from jax_controlllm.data.testing import build_tiny_tokenizer
    return build_tiny_tokenizer(tmp_path_factory.mktemp("tok") / "tokenizer")


@pytest.fixture(scope="module")
def plain(tokenizer_dir):
    config = ModelConfig(vocab_size=400, hidden_size=32, intermediate_size=64, num_hidden_layers=4,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                         rms_norm_eps=1e-6, bos_token_id=None, eos_token_id=2)
    params = init_params(config, jax.random.PRNGKey(0))
    params = jax.tree.map(lambda x: x + 0.05 * np.random.default_rng(x.size).standard_normal(x.shape).astype(x.dtype)
                          if x.ndim == 2 and x.shape[-1] == 32 and x.shape[0] != 400 else x, params)  # random norms
    return config, params


def expanded(plain, merge_method: str):
    config, params = plain
    config2, params2 = expand(config, params, ExpansionConfig(expand_type="concat", num_exp_layers=2,
                                                             merge_method=merge_method, interpolation_factor=0.3),
                              jax.random.PRNGKey(1))

    def nudge(path, x):   # the expanded branch differs from the pretrained one, as after training
        inside = any(getattr(p, "key", None) == "expanded_layer" for p in path)
        return x + 0.02 * jax.random.normal(jax.random.PRNGKey(len(path)), x.shape, x.dtype) if inside else x

    return config2, jax.tree_util.tree_map_with_path(nudge, params2)


def checkpoint(tmp_path, model, tokenizer_dir=None):
    """A standalone export of ours, with the tokenizer saved beside the params (as the training run does)."""
    path = save_model(*model, tmp_path / "ckpt")
    if tokenizer_dir is not None:
        import shutil
        shutil.copytree(tokenizer_dir, path / "tokenizer")
    return path


def sample(config):
    return convert.sample_ids(config.vocab_size, config.max_position_embeddings, seed=3)


def transformers_logits(path, ids):
    model = transformers.AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32).eval()
    with torch.no_grad():
        return model(torch.tensor(np.asarray(ids), dtype=torch.long)).logits.numpy()


# ----------------------------------------------------------------------------------------------
# orbax-to-hf
# ----------------------------------------------------------------------------------------------

def test_plain_export_loads_in_transformers_with_our_logits(tmp_path, plain, tokenizer_dir, capsys):
    ckpt = checkpoint(tmp_path, plain, tokenizer_dir)
    out = tmp_path / "hf"
    convert.main(["orbax-to-hf", "--ckpt", str(ckpt), "--out", str(out)])
    assert f"ok: wrote {out}" in capsys.readouterr().out
    assert json.loads((out / "config.json").read_text())["architectures"] == ["LlamaForCausalLM"]
    assert (out / "tokenizer.json").read_bytes() == (tokenizer_dir / "tokenizer.json").read_bytes()
    tokenizer_config = json.loads((out / "tokenizer_config.json").read_text())
    assert tokenizer_config["model_input_names"] == ["input_ids", "attention_mask"]
    source_class = json.loads((tokenizer_dir / "tokenizer_config.json").read_text()).get("tokenizer_class")
    assert tokenizer_config.get("tokenizer_class") == (   # a class transformers 4.49 knows too
        "PreTrainedTokenizerFast" if source_class == "TokenizersBackend" else source_class)
    assert (out.stat().st_mode & 0o777) == 0o777 & ~current_umask()   # like any new directory, not mkdtemp's 0700
    ids = sample(plain[0])
    np.testing.assert_allclose(transformers_logits(out, ids), np.asarray(forward(*plain, ids)), atol=1e-4, rtol=0)
    tokenizer = transformers.AutoTokenizer.from_pretrained(str(out))
    assert tokenizer.eos_token == "<|im_end|>"
    model = transformers.AutoModelForCausalLM.from_pretrained(str(out), dtype=torch.float32).eval()
    generated = model.generate(**tokenizer("the cat", return_tensors="pt"), max_new_tokens=3, do_sample=False)
    assert generated.shape[1] >= 3


def current_umask() -> int:
    umask = os.umask(0)
    os.umask(umask)
    return umask


def test_release_format_export_reloads_with_our_logits(tmp_path, plain):
    model = expanded(plain, "dlerp")
    ckpt = checkpoint(tmp_path, model)
    report = convert.orbax_to_hf(str(ckpt), str(tmp_path / "hf"), format="release", tokenizer=None)
    hf = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert hf["architectures"] == ["CausalLMExpansion"] and hf["expansion"]["merge_method"] == "dlerp"
    assert report["max_abs_logit_error"] <= 1e-5
    config, params = load_hf(tmp_path / "hf")
    ids = sample(config)
    np.testing.assert_allclose(np.asarray(forward(config, params, ids)), np.asarray(forward(*model, ids)), atol=1e-5)


def test_release_format_export_names_a_base_config_that_resolves_offline_from_anywhere(tmp_path, plain):
    """The release's loader runs AutoConfig.from_pretrained(expansion.expanded_from) before loading the weights."""
    ckpt = checkpoint(tmp_path, expanded(plain, "slerp"))
    convert.main(["orbax-to-hf", "--ckpt", str(ckpt), "--out", str(tmp_path / "hf")])
    expanded_from = json.loads((tmp_path / "hf" / "config.json").read_text())["expansion"]["expanded_from"]
    assert Path(expanded_from).is_absolute() and Path(expanded_from).parent == (tmp_path / "hf").resolve()
    (tmp_path / "elsewhere").mkdir()
    code = ("import sys, transformers; c = transformers.AutoConfig.from_pretrained(sys.argv[1]); "
            "print(c.model_type, c.num_hidden_layers, c.hidden_size)")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    result = subprocess.run([sys.executable, "-c", code, expanded_from], cwd=tmp_path / "elsewhere", env=env,
                            capture_output=True, text=True, timeout=300, check=False)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.split() == ["llama", str(plain[0].num_hidden_layers), str(plain[0].hidden_size)]
    convert.main(["orbax-to-hf", "--ckpt", str(ckpt), "--out", str(tmp_path / "hub"),
                  "--expanded-from", "someone/base-model"])
    hub = json.loads((tmp_path / "hub" / "config.json").read_text())
    assert hub["expansion"]["expanded_from"] == "someone/base-model" and not (tmp_path / "hub" / "base_config").exists()


@pytest.mark.parametrize("method", ["lerp", "dlerp"])
def test_merged_back_export_loads_in_transformers(tmp_path, plain, tokenizer_dir, method):
    from jax_controlllm.convert.hf import from_hf_tensors, to_hf_tensors
    from jax_controlllm.convert.merge_back import merge_back_tensors, merged_config

    model = expanded(plain, method)
    ckpt = checkpoint(tmp_path, model, tokenizer_dir)
    out = tmp_path / "merged"
    report = convert.orbax_to_hf(str(ckpt), str(out), merge_back=True)
    assert json.loads((out / "config.json").read_text())["architectures"] == ["LlamaForCausalLM"]
    config = merged_config(model[0])
    merged = from_hf_tensors(config, merge_back_tensors(model[0], to_hf_tensors(*model)))
    ids = sample(config)
    np.testing.assert_allclose(transformers_logits(out, ids), np.asarray(forward(config, merged, ids)),
                               atol=1e-4, rtol=0)
    # the merge is a different function: the drift from the unmerged model is measured and reported
    assert report["max_abs_logit_drift"] > 0 and 0 <= report["argmax_agreement"] <= 1
    assert report["max_abs_logit_error"] <= 1e-4


def test_bfloat16_export_is_checked_against_rounded_weights(tmp_path, plain):
    ckpt = checkpoint(tmp_path, plain)
    report = convert.orbax_to_hf(str(ckpt), str(tmp_path / "hf"), dtype="bfloat16")
    assert json.loads((tmp_path / "hf" / "config.json").read_text())["torch_dtype"] == "bfloat16"
    assert report["max_abs_logit_error"] <= 1e-4


# ----------------------------------------------------------------------------------------------
# hf-to-orbax and gguf-to-hf
# ----------------------------------------------------------------------------------------------

def test_hf_to_orbax_round_trip(tmp_path, plain, tokenizer_dir, capsys):
    from jax_controlllm.checkpoint import load_model
    from jax_controlllm.tokenizer import find_tokenizer_dir, write_tokenizer

    save_hf(*plain, tmp_path / "hf")
    write_tokenizer(tokenizer_dir, tmp_path / "hf")
    convert.main(["hf-to-orbax", "--hf", str(tmp_path / "hf"), "--out", str(tmp_path / "orbax")])
    assert "ok: wrote" in capsys.readouterr().out
    config, params = load_model(tmp_path / "orbax")
    for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(plain[1])):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert find_tokenizer_dir(tmp_path / "orbax") == tmp_path / "orbax" / "tokenizer"


@pytest.mark.slow
def test_gguf_to_hf_smollm2(tmp_path):
    convert.main(["gguf-to-hf", "--gguf", "smollm2", "--out", str(tmp_path / "hf")])
    assert json.loads((tmp_path / "hf" / "config.json").read_text())["num_hidden_layers"] == 30
    assert (tmp_path / "hf" / "tokenizer.json").is_file()


# ----------------------------------------------------------------------------------------------
# Wrong inputs: one line naming the problem and the fix
# ----------------------------------------------------------------------------------------------

def fails(capsys, *argv) -> str:
    with pytest.raises(SystemExit) as exit_info:
        convert.main(list(argv))
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    return err.strip().splitlines()[-1]


def test_wrong_kind_of_input(tmp_path, plain, capsys):
    save_hf(*plain, tmp_path / "hf")
    line = fails(capsys, "orbax-to-hf", "--ckpt", str(tmp_path / "hf"), "--out", str(tmp_path / "o"))
    assert "is a Hugging Face directory" in line and "hf-to-orbax" in line
    ckpt = checkpoint(tmp_path, plain)
    line = fails(capsys, "hf-to-orbax", "--hf", str(ckpt), "--out", str(tmp_path / "o"))
    assert "one of our (Orbax) checkpoints" in line and "orbax-to-hf" in line
    line = fails(capsys, "gguf-to-hf", "--gguf", str(tmp_path / "hf"), "--out", str(tmp_path / "o"))
    assert "hf-to-orbax" in line
    line = fails(capsys, "orbax-to-hf", "--ckpt", str(tmp_path / "nothing"), "--out", str(tmp_path / "o"))
    assert line.startswith("error: --ckpt") and "does not exist" in line and "base.path" not in line
    (tmp_path / "empty").mkdir()
    line = fails(capsys, "orbax-to-hf", "--ckpt", str(tmp_path / "empty"), "--out", str(tmp_path / "o"))
    assert line.startswith("error: --ckpt") and "not a checkpoint" in line


def test_format_and_merge_back_mismatches(tmp_path, plain, capsys):
    plain_ckpt = checkpoint(tmp_path / "p", plain)
    line = fails(capsys, "orbax-to-hf", "--ckpt", str(plain_ckpt), "--out", str(tmp_path / "o"), "--merge-back")
    assert "nothing to merge back" in line
    exp_ckpt = checkpoint(tmp_path / "e", expanded(plain, "dlerp"))
    line = fails(capsys, "orbax-to-hf", "--ckpt", str(exp_ckpt), "--out", str(tmp_path / "o"), "--format", "plain")
    assert "--merge-back" in line and "--format release" in line
    line = fails(capsys, "orbax-to-hf", "--ckpt", str(exp_ckpt), "--out", str(tmp_path / "o"), "--merge-back",
                 "--format", "release")
    assert "drop --format release" in line
    assert not (tmp_path / "o").exists()


def test_existing_output_needs_overwrite(tmp_path, plain, capsys):
    ckpt = checkpoint(tmp_path, plain)
    (tmp_path / "hf").mkdir()
    line = fails(capsys, "orbax-to-hf", "--ckpt", str(ckpt), "--out", str(tmp_path / "hf"))
    assert "already exists" in line and "--overwrite" in line


def test_training_run_step_directory_exports_and_generates(tmp_path, plain, tokenizer_dir):
    """A step directory of a training run (RUN/checkpoints/<step>) with the run's tokenizer in RUN/tokenizer."""
    import shutil

    import jax.numpy as jnp

    from jax_controlllm.checkpoint import RunCheckpoints
    from jax_controlllm.generate import generate_text, load_for_inference

    run = tmp_path / "run"
    manager = RunCheckpoints(run, async_save=False)
    manager.save(5, plain[1], {"mu": jnp.zeros(2)}, plain[0], {"position": 0})
    manager.close()
    shutil.copytree(tokenizer_dir, run / "tokenizer")
    step = run / "checkpoints" / "5"
    config, params, tokenizer = load_for_inference(step)
    assert tokenizer.eos_token == "<|im_end|>"
    assert generate_text(config, params, tokenizer, ["The quick"], max_new_tokens=3)[0].tokens
    report = convert.orbax_to_hf(str(step), str(tmp_path / "hf"))
    assert report["max_abs_logit_error"] <= 1e-5 and (tmp_path / "hf" / "tokenizer.json").is_file()


def test_python_export_carries_the_tokenizer(tmp_path, plain, tokenizer_dir):
    """export_hf is what `make train` writes runs/*/hf with."""
    from jax_controlllm.convert.export import export_hf
    report = export_hf(*expanded(plain, "lerp"), tmp_path / "hf", tokenizer=tokenizer_dir)
    assert {"tokenizer.json", "tokenizer_config.json"} <= set(report["tokenizer_files"])
    assert transformers.AutoTokenizer.from_pretrained(str(tmp_path / "hf")).model_input_names == [
        "input_ids", "attention_mask"]
    assert (tmp_path / "hf" / "base_config" / "config.json").is_file()
