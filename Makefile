# One entry point. `make run` and `make test` set up whatever is missing first.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
BIN := $(CURDIR)/$(VENV)/bin
STAMP := $(VENV)/.installed
DATASET_DIR := /usr/share/datasets/fashion-mnist

# Stages run as `python -m stages.<name>` from dvc.yaml: the venv must come first on PATH.
export PATH := $(BIN):$(PATH)
# This network reaches package registries only: keep libraries from calling home.
export GX_ANALYTICS_ENABLED := false
export DVC_NO_ANALYTICS := 1
export PREFECT_SERVER_ANALYTICS_ENABLED := false
export DO_NOT_TRACK := 1

.PHONY: help setup dataset run repro test test-fast lint format mlflow-ui clean

help:
	@echo "make run        set up, then run the whole DVC pipeline (dvc repro)"
	@echo "make test       set up, then the whole test suite (what CI runs)"
	@echo "make test-fast  unit tests only (no end-to-end pipeline)"
	@echo "make lint       ruff check + format check"
	@echo "make mlflow-ui  open the MLflow UI on the project's SQLite store"

setup: $(STAMP) dataset

$(STAMP): pyproject.toml
	@test -x $(VENV)/bin/python || $(PYTHON) -m venv $(VENV)
	$(VENV)/bin/python -m pip install --upgrade pip
	$(VENV)/bin/python -m pip install -e '.[dev]'
	@touch $@

# The offline copy of Fashion-MNIST: Debian's package when we can install it, else the
# download stage falls back to the official mirror.
dataset:
	@if [ -f $(DATASET_DIR)/train-images-idx3-ubyte.gz ]; then \
		echo "Fashion-MNIST: offline copy in $(DATASET_DIR)"; \
	elif [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
		export DEBIAN_FRONTEND=noninteractive; \
		apt-get install -y -q dataset-fashion-mnist >/dev/null 2>&1 \
		|| { apt-get update -q >/dev/null && apt-get install -y -q dataset-fashion-mnist; } \
		|| echo "warning: could not install dataset-fashion-mnist; the download stage will use the mirror"; \
	else \
		echo "note: $(DATASET_DIR) missing and apt-get unavailable (need root): the download stage will use the mirror"; \
	fi

run: setup
	$(BIN)/dvc repro
	@$(BIN)/dvc metrics show

repro: run

test: setup
	$(BIN)/python -m pytest

test-fast: setup
	$(BIN)/python -m pytest -m "not slow"

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

format: $(STAMP)
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .

mlflow-ui: $(STAMP)
	$(BIN)/mlflow ui --backend-store-uri sqlite:///$(CURDIR)/mlflow.db --port 5000

clean:
	rm -rf reports/validation-failed .pytest_cache
