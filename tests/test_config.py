"""Config loading: YAML + dotted overrides, unknown keys with suggestions, type errors naming the field; configs
are immutable, hashable and typed in every section."""
import copy
import dataclasses
import json
import pickle

import pytest

from jax_controlllm.config import (
    ConfigError,
    DataConfig,
    FrozenDict,
    KnowledgeConfig,
    ModelConfig,
    ReportConfig,
    SourceConfig,
    load_config,
    to_dict,
)


def test_yaml_and_overrides(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("model:\n  hidden_size: 64\n  num_attention_heads: 4\ntrain:\n  lr: 5e-5\n"
                    "expansion:\n  merge_method: lerp\n  num_exp_layers: 4\n")
    config = load_config(path, ["train.lr=1e-4", "expansion.merge_method=dlerp", "train.steps=7"])
    assert config.train.lr == pytest.approx(1e-4) and isinstance(config.train.lr, float)
    assert config.expansion.merge_method == "dlerp" and config.train.steps == 7
    assert config.model.head_dim == 16


def test_unknown_key_suggests_closest(tmp_path):
    with pytest.raises(ConfigError, match=r"unknown config key 'model.hiden_size'; did you mean 'hidden_size'"):
        load_config(data={"model": {"hiden_size": 3}})
    with pytest.raises(ConfigError, match=r"train.lr_warmup"):
        load_config(data={}, overrides=["train.lr_warmup=3"])


def test_wrong_types_name_the_field():
    with pytest.raises(ConfigError, match=r"train.steps: expected an integer"):
        load_config(data={"train": {"steps": 2.5}})
    with pytest.raises(ConfigError, match=r"train.lr: expected a number"):
        load_config(data={"train": {"lr": "fast"}})
    with pytest.raises(ConfigError, match=r"model: expected a mapping"):
        load_config(data={"model": [1, 2]})


def test_validation_names_the_field():
    with pytest.raises(ConfigError, match=r"expansion.merge_method"):
        load_config(data={"expansion": {"merge_method": "avg"}})
    with pytest.raises(ConfigError, match=r"model.num_key_value_heads"):
        load_config(data={"model": {"num_attention_heads": 6, "num_key_value_heads": 4}})
    with pytest.raises(ConfigError, match="does not exist"):
        load_config("/nonexistent.yaml")


def test_null_is_accepted_for_an_optional_union_field():
    """expansion.layers is Optional[Union[list, str]]: every checkpoint's model config holds ``layers: null``, and
    a resume reads it back."""
    from jax_controlllm.config import ExpansionConfig, from_dict
    assert from_dict(ExpansionConfig, {"layers": None}).layers is None
    assert from_dict(ExpansionConfig, {"layers": "auto"}).layers == "auto"


IMMUTABLE = {"model": {"hidden_size": 64, "num_attention_heads": 4, "eos_token_id": [1, 2],
                       "rope_scaling": {"rope_type": "linear", "factor": 2.0}},
             "expansion": {"num_exp_layers": 2, "layers": [1, 3]},
             "mesh": {"axes": ["fsdp"], "rules": {"embed": ["fsdp"]}},
             "train": {"trainable_layers": [0]}}


def test_configs_are_frozen_with_tuples_and_read_only_mappings():
    run = load_config(data=IMMUTABLE)
    assert run.expansion.layers == (1, 3) and run.mesh.axes == ("fsdp",) and run.train.trainable_layers == (0,)
    assert run.model.eos_token_id == (1, 2) and run.mesh.rules == {"embed": ("fsdp",)}
    assert isinstance(run.model.rope_scaling, FrozenDict)
    with pytest.raises(dataclasses.FrozenInstanceError):
        run.model.hidden_size = 8
    with pytest.raises(dataclasses.FrozenInstanceError):
        run.data = {}
    for mutate in (lambda m: m.__setitem__("factor", 4.0), lambda m: m.update(factor=4.0),
                   lambda m: m.pop("factor"), lambda m: m.clear(), lambda m: m.setdefault("x", 1)):
        with pytest.raises(TypeError, match="read-only"):
            mutate(run.model.rope_scaling)
    assert run.model.rope_scaling["factor"] == 2.0
    # constructed in code, lists become tuples too
    assert ModelConfig(eos_token_id=[3, 4], rope_scaling={"rope_type": "linear"}).eos_token_id == (3, 4)


def test_a_config_is_its_own_hash_key_and_stays_plain_data():
    first, second = load_config(data=IMMUTABLE), load_config(data=IMMUTABLE)
    assert first == second and hash(first) == hash(second) and hash(first.model) == hash(second.model)
    assert first.model != dataclasses.replace(first.model, hidden_size=128)
    assert {first.model: 1}[second.model] == 1
    assert pickle.loads(pickle.dumps(first)) == first and copy.deepcopy(first) == first
    json.dumps(dataclasses.asdict(first))                          # tuples and FrozenDicts serialise as JSON
    plain = to_dict(first)
    assert plain["expansion"]["layers"] == [1, 3] and type(plain["model"]["rope_scaling"]) is dict
    assert plain["mesh"]["rules"] == {"embed": ["fsdp"]}
    assert load_config(data=plain) == first                        # the record loads back to the same config


def test_every_section_is_typed_at_load():
    run = load_config(data={"data": {"sources": ["a.jsonl", {"path": "b.jsonl", "weight": 2}]},
                            "knowledge": {"n_new": 3, "attributes": ["city"]}, "report": {}})
    assert isinstance(run.data, DataConfig) and isinstance(run.knowledge, KnowledgeConfig)
    assert isinstance(run.report, ReportConfig) and run.report.batch_size == 32
    assert run.data.sources == (SourceConfig(path="a.jsonl"), SourceConfig(path="b.jsonl", weight=2.0))
    assert run.knowledge.attributes == ("city",)
    assert load_config(data={}).knowledge is None and load_config(data={}).data == DataConfig()


@pytest.mark.parametrize("data, message", [
    ({"data": {"sources": ["a.jsonl"], "shufle": True}}, "unknown config key 'data.shufle'; did you mean 'shuffle'"),
    ({"data": {"sources": [{"path": "a.jsonl", "wieght": 2}]}}, "unknown config key 'data.sources\\[0\\].wieght'"),
    ({"data": {"sources": ["a.jsonl"], "mode": "chat"}}, "data.mode: 'chat' is not one of"),
    ({"data": {"source": "synthetic", "sources": ["a.jsonl"]}}, "'data.sources' for the synthetic source"),
    ({"data": {"source": "generated"}}, "data.source: 'generated' is not a data source"),
    ({"data": {"sources": ["a.jsonl"], "min_doc_len": 4}}, "data.min_doc_len: only for source: synthetic"),
    ({"knowledge": {"n_nwe": 3}}, "unknown config key 'knowledge.n_nwe'; did you mean 'n_new'"),
    ({"knowledge": {"attributes": ["shoe_size"]}}, "knowledge: knowledge attributes \\['shoe_size'\\] are unknown"),
    ({"report": {"kl": False}}, "unknown config key 'report.kl'"),
    ({"report": {"batch_size": 0}}, "report.batch_size: must be at least 1"),
    ({"eval": {}}, "unknown config key 'eval'"),
    ({"expansion": {"freeze_ori_non_layers": False}}, "unknown config key 'expansion.freeze_ori_non_layers'"),
])
def test_sections_refuse_bad_values_at_load_in_one_line(data, message):
    with pytest.raises(ConfigError, match=message) as err:
        load_config(data=data)
    assert "\n" not in str(err.value)


def test_a_deep_model_is_checked_without_listing_its_layers():
    with pytest.raises(ConfigError, match="model.num_hidden_layers: .* more than any model has"):
        load_config(data={"model": {"num_hidden_layers": 2**70}, "expansion": {"num_exp_layers": 2}})
    with pytest.raises(ConfigError, match=r"the release.s rule .* selects 5 layers, not 4.* layers: \[1, 3, 5, 7\]"):
        load_config(data={"model": {"num_hidden_layers": 10}, "expansion": {"num_exp_layers": 4}})
    from jax_controlllm.config import ExpansionConfig, selected_layers
    for depth in range(1, 40):                       # the rule, counted, selects what listing it selected
        for n in range(1, depth + 1):
            split = max(depth // n, 1)
            listed = [i for i in range(depth) if (i + 1) % split == 0]
            if len(listed) == n:
                assert selected_layers(ExpansionConfig(num_exp_layers=n), depth) == listed
