"""Hostile run configs: random bytes, wrong types, absurd values, YAML alias bombs. ``load_config`` either returns
a validated RunConfig or raises a ConfigError with a message; never another exception, never a hang."""
import copy
import dataclasses
import time
import typing

import pytest
import yaml
from harness import TINY
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from jax_controlllm.config import ConfigError, RunConfig, load_config, unwrap_optional

PROPERTY = settings(max_examples=50, deadline=None, suppress_health_check=[HealthCheck.too_slow])
TINY_DATA = yaml.safe_load(TINY.read_text())


def load_or_config_error(*args, **kwargs) -> None:
    start = time.perf_counter()
    try:
        load_config(*args, **kwargs)
    except ConfigError as err:
        assert str(err).strip(), "a ConfigError without a message"
    assert time.perf_counter() - start < 10


def field_paths(cls, prefix=()) -> list[tuple]:
    """Dotted paths of every field of the run config, nested sections included."""
    hints = typing.get_type_hints(cls)
    paths = []
    for f in dataclasses.fields(cls):
        paths.append(prefix + (f.name,))
        inner = unwrap_optional(hints[f.name])
        if dataclasses.is_dataclass(inner) and inner is not cls:
            paths.extend(field_paths(inner, prefix + (f.name,)))
    return paths


FIELDS = field_paths(RunConfig) + [("data", "source"), ("data", "min_doc_len"), ("bogus",), ("train", "bogus")]
SCALARS = st.one_of(st.none(), st.booleans(), st.integers(-2**70, 2**70), st.floats(), st.text(max_size=16),
                    st.sampled_from(["0", "-1", "1e999", ".nan", "4x8", "concat", "dlerp", "fsdp"]))
VALUES = st.recursive(SCALARS, lambda inner: st.one_of(st.lists(inner, max_size=4),
                                                       st.dictionaries(st.text(max_size=8), inner, max_size=4)),
                      max_leaves=8)
SMALL_INTS = st.one_of(st.integers(-3, 70), st.lists(st.integers(-3, 70), max_size=5))


def set_path(data: dict, path: tuple, value) -> None:
    """data[path[0]][path[1]]... = value, replacing whatever is not a mapping on the way."""
    node = data
    for key in path[:-1]:
        if not isinstance(node.get(key), dict):
            node[key] = {}
        node = node[key]
    node[path[-1]] = value


EVERY_KIND = [None, True, 0, 1, -1, 2**70, 1.5, float("nan"), "", "x", "auto", [], [1], [1, "a"], [[1]], {}, {"a": 1}]


@pytest.mark.parametrize("path", FIELDS, ids=".".join)
def test_every_kind_of_value_in_every_field(path):
    """Deterministic sweep (the random search below found `expansion.layers: 1` only on some seeds)."""
    for value in EVERY_KIND:
        data = copy.deepcopy(TINY_DATA)
        set_path(data, path, value)
        load_or_config_error(data=data)


@PROPERTY
@given(st.lists(st.tuples(st.sampled_from(FIELDS), st.one_of(VALUES, SMALL_INTS)), min_size=1, max_size=4))
def test_any_value_in_any_field_is_accepted_or_named(edits):
    data = copy.deepcopy(TINY_DATA)
    for path, value in edits:
        set_path(data, path, value)
    load_or_config_error(data=data)


@PROPERTY
@given(st.one_of(st.binary(max_size=2000), st.text(max_size=1000).map(str.encode),
                 st.lists(st.sampled_from([b"model:", b"  hidden_size: 64", b"train: {steps: x}", b"- 1", b"&a [*a]",
                                           b"\t", b"\xff", b"key: [1, 2", b"? [a]", b": b", b"!!binary eA=="]),
                          max_size=8).map(b"\n".join)))
def test_random_bytes_as_a_config_file(tmp_path_factory, content):
    path = tmp_path_factory.mktemp("config") / "run.yaml"
    path.write_bytes(content)
    load_or_config_error(path)


OVERRIDE_KEYS = st.sampled_from(["train.lr", "train", "model.hidden_size", "expansion", "expansion.layers",
                                 "mesh.shape", "data", "data.source", "a.b.c", "", ".", "train..lr",
                                 "model.vocab_size.x", "base.path"])
OVERRIDE_VALUES = st.one_of(st.text(max_size=24), st.sampled_from(
    ["null", "[1, 2", "{a: 1}", "!!python/object/apply:os.system [ls]", "&a [*a]", "1e999", "-.inf", ".nan",
     "[]", "{}", "2020-01-01", "[" * 100]))


@PROPERTY
@given(st.lists(st.one_of(st.builds("{}={}".format, OVERRIDE_KEYS, OVERRIDE_VALUES), st.text(max_size=24)),
                max_size=4))
def test_random_overrides(overrides):
    load_or_config_error(TINY, overrides)


def test_an_override_nested_too_deeply_for_yaml_is_taken_as_text():
    with pytest.raises(ConfigError, match=r"model: expected a mapping, got str '\[\[\["):
        load_config(TINY, ["model=" + "[" * 2000])


def alias_bomb(levels: int = 9) -> str:
    """Nine levels of nine aliases: 9**9 (387 million) values once expanded, from 1 kB of YAML."""
    lines = ["a0: &a0 [x, x, x, x, x, x, x, x, x]"]
    lines += [f"a{i}: &a{i} [{', '.join([f'*a{i - 1}'] * 9)}]" for i in range(1, levels)]
    return "\n".join(lines) + f"\nmodel: *a{levels - 1}\n"


@pytest.mark.parametrize("text, message", [
    (alias_bomb(), "expands to more than"),
    ("model: &m\n  x: *m\n", "expands to more than"),                # a mapping that contains itself
    ("data: &d [*d]\n", "expands to more than"),
    ("model: " + "[" * 50_000 + "]" * 50_000 + "\n", "nested more deeply"),
    ("out_dir: 2020-01-01\n", "not plain data"),
    ("data: !!set {a, b}\n", "not plain data"),
    ("model: !!python/object/apply:os.system [echo]\n", "not valid YAML"),
    ("train: {steps: .nan}\n", "train.steps: expected an integer"),
    ("model: {num_attention_heads: 0}\n", "model.num_attention_heads: must be at least 1"),
    ("train: {log_every: 0}\n", "train.log_every: must be at least 1"),
    ("train: {grad_accum: 0}\n", "train.grad_accum: must be at least 1"),
    ("model: {hidden_size: null}\n", "model.hidden_size: expected an integer, got null"),
    ("expansion: {layers: [1, null]}\n", "expansion.layers: expected a list of layer indices"),
    ("train: {lr: " + "9" * 400 + "}\n", "out of range"),
])
def test_hostile_yaml_is_refused_quickly_with_a_named_reason(tmp_path, text, message):
    path = tmp_path / "run.yaml"
    path.write_text(text)
    start = time.perf_counter()
    with pytest.raises(ConfigError, match=message):
        load_config(path)
    assert time.perf_counter() - start < 10


@pytest.mark.parametrize("override", ["expansion.layers=&a [*a]", "train=&a {x: *a}", "model.rope_scaling=&a [*a, *a]"])
def test_an_override_that_refers_to_itself_is_one_config_error(override):
    with pytest.raises(ConfigError) as err:
        load_config(TINY, [override])
    assert "override" in str(err.value) and "\n" not in str(err.value)
