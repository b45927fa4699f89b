"""Evaluation: scores equal brute-force computations from the full forward pass; probes, multiple choice,
retention (a model against itself loses nothing, KL 0); input files with clear errors; the CLI."""
import json
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jax_controlllm import evaluate as ev
from jax_controlllm.config import ModelConfig
from jax_controlllm.evaluate import ChoiceQuestion, EvalInputError, Probe, scoring
from jax_controlllm.generate import generate_text
from jax_controlllm.model import forward, init_params


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    from transformers import AutoTokenizer

    from jax_controlllm.data.testing import build_tiny_tokenizer
    return AutoTokenizer.from_pretrained(str(build_tiny_tokenizer(tmp_path_factory.mktemp("tok"))))


@pytest.fixture(scope="module")
def model(tokenizer):
    config = ModelConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                         eos_token_id=tokenizer.eos_token_id, bos_token_id=None)
    params = init_params(config, jax.random.PRNGKey(0))
    return config, jax.tree.map(lambda x: x * 4 if x.ndim >= 3 else x, params)   # peaked predictions


def log_softmax_of(config, params, ids):
    return np.asarray(jax.nn.log_softmax(forward(config, params, jnp.asarray([ids]))[0], axis=-1))


# ----------------------------------------------------------------------------------------------
# Scores against brute force
# ----------------------------------------------------------------------------------------------

def test_continuation_scores_match_forward(model):
    config, params = model
    rng = np.random.default_rng(0)
    pairs = [(rng.integers(0, config.vocab_size, n).tolist(), rng.integers(0, config.vocab_size, m).tolist())
             for n, m in ((3, 2), (10, 1), (1, 5), (20, 3))]
    scores = ev.score_continuations(config, params, pairs, batch_size=2)
    for (ctx, cont), score in zip(pairs, scores):
        lp = log_softmax_of(config, params, ctx + cont)
        expected = sum(lp[len(ctx) - 1 + k, tok] for k, tok in enumerate(cont))
        assert score.logprob == pytest.approx(expected, abs=1e-4)
        first = lp[len(ctx) - 1]
        assert score.first_token_rank == 1 + int(np.sum(first > first[cont[0]]))
        assert score.greedy == all(lp[len(ctx) - 1 + k].argmax() == tok for k, tok in enumerate(cont))


def test_greedy_continuation_scores_as_greedy(model):
    config, params = model
    ctx = [5, 17, 42]
    lp = log_softmax_of(config, params, ctx)
    best = int(lp[-1].argmax())
    (score,) = ev.score_continuations(config, params, [(ctx, [best])])
    assert score.first_token_rank == 1 and score.greedy


def test_perplexity_matches_forward(model, tokenizer):
    config, params = model
    docs = ["The quick brown fox jumps over the lazy dog.", "What is the capital of France?"]
    batches = ev.text_batches(tokenizer, docs, seq_len=8, batch_size=3)
    assert all(b["input_ids"].shape[0] <= 3 and b["input_ids"].shape[1] <= 8 for b in batches)
    total, count = 0.0, 0
    for doc in docs:
        ids = tokenizer(doc)["input_ids"]
        for start in range(0, len(ids), 8):
            window = ids[start:start + 8]
            if len(window) < 2:
                continue
            lp = log_softmax_of(config, params, window)
            total -= sum(lp[t, window[t + 1]] for t in range(len(window) - 1))
            count += len(window) - 1
    result = ev.perplexity(config, params, batches)
    assert result["tokens"] == count
    assert result["loss"] == pytest.approx(total / count, rel=1e-5)
    assert result["perplexity"] == pytest.approx(np.exp(total / count), rel=1e-4)


