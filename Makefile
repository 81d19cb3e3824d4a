# Every target creates its virtual environment on a fresh machine and installs what it needs from pyproject.toml.
PYTHON_BASE ?= python3
VENV := .venv
BIN := $(VENV)/bin
# Infrastructure tools (SAM CLI, cfn-lint, checkov) live in their own environment: their pins clash with moto's.
INFRA_VENV := .venv-infra
PNEUMOSCAN_DATA ?= $(abspath ../shared/data/chest_xray)
export PNEUMOSCAN_DATA

.PHONY: demo test lint format bench soak release-model recipe-search site-calibration-demo lock clean

# setuptools warns on every editable install that a folder named like a package may take precedence over it (the
# layout is deliberate: functions/ holds the Lambda packages); a newcomer should not learn to ignore warnings.
EDITABLE_PIP := PYTHONWARNINGS='ignore:Editable installation' $(BIN)/python -m pip

$(BIN)/python:
	$(PYTHON_BASE) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip

# Scoring needs no TensorFlow: the demo installs only the scoring code and the local stack.
$(VENV)/.scoring: pyproject.toml | $(BIN)/python
	$(EDITABLE_PIP) install --quiet -e '.[scoring,local]'
	touch $@

$(VENV)/.dev: pyproject.toml | $(BIN)/python
	$(EDITABLE_PIP) install --quiet -e '.[scoring,local,training,dev]'
	touch $@ $(VENV)/.scoring

$(INFRA_VENV)/.installed: infra/requirements-tools.txt
	$(PYTHON_BASE) -m venv $(INFRA_VENV)
	$(INFRA_VENV)/bin/python -m pip install --quiet --upgrade pip
	$(INFRA_VENV)/bin/python -m pip install --quiet -r infra/requirements-tools.txt
	touch $@

demo: $(VENV)/.scoring
	$(BIN)/pneumoscan demo

test: $(VENV)/.dev $(INFRA_VENV)/.installed
	$(BIN)/python -m pytest

lint: $(VENV)/.dev
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy
	$(BIN)/hadolint training/Dockerfile

format: $(VENV)/.dev
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .

# Reproduces the committed release model from the full training data (the teacher, the student distilled from it,
# and the choice between them; about 40 minutes on 2 CPU cores). The model of the two that is not served is kept,
# complete, beside the release for the side-by-side comparison; the served model's Keras form is moved beside it
# too: only the benchmark's TensorFlow comparison uses it.
release-model: $(VENV)/.dev
	rm -rf models/release models/release-keras models/release-teacher models/release-student
	$(BIN)/pneumoscan train --data $(PNEUMOSCAN_DATA) --output models/release --search-results runs/search/search.json \
		--student-architecture none
	for role in teacher student; do \
		if [ -d models/release/alternatives/$$role ]; then \
			mv models/release/alternatives/$$role models/release-$$role && rm models/release-$$role/model.keras; \
		fi; \
	done
	rm -rf models/release/alternatives
	mkdir -p models/release-keras
	mv models/release/model.keras models/release-keras/model.keras

# The bounded recipe search (validation and its stress suite only; about 45 minutes on 2 CPU cores): its winner is
# what release-model trains.
recipe-search: $(VENV)/.dev
	$(BIN)/pneumoscan search --data $(PNEUMOSCAN_DATA) --output runs/search

# The README's site-calibration demonstration: the official test split as a new site, halved by patient; scores the
# test split once (recorded in models/holdout-ledger.jsonl). The artifact goes to runs/site-test, replaced each run.
site-calibration-demo: $(VENV)/.dev
	rm -rf runs/site-test
	$(BIN)/pneumoscan calibrate --model models/release --data $(PNEUMOSCAN_DATA)/test --output runs/site-test

# Benchmarks print figures and write bench/results.json; they are never timed tests.
bench: $(VENV)/.dev $(INFRA_VENV)/.installed
	$(BIN)/python bench/bench_quality.py
	$(BIN)/python bench/bench_stress.py
	$(BIN)/python bench/bench_screening.py
	$(BIN)/python bench/bench_scoring.py
	$(BIN)/python bench/bench_int8.py
	$(BIN)/python bench/bench_package.py
	$(BIN)/python bench/bench_memory.py
	$(BIN)/python bench/bench_dicom_bombs.py
	$(BIN)/python bench/bench_isolation.py
	$(BIN)/python bench/bench_decode_bombs.py
	$(BIN)/python bench/bench_dicom_display.py
	$(BIN)/python bench/bench_cost.py
	$(BIN)/python bench/bench_throughput.py

# 2,000 uploads, the hostile corpus and injected faults through the local stack; then a burst of 2,000 films at once
# under a concurrency cap of 2 (none may be dead-lettered); prints the figures of each.
soak: $(VENV)/.dev
	$(BIN)/pneumoscan soak --uploads 2000
	$(BIN)/pneumoscan soak --burst --uploads 2000 --max-concurrency 2

# One lock file pins every package of the training image and the scoring function's zip for Lambda's Python 3.12
# on x86_64, constrained by the function's pins, so training and serving decode and resize with the same numpy and
# Pillow (tests/test_training_image.py checks that they agree).
lock: $(VENV)/.dev
	$(BIN)/uv pip compile pyproject.toml --extra scoring --extra training \
		--constraint functions/requirements.txt --constraint functions/scoring/requirements.txt \
		--python-version 3.12 --python-platform x86_64-manylinux_2_28 -o requirements.lock

clean:
	rm -rf $(VENV) $(INFRA_VENV) .pytest_cache .mypy_cache .ruff_cache .aws-sam
