# vlp_lightning — the two commands a newcomer needs are `make demo` and `make test`.
# Everything installs into one virtual environment that survives between runs
# (VENV, default ~/.cache/vlp-lightning/venv); a repeated `make install` is a quick no-op.

VENV    ?= $(HOME)/.cache/vlp-lightning/venv
PYTHON  ?= python3
PY      := $(VENV)/bin/python
STAMP   := $(VENV)/.vlp-install-stamp
# The stamp records what was installed from where: a changed pyproject.toml or a new checkout path reinstalls.
STAMP_KEY := $(shell cat pyproject.toml | sha256sum | cut -c1-16)-$(CURDIR)
TORCH_PINS := torch==2.14.1 torchvision==0.29.1
PYTEST_ARGS ?=
# `make tensorboard` serves on localhost only (TensorBoard's default); TENSORBOARD_ARGS=--bind_all exposes it to the network.
TENSORBOARD_ARGS ?=

.PHONY: install test test-all demo bench bench-quick tensorboard clean help

help:  ## show the targets
	@grep -E '^[a-z-]+:.*##' Makefile | sed 's/:.*##/\t/'

install:  ## create/refresh the virtual environment (quick no-op when up to date)
	@if [ -f "$(STAMP)" ] && [ "$$(cat $(STAMP))" = "$(STAMP_KEY)" ]; then \
		echo "install: up to date ($(VENV))"; \
	else \
		set -e; \
		[ -x "$(PY)" ] || $(PYTHON) -m venv "$(VENV)"; \
		$(PY) -m pip install -q --upgrade pip wheel; \
		$(PY) -m pip install -q $(TORCH_PINS); \
		$(PY) -m pip install -q -e ".[dev,demo,caption,scenes,lm,svg,sim,video]"; \
		echo "$(STAMP_KEY)" > "$(STAMP)"; \
		echo "install: done ($(VENV))"; \
	fi

test: install  ## run the CPU test suite
	$(PY) -m pytest $(PYTEST_ARGS)

test-all: install  ## include slow tests
	$(PY) -m pytest -m "not gpu" $(PYTEST_ARGS)

demo: install  ## fetch emoji, train a tiny CLIP on CPU, print held-out retrieval / zero-shot table
	$(PY) -m vlp_lightning.demo

bench: install  ## run every benchmark in bench/ (results in bench/results, table in bench/README.md)
	$(PY) bench/run_all.py

bench-quick: install  ## every benchmark in --quick mode
	$(PY) bench/run_all.py --quick

tensorboard: install  ## open TensorBoard on runs/
	$(VENV)/bin/tensorboard --logdir runs $(TENSORBOARD_ARGS)

clean:  ## remove run outputs (not the venv)
	rm -rf runs lightning_logs .pytest_cache
