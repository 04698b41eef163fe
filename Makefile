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

.PHONY: help setup dataset run repro photos train-ddp test test-all lint format mlflow-ui tensorboard clean audit serve team-up team-down team-status containerize

help:
	@echo "make run        set up, then run the whole DVC pipeline (dvc repro)"
	@echo "make photos DATA=<folder>  fine-tune pretrained EfficientNet-Lite0 on your photos"
	@echo "make test       set up, then the tests CI runs: every real component at least once"
	@echo "make test-all   set up, then every test, the slow end-to-end ones too"
	@echo "make train-ddp  the train stage with DDP over NPROC processes (default 2; torchrun)"
	@echo "make lint       ruff check + format check + lint-imports (layer rules)"
	@echo "make mlflow-ui  open the MLflow UI on the project's SQLite store"
	@echo "make tensorboard  TensorBoard over logs/tensorboard on 127.0.0.1:6006 (PORT= to change)"
	@echo "make audit      pip-audit of the environment (fails unless every package was checked)"
	@echo "make serve      the champion over HTTP on 127.0.0.1:3000 (HOST=, PORT= to change)"
	@echo "make team-up    team mode on loopback: PostgreSQL, MLflow + Prefect servers, worker,"
	@echo "                service, Prometheus"
	@echo "make team-status / team-down   what runs where / stop it all (the data stays in .team/)"
	@echo "make containerize  bentoml build + bentoml containerize (needs a Docker engine)"

setup: $(STAMP) dataset

$(STAMP): pyproject.toml
	@test -x $(VENV)/bin/python || $(PYTHON) -m venv $(VENV)
	$(VENV)/bin/python -m pip install --upgrade pip
	$(VENV)/bin/python -m pip install -e '.[dev]'
	@touch $@

# System packages from Debian: the offline copy of Fashion-MNIST, Chromium for the web-page
# test, wrk for the serving benchmark, PostgreSQL and Prometheus (promtool) for team mode.
# Without root/apt, say what will not work instead.
SYSTEM_PACKAGES := dataset-fashion-mnist chromium wrk postgresql prometheus
dataset:
	@missing=""; \
	[ -f $(DATASET_DIR)/train-images-idx3-ubyte.gz ] || missing="$$missing dataset-fashion-mnist"; \
	command -v chromium >/dev/null || missing="$$missing chromium"; \
	command -v wrk >/dev/null || missing="$$missing wrk"; \
	ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 || missing="$$missing postgresql"; \
	command -v promtool >/dev/null || missing="$$missing prometheus"; \
	if [ -z "$$missing" ]; then \
		echo "system packages: present ($(SYSTEM_PACKAGES))"; \
	elif [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
		export DEBIAN_FRONTEND=noninteractive; \
		echo "installing:$$missing"; \
		apt-get install -y -q --no-install-recommends $$missing >/dev/null 2>&1 \
		|| { apt-get update -q >/dev/null && apt-get install -y -q --no-install-recommends $$missing >/dev/null; } \
		|| echo "warning: could not install$$missing (the download stage then uses the mirror; browser/benchmark tests skip)"; \
	else \
		echo "note: missing$$missing and no root apt-get: the download stage uses the mirror, browser tests skip"; \
	fi

run: setup
	$(BIN)/dvc repro
	@# Register the exported model (once per distinct model) and promote it if it qualifies,
	@# so that `bentoml serve` serves it right away.
	$(BIN)/python -m imageclf.registry register
	$(BIN)/python -m imageclf.registry promote || true
	@$(BIN)/python -m imageclf.summary

repro: run

# The photo configuration (configs/photos.yaml) on an ImageFolder of RGB photos, as a Prefect
# flow run: a DVC experiment of its own, registered and promoted under its own model name.
photos: setup
	@test -n "$(DATA)" || { echo "usage: make photos DATA=/path/to/folder (with train/<class>/ and test/<class>/)"; exit 2; }
	$(BIN)/python -m pipelines.training_flow --config configs/photos.yaml \
		--set data.imagefolder_root=$(abspath $(DATA))

NPROC ?= 2
train-ddp: setup
	$(BIN)/torchrun --standalone --nproc_per_node $(NPROC) -m stages.train

# CI's suite: everything but the tests marked slow. It still runs every real component (MLflow,
# DVC, Prefect, bentoml serve, ONNX Runtime, Great Expectations, Chromium) at least once.
test: setup
	$(BIN)/python -m pytest -m "not slow" --durations=25

# Adds the slow ones: whole pipelines in fresh clones, team mode, more servers (docs/development.md).
test-all: setup
	$(BIN)/python -m pytest --durations=25

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/lint-imports

format: $(STAMP)
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .

mlflow-ui: $(STAMP)
	$(BIN)/mlflow ui --backend-store-uri sqlite:///$(CURDIR)/mlflow.db --port 5000

# TensorBoard over logs/tensorboard (one folder per training run, written by train when
# train.tensorboard is on), on this machine only (HOST, like make serve); the folder comes from
# imageclf.paths. A target-specific PORT: `make tensorboard PORT=6007` still overrides it.
tensorboard: PORT = 6006
tensorboard: $(STAMP)
	$(BIN)/tensorboard --logdir "$$($(BIN)/python -c 'from imageclf.paths import get_paths; print(get_paths().tensorboard)')" --host $(HOST) --port $(PORT)

# Also the workspaces that failed training-flow runs kept for inspection (.dvc/tmp/flows).
clean:
	rm -rf reports/validation-failed .pytest_cache .dvc/tmp/flows

# Dependency audit: pip-audit over the venv, judged by tools/audit.py, which fails (exit 2)
# when pip-audit could not check every package (an unreachable vulnerability service makes
# pip-audit itself print "No known vulnerabilities found"). AUDIT_SERVICE=pypi|osv.
AUDIT_SERVICE ?= pypi
audit: $(STAMP)
	$(BIN)/python tools/audit.py --service $(AUDIT_SERVICE)

# The service on this machine only (127.0.0.1). Another address is a choice you make out loud:
# `make serve HOST=0.0.0.0` (then set IMAGECLF_API_TOKEN, see docs/serving.md, "Safe defaults").
# Plain `=`, not `?=`: an environment variable HOST (zsh sets it to the machine's name) must not
# widen the binding; only the command line overrides these.
HOST = 127.0.0.1
PORT = 3000
serve: $(STAMP)
	$(BIN)/bentoml serve services.service:ImageClassifier --host $(HOST) --port $(PORT)

# Team mode (docs/team-mode.md): the shared servers, in .team/ (params.yaml's team section).
team-up: setup
	$(BIN)/python -m ops.team up

team-down:
	$(BIN)/python -m ops.team down

team-status:
	$(BIN)/python -m ops.team status

# The service as an OCI image: the bento first (works anywhere), then the image, which needs a
# Docker engine (none on the machines this project is developed on: say so and stop).
containerize: $(STAMP)
	$(BIN)/bentoml build
	@command -v docker >/dev/null || { echo "make containerize: no docker command: install Docker (or Podman as docker) where an engine runs, then rerun. The bento is built: bentoml list imageclf"; exit 1; }
	@docker info >/dev/null 2>&1 || { echo "make containerize: no Docker engine answers (docker info failed): start one (systemctl start docker) or run this where one runs. The bento is built: bentoml list imageclf"; exit 1; }
	$(BIN)/bentoml containerize imageclf:latest
