# raeg-pl: `make train` and `make test` are the only commands a newcomer needs.
SHELL := /bin/bash
.DEFAULT_GOAL := help

PYTHON ?= python3.11
VENV ?= .venv
BIN := $(VENV)/bin
# Torch is pinned to the release the project is tested with; pip takes it from a local
# wheelhouse when one is configured, else from PyPI.
TORCH_SPEC ?= torch==2.14.1 torchvision==0.29.1
EXP ?= experiments/protect/quick.yaml
OUT ?=
PYTEST_ARGS ?=

# Data root: $RAEG_DATA_DIR if set, else a sibling shared/datasets copy when one exists,
# else ./data (CIFAR-10 is then downloaded through torchvision where the network allows).
export RAEG_DATA_DIR ?= $(abspath $(firstword $(wildcard ../shared/datasets) data))
export RAEG_CACHE_DIR ?= $(CURDIR)/data/cache

help: ## list the targets
	@grep -hE '^[a-zA-Z_-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  %-12s %s\n", $$1, $$2}'

$(BIN)/raeg: setup.cfg pyproject.toml
	@command -v $(PYTHON) >/dev/null || { echo "need $(PYTHON) (or: make PYTHON=python3 ...)"; exit 1; }
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet $(TORCH_SPEC)
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	@touch $(BIN)/raeg

install: $(BIN)/raeg ## create .venv and install the package (editable) with its dev extra

train: install ## run the default protection experiment end to end (EXP=<config> OUT=<run dir>)
	$(BIN)/raeg pipeline --config $(EXP) $(if $(OUT),--run_dir $(OUT),)

surrogate: install ## train one classifier with LightningCLI (EXP=experiments/surrogate/quick.yaml)
	$(BIN)/raeg fit --config $(if $(filter experiments/protect/%,$(EXP)),experiments/surrogate/quick.yaml,$(EXP)) $(if $(OUT),--run_dir $(OUT),)

test: install ## run the test suite (real CIFAR-10 from RAEG_DATA_DIR)
	$(BIN)/python -m pytest $(PYTEST_ARGS)

lint: install ## ruff lint and format check
	$(BIN)/ruff check src tests benchmarks
	$(BIN)/ruff format --check src tests benchmarks

bench: install ## benchmarks: throughput ratios against baselines measured in the same run
	$(BIN)/python benchmarks/bench_data_pipeline.py
	$(BIN)/python benchmarks/bench_protector.py

clean: ## remove run outputs (keeps .venv and the data cache)
	rm -rf runs lightning_logs .pytest_cache

.PHONY: help install train surrogate test lint bench clean