def test_kl_matches_forward_and_is_zero_for_the_same_model(model):
    config, params = model
    other = jax.tree.map(lambda x: x * 1.1, params)
    ids = np.random.default_rng(1).integers(0, config.vocab_size, (2, 16)).astype(np.int32)
    mask = np.ones_like(ids)
    mask[1, 10:] = 0
    batch = {"input_ids": ids, "attention_mask": mask}
    assert ev.kl_from_base(config, params, config, params, [batch])["kl"] == pytest.approx(0.0, abs=1e-7)
    expected, n = 0.0, 0
    for row in range(2):
        length = int(mask[row].sum())
        p = log_softmax_of(config, other, ids[row, :length].tolist())
        b = log_softmax_of(config, params, ids[row, :length].tolist())
        expected += float(np.sum(np.exp(b) * (b - p)))
        n += length
    result = ev.kl_from_base(config, other, config, params, [batch])
    assert result["tokens"] == n
    assert result["kl"] == pytest.approx(expected / n, rel=1e-4)


# ----------------------------------------------------------------------------------------------
# Probes, multiple choice, retention
# ----------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def probes(model, tokenizer):
    """Probes the model gets right (answers taken from its own greedy output) and wrong."""
    config, params = model
    prompts = ["The quick brown", "What is the capital", "Control LLM grows", "hello world"]
    outputs = generate_text(config, params, tokenizer, prompts, max_new_tokens=6)
    right = [Probe(p, o.text.strip()[:4], f"right{i}") for i, (p, o) in enumerate(zip(prompts, outputs))
             if len(o.text.strip()) >= 4]
    assert len(right) >= 2, "the random model produced too little text to build probes"
    wrong = [Probe(p, "zzzq", f"wrong{i}") for i, p in enumerate(prompts[:2])]
    return right + wrong


def test_probe_accuracy(model, tokenizer, probes):
    config, params = model
    result = ev.probe_accuracy(config, params, tokenizer, probes, batch_size=4)
    by_id = {it["id"]: it for it in result["items"]}
    for probe in probes:
        assert by_id[probe.id]["exact_match"] == probe.id.startswith("right"), by_id[probe.id]
    n_right = sum(p.id.startswith("right") for p in probes)
    assert result["summary"]["exact_match"] == pytest.approx(n_right / len(probes))
    ranks = [it["first_token_rank"] for it in result["items"]]
    assert result["summary"]["hit@1"] == pytest.approx(np.mean(np.array(ranks) == 1))
    assert all(it["answer_logprob"] < 0 for it in result["items"])


def test_probe_matching_options(model, tokenizer, probes):
    config, params = model
    right = [p for p in probes if p.id.startswith("right")][:1]
    upper = [Probe(p.prompt, p.answer.upper(), p.id) for p in right]
    if upper[0].answer == right[0].answer:
        pytest.skip("answer has no letters to change case")
    assert not ev.probe_accuracy(config, params, tokenizer, upper)["items"][0]["exact_match"]
    assert ev.probe_accuracy(config, params, tokenizer, upper, case_sensitive=False)["items"][0]["exact_match"]


def test_retention_against_itself_loses_nothing(model, tokenizer, probes):
    config, params = model
    kl_batches = ev.text_batches(tokenizer, ["The quick brown fox jumps over the lazy dog."], 16, 2)
    report = ev.retention_report(config, params, config, params, tokenizer, probes, kl_batches)
    s = report["summary"]
    assert s["lost"] == 0 and s["gained"] == 0 and report["groups"]["lost"] == []
    assert s["kept"] == sum(p.id.startswith("right") for p in probes)
    assert s["retention"] == 1.0 and s["mean_logprob_change"] == 0.0
    assert s["kl_from_base"] == pytest.approx(0.0, abs=1e-7)


def test_retention_of_a_changed_model(model, tokenizer, probes):
    config, params = model
    changed = jax.tree.map(lambda x: x * 0.5, params)
    kl_batches = ev.text_batches(tokenizer, ["The quick brown fox jumps over the lazy dog."], 16, 2)
    base = ev.probe_accuracy(config, params, tokenizer, probes)
    report = ev.retention_report(config, changed, config, params, tokenizer, probes, kl_batches, base_results=base)
    s = report["summary"]
    assert s["kept"] + s["lost"] + s["gained"] + s["never"] == len(probes)
    assert s["kept"] + s["lost"] == sum(it["exact_match"] for it in base["items"])
    assert s["kl_from_base"] > 1e-4
    statuses = {it["id"]: it["status"] for it in report["items"]}
    for group, ids in report["groups"].items():
        assert all(statuses[i] == group for i in ids)


