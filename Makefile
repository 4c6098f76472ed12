# Two commands on a fresh machine: `make demo` (main job on the tiny built-in models) and
# `make test`. Both bootstrap .venv themselves; torch==2.13.0 is installed first so that pip
# never pulls a multi-GB CUDA build.

PYTHON ?= python3
VENV   := .venv
VPY    := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
EXTRAS ?= dev,serve,deepspeed,trl
export HF_HUB_OFFLINE ?= 1
export TOKENIZERS_PARALLELISM ?= false

.PHONY: venv test test-fast demo lint bench bench-gpu clean

$(STAMP): pyproject.toml
	@test -x $(VPY) || $(PYTHON) -m venv $(VENV)
	$(VPY) -m pip install -q --upgrade pip
	$(VPY) -m pip install -q torch==2.13.0
	DS_BUILD_OPS=0 $(VPY) -m pip install -q -e ".[$(EXTRAS)]"
	@touch $(STAMP)

venv: $(STAMP)

test: $(STAMP)
	$(VPY) -m pytest -q

test-fast: $(STAMP)
	$(VPY) -m pytest -q -m "not slow"

demo: $(STAMP)
	$(VPY) -m dinalrm_align.cli demo

lint: $(STAMP)
	$(VPY) -m ruff check .

bench: $(STAMP)   ## real-scale FLOPs and peak memory (fake tensors) + CPU ratios
	$(VPY) -m benchmarks.flops
	$(VPY) -m benchmarks.cpu
	$(VPY) -m benchmarks.memory --quick --validate

bench-gpu: $(STAMP)   ## on a CUDA machine: full-size bf16 time/memory into docs/benchmarks.md
	$(VPY) -m benchmarks.gpu --update-doc docs/benchmarks.md

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache
