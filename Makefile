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
PROFILE ?= quick
TABLES ?= main robustness fidelity inference
OUT ?=
PYTEST_ARGS ?=
# Kept result records (raeg table --keep-records) that `make tables` resumes from, e.g.
# RECORDS=docs/tables/quick/records: their stages are not run again.
RECORDS ?=
# Test processes (pytest-xdist), each on one thread; each test file stays in one process.
PYTEST_WORKERS ?= 2

# Data root: $RAEG_DATA_DIR if set, else a sibling shared/datasets copy when one exists,
# else ./data (CIFAR-10 is then downloaded through torchvision where the network allows).
export RAEG_DATA_DIR ?= $(abspath $(firstword $(wildcard ../shared/datasets) data))
# The cache sits outside every data root (data roots are read-only, ./data included).
export RAEG_CACHE_DIR ?= $(CURDIR)/.cache

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

tables: install ## run the grids of TABLES (PROFILE=quick here, PROFILE=paper on GPUs) and build the tables
	@for t in $(TABLES); do \
	  echo "== $$t ($(PROFILE))"; \
	  $(BIN)/raeg grid --config experiments/$$t/$(PROFILE).yaml $(if $(RECORDS),--records $(RECORDS),) || exit 1; \
	done
	$(if $(filter-out ablation,$(TABLES)),$(BIN)/raeg table --runs runs/tables/$(PROFILE) \
	  --out runs/tables/$(PROFILE)/tables,)
	$(if $(filter ablation,$(TABLES)),$(BIN)/raeg table --runs runs/tables/$(PROFILE)_ablation \
	  --out runs/tables/$(PROFILE)_ablation/tables --tables robustness fidelity,)

surrogate: install ## train one classifier with LightningCLI (EXP=experiments/surrogate/quick.yaml)
	$(BIN)/raeg fit --config $(if $(filter experiments/protect/%,$(EXP)),experiments/surrogate/quick.yaml,$(EXP)) $(if $(OUT),--run_dir $(OUT),)

test: install ## run the test suite (real CIFAR-10 from RAEG_DATA_DIR)
	$(BIN)/python -m pytest -n $(PYTEST_WORKERS) --dist loadfile $(PYTEST_ARGS)

lint: install ## ruff lint and format check
	$(BIN)/ruff check src tests benchmarks
	$(BIN)/ruff format --check src tests benchmarks

bench: install ## benchmarks: throughput ratios against baselines measured in the same run
	$(BIN)/python benchmarks/bench_data_pipeline.py
	$(BIN)/python benchmarks/bench_protector.py

sweep: install ## create a wandb sweep from experiments/sweeps/<S>.yaml (S=protector_weights, psnr_target, ...)
	@test -n "$(S)" || { echo "usage: make sweep S=<name>; sweeps: $(notdir $(basename $(wildcard experiments/sweeps/*.yaml)))"; exit 2; }
	$(BIN)/wandb sweep experiments/sweeps/$(S).yaml

agent: install ## run a wandb sweep agent here (ID=<entity/project/sweep id>; each run is one raeg pipeline)
	@test -n "$(ID)" || { echo "usage: make agent ID=<entity/project/sweep id>  (printed by make sweep)"; exit 2; }
	PATH="$(abspath $(BIN)):$$PATH" $(BIN)/wandb agent $(ID)

clean: ## remove run outputs (keeps .venv and the data cache)
	rm -rf runs lightning_logs .pytest_cache

.PHONY: help install train tables surrogate test lint bench sweep agent clean
