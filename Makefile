# Every target creates .venv on a fresh machine and installs what it needs from pyproject.toml.
PYTHON_BASE ?= python3
VENV := .venv
BIN := $(VENV)/bin
PNEUMOSCAN_DATA ?= $(abspath ../shared/data/chest_xray)
export PNEUMOSCAN_DATA

.PHONY: demo test lint format bench release-model clean

$(BIN)/python:
	$(PYTHON_BASE) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip

# Scoring needs no TensorFlow: the demo installs only the scoring code and the local stack.
$(VENV)/.scoring: pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install --quiet -e '.[scoring,local]'
	touch $@

$(VENV)/.dev: pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install --quiet -e '.[scoring,local,training,dev]'
	touch $@ $(VENV)/.scoring

demo: $(VENV)/.scoring
	$(BIN)/pneumoscan demo

test: $(VENV)/.dev
	$(BIN)/python -m pytest

lint: $(VENV)/.dev
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy

format: $(VENV)/.dev
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .

# Reproduces the committed release model from the full training data (about 30 minutes on 2 CPU cores).
release-model: $(VENV)/.dev
	rm -rf models/release
	$(BIN)/pneumoscan train --data $(PNEUMOSCAN_DATA) --output models/release

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache

# Benchmarks print figures and write bench/results.json; they are never timed tests.
bench: $(VENV)/.dev
	$(BIN)/python bench/scoring.py