def test_multiple_choice_letter_scores_match_forward(model, tokenizer):
    config, params = model
    questions = [ChoiceQuestion("What is 2 + 2?", ["3", "4", "5"], 1, "math"),
                 ChoiceQuestion("Which is a fox?", ["quick", "brown", "fox", "dog"], 2, "animals"),
                 ChoiceQuestion("Capital of France?", ["Paris", "Rome"], 0, "geo")]
    result = ev.multiple_choice_accuracy(config, params, tokenizer, questions, few_shot=1, batch_size=2)
    letters = [tokenizer(" " + c, add_special_tokens=False)["input_ids"] for c in "ABCD"]
    for i, (q, item) in enumerate(zip(questions, result["items"])):
        shots = [s for j, s in enumerate(questions) if j != i][:1]
        prompt = tokenizer(ev.few_shot_prompt(q, shots))["input_ids"]
        expected = []
        for letter in letters[:len(q.choices)]:      # " A" may be several tokens: sum their log-probs
            lp = log_softmax_of(config, params, prompt + letter)
            expected.append(sum(lp[len(prompt) - 1 + k, t] for k, t in enumerate(letter)))
        np.testing.assert_allclose(item["choice_logprobs"], expected, atol=1e-4)
        assert item["predicted"] == "ABCD"[int(np.argmax(expected))]
    assert result["summary"]["accuracy"] == pytest.approx(np.mean([it["correct"] for it in result["items"]]))
    assert set(result["summary"]["by_subject"]) == {"math", "animals", "geo"}


def test_multiple_choice_text_scoring(model, tokenizer):
    config, params = model
    questions = [ChoiceQuestion("The quick brown", ["fox", "zzqx"], 0)]
    result = ev.multiple_choice_accuracy(config, params, tokenizer, questions, score="text")
    pairs = [ev.encode_pair(tokenizer, *ev.split_for_scoring(ev.few_shot_prompt(questions[0], []), c))
             for c in ("fox", "zzqx")]
    expected = [s.logprob for s in ev.score_continuations(config, params, pairs)]
    np.testing.assert_allclose(result["items"][0]["choice_logprobs"], expected, atol=1e-5)
    assert "accuracy_norm" in result["summary"]


def test_few_shot_prompt_format():
    q = ChoiceQuestion("Q2?", ["x", "y"], 1, "high_school_math")
    shot = ChoiceQuestion("Q1?", ["a", "b"], 0, "high_school_math")
    text = ev.few_shot_prompt(q, [shot])
    assert text == ("The following are multiple choice questions (with answers) about high school math.\n\n"
                    "Q1?\nA. a\nB. b\nAnswer: A\n\nQ2?\nA. x\nB. y\nAnswer:")


@pytest.mark.parametrize("prompt,answer,expected", [
    ("The capital of France is", "Paris", ("The capital of France is", " Paris")),
    ("The capital of France is ", "Paris", ("The capital of France is", " Paris")),
    ("Q: capital?\nA:\n", "Paris", ("Q: capital?\nA:\n", "Paris")),
    ("Say", " hi", ("Say", " hi")),
])
def test_split_for_scoring(prompt, answer, expected):
    assert ev.split_for_scoring(prompt, answer) == expected


# ----------------------------------------------------------------------------------------------
# Input files
# ----------------------------------------------------------------------------------------------

def write(path, lines):
    path.write_text("".join((json.dumps(x) if not isinstance(x, str) else x) + "\n" for x in lines))
    return path


