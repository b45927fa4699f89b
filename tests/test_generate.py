"""KV-cache decoding: equal to recomputing the full forward, for plain and expanded models; sampling rules;
stopping; streaming text; and the real SmolLM2 against transformers (slow)."""
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jax_controlllm.config import ExpansionConfig
from jax_controlllm.generate import (
    GenerationError,
    Sampling,
    TextStream,
    generate_ids,
    generate_text,
    init_cache,
    sample_next,
    sorted_descending,
)
from jax_controlllm.model import forward
from jax_controlllm.model.expand import expand
from jax_controlllm.tokenizer import TokenizerError, chat_prompt

VOCAB = 101


# the shared tiny model with this file's vocabulary, no special tokens
GENERATE_MODEL = dict(vocab_size=VOCAB, rms_norm_eps=1e-6, eos_token_id=None, bos_token_id=None)


def sharpened(params, scale: float = 4.0):
    """Random weights scaled up so next-token distributions are peaked (no near-ties for argmax)."""
    return jax.tree.map(lambda x: x * scale if x.ndim >= 3 or x.shape[0] == VOCAB else x, params)


def perturb_expanded(params, seed: int = 7):
    """After expand() the expanded branch equals the pretrained one; make it differ."""
    key = [jax.random.PRNGKey(seed)]

    def walk(tree, inside_expanded=False):
        if isinstance(tree, dict):
            return {k: walk(v, inside_expanded or k == "expanded_layer") for k, v in tree.items()}
        if not inside_expanded:
            return tree
        key[0], sub = jax.random.split(key[0])
        return tree + 0.05 * jax.random.normal(sub, tree.shape, tree.dtype)

    return walk(params)


REFERENCE_LEN = 48
_REFERENCE_FORWARD = {}     # one compiled reference per config across the module's tests


def uncached_greedy(config, params, prompt, n):
    """Reference: recompute the whole forward pass for every new token, one prompt at a time. The row is
    right-padded to a fixed length (one compilation); causal attention keeps the padding out of the logits
    that are read."""
    if config not in _REFERENCE_FORWARD:
        _REFERENCE_FORWARD[config] = jax.jit(lambda p, ids: forward(config, p, ids))
    full = _REFERENCE_FORWARD[config]
    ids = list(prompt)
    assert len(ids) + n <= REFERENCE_LEN
    for _ in range(n):
        row = jnp.asarray([ids + [0] * (REFERENCE_LEN - len(ids))])
        ids.append(int(jnp.argmax(full(params, row)[0, len(ids) - 1])))
    return ids[len(prompt):]


def mixed_prompts(seed: int = 0, lengths=(5, 1, 17, 9)):
    rng = np.random.default_rng(seed)
    return [rng.integers(0, VOCAB, n).tolist() for n in lengths]


@pytest.fixture(scope="module")
def plain(tiny_model):
    config, params = tiny_model(**GENERATE_MODEL)
    return config, sharpened(params)


def expanded(plain, **expansion):
    config, params = plain
    config2, params2 = expand(config, params, ExpansionConfig(**expansion), jax.random.PRNGKey(1))
    return config2, perturb_expanded(params2)


# ----------------------------------------------------------------------------------------------
# Cached decoding == uncached argmax decoding
# ----------------------------------------------------------------------------------------------

def test_cached_greedy_equals_uncached_plain(plain):
    config, params = plain
    prompts = mixed_prompts()
    out = generate_ids(config, params, prompts, 12)
    for prompt, gen in zip(prompts, out):
        assert gen.finish_reason == "length"
        assert gen.tokens == uncached_greedy(config, params, prompt, 12)


@pytest.mark.parametrize("expansion", [
    dict(expand_type="concat", num_exp_layers=2, merge_method="dlerp"),
    dict(expand_type="concat", num_exp_layers=4, merge_method="lerp", interpolation_factor=0.5),
    dict(expand_type="hybrid", num_exp_layers=2, merge_method="dlerp"),
], ids=["concat-dlerp", "concat-lerp-all", "hybrid-dlerp"])
def test_cached_greedy_equals_uncached_expanded(plain, expansion):
    config, params = expanded(plain, **expansion)
    prompts = mixed_prompts(seed=1, lengths=(3, 12, 1))
    out = generate_ids(config, params, prompts, 10)
    reference = [uncached_greedy(config, params, p, 10) for p in prompts]
    assert [g.tokens for g in out] == reference
    # the expanded branch matters: the same prompts decode differently without it
    assert reference != [uncached_greedy(*plain, p, 10) for p in prompts]


