# bonefrac: `make run` runs the whole pipeline on the embedded phantom dataset,
# `make test` runs the tests. Both install what they need first (idempotent).
SHELL := /bin/bash
ifndef PYTHON
PYTHON := $(shell command -v python3.11 || command -v python3)
endif
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

# Analytics off for every tool, and tool state kept inside the project.
include env.mk
export
# DVC stages run `python -m flows.<stage>`: make that the project's Python.
export PATH := $(CURDIR)/$(BIN):$(PATH)

.PHONY: install run run-fracatlas test test-all lint bench serve worker

$(STAMP): requirements.lock pyproject.toml
	@$(PYTHON) -c "import sys; assert sys.version_info[:2] == (3, 11)" 2>/dev/null || { echo "need Python 3.11 (python3.11 or python3 on PATH)"; exit 1; }
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --disable-pip-version-check --no-deps -r requirements.lock
	$(BIN)/pip check
	$(BIN)/pip install --quiet --disable-pip-version-check --no-deps --no-build-isolation -e .
	@touch $(STAMP)

install: $(STAMP)

# `bonefrac metrics`: the DVC metrics one value per line (`dvc metrics show` puts them all in one
# ~130-column row). The evaluate stage ends with the drift report of the test split (reports/drift/pipeline).
run: install
	$(BIN)/bonefrac run
	$(BIN)/bonefrac metrics

run-fracatlas: install
	$(BIN)/bonefrac exp-run params/fracatlas.yaml
	$(BIN)/bonefrac metrics

# Two pytest-xdist workers, one test file each at a time (module fixtures stay whole):
# most tests use one core, and the ones that start servers mostly wait. Files marked
# `long` go out first (tests/conftest.py; --no-loadscope-reorder keeps that order: xdist
# would put the files with most tests first, and the two-pipeline-run file last, alone).
# Two workers share two cores: OpenMP threads that spin while they wait would hold the
# core the other worker needs, so they sleep (benchmarks/omp_wait.py; runs keep the default).
TEST_WORKERS ?= 2
test: install
	bash scripts/test_setup.sh
	OMP_WAIT_POLICY=$${OMP_WAIT_POLICY:-PASSIVE} $(BIN)/python -m pytest -m "not slow" \
		-n $(TEST_WORKERS) --dist loadfile --no-loadscope-reorder $(PYTEST_ARGS)

test-all: install
	bash scripts/test_setup.sh
	$(BIN)/python -m pytest $(PYTEST_ARGS)

lint: install
	$(BIN)/ruff check src tests flows benchmarks

# The Prefect worker for the scheduled flows (docs/operations.md); POOL=bonefrac-process by default.
worker: install
	$(BIN)/bonefrac ops worker --pool $${POOL:-bonefrac-process}

bench: install
	$(BIN)/python -m benchmarks.run_all

# Local use: no API key needed (BONEFRAC_INSECURE_LOCAL=1); set BONEFRAC_API_KEY to require one.
serve: install
	BONEFRAC_INSECURE_LOCAL=$${BONEFRAC_INSECURE_LOCAL:-1} $(BIN)/bentoml serve bonefrac.serving.service:FractureService --port 3000
