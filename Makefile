# mitoseg — `make help` lists the targets.
SHELL := /bin/bash
.DEFAULT_GOAL := help

PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
export PATH := $(abspath $(BIN)):$(PATH)
export TF_CPP_MIN_LOG_LEVEL ?= 2
export PYTHONUNBUFFERED := 1

# Local stack (make stack): S3 on 8333, MLflow on 5000.
S3_PORT     ?= 8333
MLFLOW_PORT ?= 5000
SERVE_PORT  ?= 3000
MODEL       ?= models:/mitoseg-unet@champion
# Prometheus of `make stack` (scraping `make serve`), when Debian's prometheus is installed.
PROMETHEUS_PORT ?= $(if $(shell command -v prometheus),9090)
PYTEST_ARGS ?=
# pytest-xdist workers of `make test`: the CPUs this process may use, at most 4
TEST_WORKERS ?= $(shell $(PYTHON) -c "import os; print(min(4, len(os.sched_getaffinity(0))))")

.PHONY: help setup lock run test test-random test-reverse test-tutorial test-slow test-all lint docs format stack stack-down stack-status stack-env ui serve bento bench clean

help: ## List the targets
	@awk 'BEGIN {FS = ":.*## "} /^[a-zA-Z_-]+:.*## / {printf "  \033[36m%-13s\033[0m %s\n", $$1, $$2}' $(MAKEFILE_LIST)

$(STAMP): requirements.lock pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -r requirements.lock
	$(BIN)/pip install -q --no-deps -e .
	$(BIN)/pip check
	@touch $(STAMP)

setup: $(STAMP) ## Create .venv with the pinned dependencies (idempotent)

lock: ## Re-pin requirements.lock from pyproject.toml (needs PyPI)
	rm -rf .venv-lock && $(PYTHON) -m venv .venv-lock
	.venv-lock/bin/pip install -q -e '.[dev]' && .venv-lock/bin/pip check
	.venv-lock/bin/pip freeze --exclude-editable | grep -v '^mitoseg' > requirements.lock
	rm -rf .venv-lock

src/requirements-serve.lock: requirements.lock pyproject.toml $(STAMP) ## The Bento's pins: core + `serve` extra, from the lock
	$(BIN)/python dev/serve_requirements.py --out $@

run: setup ## Main job: fetch the bundled sample, then dvc repro (assemble .. register), offline
	$(BIN)/mitoseg --no-progress data fetch --source sample --out data/raw
	$(BIN)/dvc repro
	@$(BIN)/dvc metrics show
	@echo "Runs and the registered champion: make ui  (mlflow ui on sqlite:///mlflow.db)"

# Two passes: the suite on TEST_WORKERS workers, then the `serial` tests alone (their CPU
# hogs would slow the tests beside them). Both always run; pytest's status 5 (no test
# collected, e.g. PYTEST_ARGS naming a file with no serial test) fails only if both are 5.
test: setup ## Run the test suite (unit + loopback integration; not the slow tier), on TEST_WORKERS workers, then the serial tests alone
	rc1=0; rc2=0; \
	$(BIN)/pytest -m "not slow and not serial" -n $(TEST_WORKERS) --dist loadgroup $(PYTEST_ARGS) || rc1=$$?; \
	$(BIN)/pytest -m "serial and not slow" $(PYTEST_ARGS) || rc2=$$?; \
	if [ $$rc1 -eq 5 ] && [ $$rc2 -eq 5 ]; then exit 5; fi; \
	for rc in $$rc1 $$rc2; do if [ $$rc -ne 0 ] && [ $$rc -ne 5 ]; then exit $$rc; fi; done

test-random: setup ## Unit tests in a random order (pytest-randomly; the seed is printed)
	$(BIN)/pytest tests/unit -m "not slow" -p randomly $(PYTEST_ARGS)

test-reverse: setup ## Unit tests in reverse order (tests/conftest.py's --reverse)
	$(BIN)/pytest tests/unit -m "not slow" --reverse $(PYTEST_ARGS)

test-tutorial: setup ## The "segment your own volume" tutorial end to end (docs/your-volume.md; a few minutes)
	$(BIN)/pytest -m tutorial $(PYTEST_ARGS)

test-slow: setup ## The slow tier (over a minute each, not the tutorial), one process; CI runs it after make test
	$(BIN)/pytest -m "slow and not tutorial" $(PYTEST_ARGS)

test-all: setup ## Run every test, the slow tier included
	$(BIN)/pytest $(PYTEST_ARGS)

lint: setup ## ruff (lint + format check) and actionlint on the workflows
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/actionlint .github/workflows/*.yml

docs: setup ## Build the documentation site into site/ (mkdocs build --strict: warnings fail)
	NO_MKDOCS_2_WARNING=1 $(BIN)/mkdocs build --strict

format: setup ## Auto-format and fix with ruff
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .

stack: setup ## Start the local stack: S3 (seaweedfs), MLflow server with S3 artifacts, Prometheus (dev/stack.py)
	$(BIN)/python dev/stack.py up --s3-port $(S3_PORT) --mlflow-port $(MLFLOW_PORT) \
	  $(if $(PROMETHEUS_PORT),--prometheus-port $(PROMETHEUS_PORT) --serve-port $(SERVE_PORT))

stack-down: setup ## Stop the local stack
	$(BIN)/python dev/stack.py down

stack-status: setup ## Is the local stack running? (exit 1 if not)
	@$(BIN)/python dev/stack.py status

stack-env: setup ## Export lines for the local stack: eval "$$(make -s stack-env)"
	@$(BIN)/python dev/stack.py env

ui: setup ## MLflow UI on the embedded store (runs, metrics, registered models)
	$(BIN)/mlflow ui --backend-store-uri sqlite:///mlflow.db --port $(MLFLOW_PORT)

serve: setup ## Serve the champion model locally with BentoML (port SERVE_PORT)
	$(BIN)/mitoseg serve --port $(SERVE_PORT) --model $(MODEL)

bento: setup ## Build the GPU Bento from the registered champion
	$(BIN)/mitoseg bento build --model $(MODEL)

bench: setup ## Run the benchmarks (long; results in benchmarks/results/)
	$(BIN)/python benchmarks/train_speed.py
	$(BIN)/python benchmarks/accuracy.py
	$(BIN)/python benchmarks/inference_speed.py
	$(BIN)/python benchmarks/serve_load.py

clean: ## Remove pipeline outputs (keeps data/raw, the venv and the MLflow store)
	rm -rf artifacts