def test_cache_mirrors_layers_with_both_branches(plain):
    config, params = expanded(plain, expand_type="concat", num_exp_layers=2, merge_method="dlerp")
    cache = init_cache(config, batch=2, length=64)
    assert cache.keys() == params["layers"].keys()
    for seg, blocks in params["layers"].items():
        for name, block in blocks.items():
            repeats = jax.tree.leaves(block)[0].shape[0]
            if "expanded_layer" in block:
                assert set(cache[seg][name]) == {"pretrained_layer", "expanded_layer"}
                leaf = cache[seg][name]["expanded_layer"]["k"]
            else:
                leaf = cache[seg][name]["k"]
            assert leaf.shape == (repeats, 2, 64, config.num_key_value_heads, config.head_dim)


def test_batch_result_does_not_depend_on_batch_company(plain):
    config, params = plain
    prompts = mixed_prompts(seed=3, lengths=(2, 30, 7))
    alone = [generate_ids(config, params, [p], 6)[0].tokens for p in prompts]
    assert [g.tokens for g in generate_ids(config, params, prompts, 6)] == alone


# ----------------------------------------------------------------------------------------------
# Sampling
# ----------------------------------------------------------------------------------------------

def test_top_k_and_top_p_limit_the_candidates():
    probs = np.array([0.5, 0.3, 0.15, 0.05], np.float32)
    logits = jnp.log(jnp.asarray(np.tile(probs, (512, 1))))
    key = jax.random.PRNGKey(0)
    assert set(np.asarray(sample_next(logits, key, (1.0, 2, 1.0))).tolist()) == {0, 1}
    assert set(np.asarray(sample_next(logits, key, (1.0, 0, 0.7))).tolist()) == {0, 1}
    assert set(np.asarray(sample_next(logits, key, (1.0, 0, 0.85))).tolist()) == {0, 1, 2}
    assert set(np.asarray(sample_next(logits, key, (1.0, 0, 1.0))).tolist()) == {0, 1, 2, 3}
    assert set(np.asarray(sample_next(logits, key, (0.0, 0, 1.0))).tolist()) == {0}
    # low temperature concentrates the mass on the argmax
    cold = np.asarray(sample_next(logits, key, (0.05, 0, 1.0)))
    assert np.mean(cold == 0) > 0.99


def test_sorted_descending_is_xla_sort_reversed_under_jit_and_vmap():
    """The top-p sort (NumPy on the CPU) gives exactly XLA's sorted values, -inf and ties included, so sampled text
    does not depend on which sort ran."""
    x = np.array(jax.random.normal(jax.random.PRNGKey(1), (3, 4, 1000)))
    x[0, 0, :10], x[1, 2, 5:50] = -np.inf, 0.25
    expected = np.asarray(jnp.sort(jnp.asarray(x), axis=-1))[..., ::-1]
    np.testing.assert_array_equal(np.asarray(jax.jit(sorted_descending)(x)), expected)
    np.testing.assert_array_equal(np.asarray(jax.vmap(sorted_descending)(x)), expected)
    logits = jnp.asarray(x[1])
    for seed in range(3):
        key = jax.random.PRNGKey(seed)
        reference = np.asarray(jax.random.categorical(key, _top_p_reference(logits / 0.8, 0.95), axis=-1))
        np.testing.assert_array_equal(np.asarray(sample_next(logits, key, (0.8, 0, 0.95))), reference)


def _top_p_reference(logits, top_p):
    """Top-p masking with XLA's own sort (what sample_next computed before the sort moved to NumPy on the CPU)."""
    ordered = jnp.sort(logits, axis=-1)[:, ::-1]
    probs = jax.nn.softmax(ordered, axis=-1)
    mass_before = jnp.cumsum(probs, axis=-1) - probs
    cutoff = jnp.min(jnp.where(mass_before < top_p, ordered, jnp.inf), axis=-1, keepdims=True)
    return jnp.where(logits < cutoff, -jnp.inf, logits)