def test_probe_file_errors(tmp_path):
    with pytest.raises(EvalInputError, match=r"probes.jsonl:2: field 'answer' is missing"):
        ev.read_probes(write(tmp_path / "probes.jsonl", [{"prompt": "a", "answer": "b"}, {"prompt": "c"}]))
    with pytest.raises(EvalInputError, match="is empty"):
        ev.read_probes(write(tmp_path / "empty.jsonl", ["", "  "]))
    with pytest.raises(EvalInputError, match=r"bad.jsonl:1: not valid JSON"):
        ev.read_probes(write(tmp_path / "bad.jsonl", ["{prompt: 1}"]))
    with pytest.raises(EvalInputError, match="does not exist"):
        ev.read_probes(tmp_path / "missing.jsonl")
    probes = ev.read_probes(write(tmp_path / "ok.jsonl", [{"prompt": "a", "answer": "b", "id": "x", "kind": "geo"}]))
    assert probes == [Probe("a", "b", "x", {"kind": "geo"})]


def test_choice_file_errors_and_answer_forms(tmp_path):
    ok = ev.read_choice_questions(write(tmp_path / "ok.jsonl", [
        {"question": "q", "choices": ["a", "b", "c"], "answer": "C"},
        {"question": "q", "choices": ["a", "b"], "answer": 0, "subject": "s"}]))
    assert [q.answer for q in ok] == [2, 0] and ok[1].subject == "s"
    with pytest.raises(EvalInputError, match=r":1: 'answer' must be a choice index"):
        ev.read_choice_questions(write(tmp_path / "a.jsonl", [{"question": "q", "choices": ["a", "b"], "answer": 2}]))
    with pytest.raises(EvalInputError, match=r":1: 'choices' must be a list"):
        ev.read_choice_questions(write(tmp_path / "b.jsonl", [{"question": "q", "choices": "ab", "answer": 0}]))


def test_document_file_errors(tmp_path):
    with pytest.raises(EvalInputError, match="has no text"):
        ev.read_documents(write(tmp_path / "d.txt", ["", " "]))
    with pytest.raises(EvalInputError, match=r"d.jsonl:1: field 'body' is missing"):
        ev.read_documents(write(tmp_path / "d.jsonl", [{"text": "x"}]), text_field="body")
    assert ev.read_documents(write(tmp_path / "e.txt", ["one", "", "two"])) == ["one", "two"]


def test_format_table():
    table = ev.format_table([{"a": 1, "b": "x" * 50}, {"a": 0.123456, "b": "y\nz"}], max_width=10)
    lines = table.splitlines()
    assert lines[0].split() == ["a", "b"] and len(lines) == 4
    assert "0.1235" in lines[3] and "y\\nz" in lines[3] and lines[2].endswith("…")


# ----------------------------------------------------------------------------------------------
# CLI: bad input fails fast, in one line, before any model is loaded
# ----------------------------------------------------------------------------------------------

def run_cli(*args, timeout=120):
    return subprocess.run([sys.executable, "-m", "launch.eval", *args], capture_output=True, text=True,
                          timeout=timeout)


def test_cli_probe_file_with_missing_field(tmp_path):
    path = write(tmp_path / "p.jsonl", [{"prompt": "The capital of France is"}])
    result = run_cli("probes", "--model", "smollm2", "--probes", str(path))
    assert result.returncode == 2
    assert "field 'answer' is missing" in result.stderr and "Traceback" not in result.stderr
    assert "loading" not in result.stderr


def test_cli_empty_data_file(tmp_path):
    path = tmp_path / "docs.txt"
    path.write_text("")
    result = run_cli("perplexity", "--model", "smollm2", "--data", str(path))
    assert result.returncode == 2 and "has no text" in result.stderr and "Traceback" not in result.stderr


# ----------------------------------------------------------------------------------------------
# SmolLM2 (slow)
# ----------------------------------------------------------------------------------------------

