"""Config loading: YAML + dotted overrides, unknown keys with suggestions, type errors naming the field."""
import pytest

from jax_controlllm.config import ConfigError, load_config


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