def test_sampling_is_seeded_and_top_k_1_is_greedy(plain):
    config, params = plain
    prompts = mixed_prompts(seed=4, lengths=(4, 6))
    hot = Sampling(temperature=3.0, seed=5)
    first = [g.tokens for g in generate_ids(config, params, prompts, 16, hot)]
    assert [g.tokens for g in generate_ids(config, params, prompts, 16, hot)] == first
    other = [g.tokens for g in generate_ids(config, params, prompts, 16, Sampling(temperature=3.0, seed=6))]
    assert other != first
    greedy = [g.tokens for g in generate_ids(config, params, prompts, 16)]
    assert [g.tokens for g in generate_ids(config, params, prompts, 16, Sampling(1.0, top_k=1, seed=9))] == greedy
    assert [g.tokens for g in generate_ids(config, params, prompts, 16, Sampling(1.0, top_p=1e-6))] == greedy


@pytest.mark.parametrize("bad", [Sampling(temperature=-1), Sampling(top_k=-2), Sampling(top_p=0.0),
                                 Sampling(top_p=1.5)])
def test_bad_sampling_values_are_rejected(plain, bad):
    with pytest.raises(GenerationError):
        generate_ids(*plain, [[1, 2]], 4, bad)


# ----------------------------------------------------------------------------------------------
# Stopping
# ----------------------------------------------------------------------------------------------

def test_stops_at_eos_per_row(plain):
    config, params = plain
    prompts = mixed_prompts(seed=5, lengths=(4, 8))
    full = generate_ids(config, params, prompts, 10)
    eos = full[0].tokens[3]
    cut = full[0].tokens.index(eos)
    out = generate_ids(config, params, prompts, 10, eos_ids=[eos])
    assert out[0].tokens == full[0].tokens[:cut] and out[0].finish_reason == "eos"
    if eos not in full[1].tokens:
        assert out[1].tokens == full[1].tokens and out[1].finish_reason == "length"


def test_on_token_streams_and_stops(plain):
    config, params = plain
    seen = []

    def on_token(row, token):
        seen.append((row, token))
        return row == 0 and len([r for r, _ in seen if r == 0]) == 3

    out = generate_ids(config, params, mixed_prompts(seed=6, lengths=(3, 5)), 8, on_token=on_token)
    assert out[0].finish_reason == "stop" and len(out[0].tokens) == 3
    assert out[1].finish_reason == "length" and len(out[1].tokens) == 8
    assert [t for r, t in seen if r == 1] == out[1].tokens


def test_empty_prompt_and_zero_budget_are_errors(plain):
    with pytest.raises(GenerationError, match="prompt 1 is empty"):
        generate_ids(*plain, [[1], []], 4)
    with pytest.raises(GenerationError, match="max_new_tokens"):
        generate_ids(*plain, [[1]], 0)


# ----------------------------------------------------------------------------------------------
# Text: streaming, stop strings, chat templates
# ----------------------------------------------------------------------------------------------

class CharTokenizer:
    """One character per token id (ord), enough to test incremental detokenisation."""

    def decode(self, ids, skip_special_tokens=True):
        return "".join(chr(i) for i in ids)


def feed(stream, text):
    return [stream.push(ord(c)) for c in text]


def test_text_stream_holds_back_possible_stop_strings():
    stream = TextStream(CharTokenizer(), stop=["STOP"])
    deltas = feed(stream, "abSTxSTOPyz")
    assert "".join(deltas) == "abSTx" and stream.stopped and stream.text == "abSTx"
    # "ST" is withheld until the next character rules the stop string out
    assert deltas[:5] == ["a", "b", "", "", "STx"]


def test_text_stream_withholds_incomplete_characters():
    class Bytes:
        def decode(self, ids, skip_special_tokens=True):
            return bytes(ids).decode("utf-8", errors="replace")

    stream = TextStream(Bytes())
    encoded = "é!".encode()
    assert [stream.push(b) for b in encoded] == ["", "é", "!"]
    assert stream.finish() == ""


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    from transformers import AutoTokenizer

    from jax_controlllm.data.testing import build_tiny_tokenizer
    return AutoTokenizer.from_pretrained(str(build_tiny_tokenizer(tmp_path_factory.mktemp("tok"))))


@pytest.fixture(scope="module")
def text_model(tokenizer, tiny_model):
    return tiny_model(seed=2, **{**GENERATE_MODEL, "vocab_size": len(tokenizer),
                                 "eos_token_id": tokenizer.eos_token_id})


def test_generate_text_streams_what_it_returns(tokenizer, text_model):
    config, params = text_model
    streamed = {}
    out = generate_text(config, params, tokenizer, ["The quick brown", "What is"], max_new_tokens=12,
                        on_text=lambda i, s: streamed.__setitem__(i, streamed.get(i, "") + s))
    for i, completion in enumerate(out):
        assert completion.text == tokenizer.decode(completion.tokens, skip_special_tokens=True)
        assert streamed.get(i, "") == completion.text