@pytest.mark.slow
def test_cli_smollm2_probes_and_retention(tmp_path, smollm2_hf_dir):
    probes = write(tmp_path / "probes.jsonl", [
        {"prompt": "The capital of France is", "answer": "Paris"},
        {"prompt": "The capital of Germany is", "answer": "Berlin"},
        {"prompt": "The chemical symbol for gold is", "answer": "Au"},
        {"prompt": "The capital of France is", "answer": "Rome", "id": "wrong"}])
    docs = write(tmp_path / "docs.txt", ["Paris is the capital and most populous city of France.",
                                         "The Roman Empire was the post-Republican state of ancient Rome."])
    out = tmp_path / "probes.json"
    result = run_cli("probes", "--model", str(smollm2_hf_dir), "--probes", str(probes), "--out", str(out),
                     timeout=600)
    assert result.returncode == 0, result.stderr
    items = {it["prompt"] + it["answer"]: it for it in json.loads(out.read_text())["items"]}
    assert items["The capital of France isParis"]["exact_match"]
    assert items["The capital of France isParis"]["first_token_rank"] == 1
    assert not items["The capital of France isRome"]["exact_match"]
    out = tmp_path / "retention.json"
    result = run_cli("retention", "--model", str(smollm2_hf_dir), "--base", str(smollm2_hf_dir),
                     "--probes", str(probes), "--kl-data", str(docs), "--out", str(out), timeout=600)
    assert result.returncode == 0, result.stderr
    summary = json.loads(out.read_text())["summary"]
    assert summary["lost"] == 0 and summary["gained"] == 0 and summary["kept"] >= 1
    assert summary["kl_from_base"] == pytest.approx(0.0, abs=1e-6)
    assert "kl_from_base" in result.stdout


@pytest.mark.slow
def test_smollm2_letter_scores_equal_continuation_scores(smollm2_hf_dir):
    """The one-forward letter path (" A" is one SmolLM2 token) agrees with scoring " A".. as continuations."""
    from transformers import AutoTokenizer

    from jax_controlllm.convert import load_hf
    config, params = load_hf(smollm2_hf_dir, dtype="float32")
    tokenizer = AutoTokenizer.from_pretrained(str(smollm2_hf_dir))
    assert len(tokenizer(" A", add_special_tokens=False)["input_ids"]) == 1
    questions = [ChoiceQuestion("What is 2 + 2?", ["3", "4", "5", "22"], 1, "math"),
                 ChoiceQuestion("Which planet is known as the Red Planet?", ["Venus", "Mars", "Jupiter"], 1),
                 ChoiceQuestion("What is the capital of Italy?", ["Rome", "Milan"], 0, "geography")]
    result = ev.multiple_choice_accuracy(config, params, tokenizer, questions, few_shot=1)
    for i, (q, item) in enumerate(zip(questions, result["items"])):
        prompt = ev.few_shot_prompt(q, [s for j, s in enumerate(questions) if j != i][:1])
        pairs = [ev.encode_pair(tokenizer, prompt, " " + "ABCD"[c]) for c in range(len(q.choices))]
        expected = [s.logprob for s in ev.score_continuations(config, params, pairs)]
        np.testing.assert_allclose(item["choice_logprobs"], expected, atol=2e-4)


def test_kl_over_chunks_equals_unchunked(model, monkeypatch):
    """Rows longer than SCORE_CHUNK are scored chunk by chunk; the sum must not change."""
    config, params = model
    other = jax.tree.map(lambda x: x * 0.5, params)   # a KL well above float32 rounding of log-probs
    ids = np.random.default_rng(2).integers(0, config.vocab_size, (2, 40)).astype(np.int32)
    mask = np.ones_like(ids)
    mask[0, 33:] = 0
    whole = ev.kl_from_base(config, other, config, params, [{"input_ids": ids, "attention_mask": mask}])
    monkeypatch.setattr(scoring, "SCORE_CHUNK", 16)
    scoring.kl_sum.clear_cache()
    chunked = ev.kl_from_base(config, other, config, params, [{"input_ids": ids, "attention_mask": mask}])
    scoring.kl_sum.clear_cache()
    assert chunked["tokens"] == whole["tokens"] == 73
    assert chunked["kl"] == pytest.approx(whole["kl"], rel=1e-5)
