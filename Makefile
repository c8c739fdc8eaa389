# `make test` and `make demo` each do all of their own set-up on a fresh machine:
# a virtual environment in .venv, the pinned CPU build of torch first (an unpinned torch
# would pull a multi-GB CUDA build), then this package with its test extras.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
TORCH  ?= torch==2.13.0
STAMP  := $(VENV)/.installed

.PHONY: install test test-slow demo bench clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q $(TORCH)
	$(BIN)/python -m pip install -q -e '.[dev]'
	touch $(STAMP)

install: $(STAMP)

test: $(STAMP)
	$(BIN)/python -m pytest -q -p no:cacheprovider

test-slow: $(STAMP)
	$(BIN)/python -m pytest -q -p no:cacheprovider -m slow

demo: $(STAMP)
	$(BIN)/llama4dpo demo --out runs/demo

bench: $(STAMP)
	$(BIN)/python benchmarks/moe_scaling.py

clean:
	rm -rf $(VENV) runs build *.egg-info src/*.egg-info