def test_generate_text_cuts_at_stop_string(tokenizer, text_model):
    config, params = text_model
    full = generate_text(config, params, tokenizer, ["The quick brown"], max_new_tokens=12)[0]
    stop = full.text[3:5]
    if not stop:
        pytest.skip("the random model produced too little text")
    cut = generate_text(config, params, tokenizer, ["The quick brown"], max_new_tokens=12, stop=[stop])[0]
    assert cut.finish_reason == "stop" and cut.text == full.text[:full.text.index(stop)]


def test_chat_prompt_uses_template_and_errors_without_one(tokenizer, tmp_path):
    text = chat_prompt(tokenizer, "hello", system="be brief")
    assert text.startswith("<|im_start|>system\nbe brief<|im_end|>") and text.endswith("<|im_start|>assistant\n")
    from transformers import AutoTokenizer

    from jax_controlllm.data.testing import build_tiny_tokenizer
    base = AutoTokenizer.from_pretrained(str(build_tiny_tokenizer(tmp_path / "base", chat_template=False)))
    with pytest.raises(TokenizerError, match="no chat template"):
        chat_prompt(base, "hello")


def test_empty_text_prompt_is_an_error(tokenizer, text_model):
    with pytest.raises(GenerationError, match="prompt 1 is empty"):
        generate_text(*text_model, tokenizer, ["ok", ""], max_new_tokens=2)


def test_cli_rejects_empty_prompt_file(tmp_path):
    empty = tmp_path / "prompts.txt"
    empty.write_text("\n\n")
    result = subprocess.run([sys.executable, "-m", "launch.generate", "--model", "smollm2", "--prompt-file",
                             str(empty)], capture_output=True, text=True, timeout=120)
    assert result.returncode == 2
    assert "has no prompts" in result.stderr and "Traceback" not in result.stderr


def test_cli_rejects_checkpoint_without_tokenizer(tmp_path):
    model = tmp_path / "export"
    (model / "params").mkdir(parents=True)
    (model / "model_config.json").write_text("{}")
    result = subprocess.run([sys.executable, "-m", "launch.generate", "--model", str(model), "hi"],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 2
    assert "no tokenizer found" in result.stderr and "--tokenizer" in result.stderr
    assert "Traceback" not in result.stderr


def test_cli_missing_model_names_the_flag(tmp_path):
    result = subprocess.run([sys.executable, "-m", "launch.generate", "--model", str(tmp_path / "nothing"), "hi"],
                            capture_output=True, text=True, timeout=120, check=False)
    assert result.returncode == 2
    line = result.stderr.strip().splitlines()[-1]
    assert "--model" in line and "does not exist" in line and "base.path" not in line


# ----------------------------------------------------------------------------------------------
# The real SmolLM2-135M-Instruct (slow)
# ----------------------------------------------------------------------------------------------

@pytest.mark.slow
def test_cli_smollm2_chat_answers_paris():
    result = subprocess.run([sys.executable, "-m", "launch.generate", "--model", "smollm2", "--chat",
                             "What is the capital of France?", "--max-new-tokens", "24"],
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr
    assert "Paris" in result.stdout


@pytest.mark.slow
def test_smollm2_greedy_matches_transformers(smollm2_hf_dir):
    torch = pytest.importorskip("torch")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from jax_controlllm.convert import load_hf

    config, params = load_hf(smollm2_hf_dir, dtype="float32")
    tokenizer = AutoTokenizer.from_pretrained(str(smollm2_hf_dir))
    prompts = ["The history of the Roman Empire", "def fibonacci(n):",
               chat_prompt(tokenizer, "Write a short poem about the sea.")]
    ours = [g.tokens for g in generate_ids(config, params, [tokenizer(p, add_special_tokens=False)["input_ids"]
                                                            for p in prompts], 32)]   # no EOS: 32 tokens each
    model = AutoModelForCausalLM.from_pretrained(str(smollm2_hf_dir), dtype=torch.float32).eval()
    for prompt, tokens in zip(prompts, ours):
        ids = torch.tensor([tokenizer(prompt, add_special_tokens=False)["input_ids"]])
        with torch.no_grad():
            theirs = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=32, do_sample=False,
                                    eos_token_id=None, pad_token_id=tokenizer.pad_token_id)
        assert tokens == theirs[0, ids.shape[1]:].tolist()
