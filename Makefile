# sdbatch — `make demo` and `make test` work from a fresh clone.
SHELL := /bin/bash
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(VENV)/bin/pip
# CPU-only machines: pin the CPU torch build that is on disk here (an unpinned torch
# pulls a multi-GB CUDA build). GPU users: install your CUDA torch first, then
# `make install TORCH=` (empty) or plain `pip install -e .`.
TORCH ?= torch==2.13.0
MODELS ?= models/tiny
PYTEST_ARGS ?=
# Two pytest workers: a test waiting on an actor start or a lost node leaves a core idle,
# which the other worker's test uses (16 -> 12.5 min here). Each worker has its own
# session Ray (tests/conftest.py). TEST_WORKERS=0: one process.
TEST_WORKERS ?= 2
XDIST := $(if $(filter-out 0,$(TEST_WORKERS)),-n $(TEST_WORKERS),)

.DEFAULT_GOAL := help

.PHONY: help install models demo test test-fast test-integration lint format bench clean browser

help: ## List the targets
	@grep -hE '^[a-zA-Z_-]+:.*?## ' $(MAKEFILE_LIST) | awk 'BEGIN {FS = ":.*?## "} {printf "  %-18s %s\n", $$1, $$2}'

$(VENV)/.installed: pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	@# No torchvision: its PyPI wheel breaks the CPU torch build.
	if [ -n "$(TORCH)" ]; then $(PIP) install -q "$(TORCH)" 2>&1 | grep -v '^WARNING: Location' ; test $${PIPESTATUS[0]} -eq 0; fi
	$(PIP) install -q -e '.[s3,test,dev]' 2>&1 | grep -v '^WARNING: Location' ; test $${PIPESTATUS[0]} -eq 0
	touch $@

install: $(VENV)/.installed ## Create .venv and install sdbatch with test/dev extras

# The last thing `models tiny` writes (LoRAs, then embeddings); it skips what exists.
$(MODELS)/embeddings/.complete: | $(VENV)/.installed
	HF_HUB_OFFLINE=1 $(VENV)/bin/sdbatch models tiny $(MODELS)

models: $(MODELS)/embeddings/.complete ## Build the tiny offline models, LoRAs, embeddings (if absent)

jobs/data/demo.parquet: jobs/make_demo_manifest.py | $(VENV)/.installed
	$(PY) jobs/make_demo_manifest.py $@

demo: install models jobs/data/demo.parquet ## Render the demo job on local Ray into out/demo
	HF_HUB_OFFLINE=1 $(VENV)/bin/sdbatch run jobs/demo.yaml --progress plain --every 2

test: install lint browser ## Lint, then run the whole test suite (unit + integration), 2 workers
	HF_HUB_OFFLINE=1 $(PY) -m pytest -q -p no:cacheprovider $(XDIST) $(PYTEST_ARGS) tests

# The gallery test drives headless Chromium; Debian's packages, installed only if missing
# (root, or sudo). Works unattended (CI=true, no stdin).
browser: ## Install chromium + chromedriver (Debian packages) if missing, for the gallery test
	@if [ -x /usr/bin/chromium ] && [ -x /usr/bin/chromedriver ]; then \
		echo "browser: /usr/bin/chromium and /usr/bin/chromedriver present"; \
	else \
		if [ "$$(id -u)" -eq 0 ]; then SUDO=; else SUDO="sudo -n"; fi; \
		$$SUDO env DEBIAN_FRONTEND=noninteractive apt-get update -q && \
		$$SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -q chromium chromium-driver </dev/null; \
	fi

test-fast: install ## The tests without Ray (tests/unit), in under a minute
	HF_HUB_OFFLINE=1 $(PY) -m pytest -q -p no:cacheprovider $(PYTEST_ARGS) tests/unit

test-integration: install ## Ray + tiny-model tests
	HF_HUB_OFFLINE=1 $(PY) -m pytest -q -p no:cacheprovider $(XDIST) $(PYTEST_ARGS) tests/integration

lint: install ## ruff (lint + format check) and mypy on the pure modules
	$(VENV)/bin/ruff check sdbatch tests benchmarks jobs
	$(VENV)/bin/ruff format --check sdbatch tests benchmarks jobs
	$(VENV)/bin/mypy sdbatch/spec.py sdbatch/plan.py sdbatch/cli.py

format: install ## Apply ruff fixes and formatting
	$(VENV)/bin/ruff check --fix sdbatch tests benchmarks jobs
	$(VENV)/bin/ruff format sdbatch tests benchmarks jobs

bench: install models ## Run the benchmarks (prints ratios; see benchmarks/RESULTS.md)
	HF_HUB_OFFLINE=1 $(PY) benchmarks/run_all.py

clean: ## Remove outputs and built models (keeps .venv)
	rm -rf out $(MODELS) jobs/data/demo.parquet
