# Set-up and everyday commands. The pinned torch is a CPU build (override: make TORCH='torch==2.5.1').
PYTHON ?= python3
VENV ?= .venv
TORCH ?= torch==2.13.0
FUZZ_SECONDS ?= 180
FUZZ_SEED ?= 0
GPU_PYTHON ?= python3
BIN := $(VENV)/bin

.PHONY: demo test test-distributed fuzz fuzz-edits fuzz-configs gpu-check lint venv bench clean

$(BIN)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q "$(TORCH)"
	$(BIN)/pip install -q -e ".[dev,rl,hf,lightning,export]"
	touch $@

venv: $(BIN)/.installed

demo: venv
	$(BIN)/adaptnet demo

lint: venv
	$(BIN)/ruff check src tests benchmarks
	$(BIN)/mypy

# Multi-process tests (2-3 gloo ranks launched by torchrun, kills and restarts) run separately: they take
# minutes and depend on the machine's ports and load; CI runs the single-process suite.
test: venv lint
	$(BIN)/pytest -q -m "not slow and not distributed"
	$(BIN)/python tests/fuzz/fuzz_edits.py --seconds 60 --seed 0

test-distributed: venv
	$(BIN)/pytest -q -m distributed

# Both fuzzers, FUZZ_SECONDS split between them (a nightly-style run: make fuzz FUZZ_SECONDS=3600); both
# run even if the first fails, and the target fails if either did.
fuzz: venv
	$(BIN)/python tests/fuzz/fuzz_edits.py --seconds $$(( $(FUZZ_SECONDS) / 2 )) --seed $(FUZZ_SEED); edits=$$?; \
	$(BIN)/python tests/fuzz/fuzz_configs.py --seconds $$(( $(FUZZ_SECONDS) / 2 )) --seed $(FUZZ_SEED); configs=$$?; \
	[ $$edits -eq 0 ] && [ $$configs -eq 0 ]

# Random models, optimizers, training and edits of every kind (and invalid requests) for FUZZ_SECONDS, each
# action checked (`make test` runs it for 60 s). A failure prints the seed, case and actions that reproduce it.
fuzz-edits: venv
	$(BIN)/python tests/fuzz/fuzz_edits.py --seconds $(FUZZ_SECONDS) --seed $(FUZZ_SEED)

# Mutated example configs through `adaptnet train` for FUZZ_SECONDS: each must run or be refused in one line
# (`make test` runs a few of them). A failure prints the seed and the config that reproduces it.
fuzz-configs: venv
	$(BIN)/python tests/fuzz/fuzz_configs.py --seconds $(FUZZ_SECONDS) --seed $(FUZZ_SEED)

# On a machine with an NVIDIA GPU: the `gpu` tests, then the early-exit, halting and MoE benchmarks on CUDA
# (benchmarks/gpu_check.py; JSON, logs and a summary in benchmarks/results/gpu/). GPU_PYTHON is a Python whose
# torch has CUDA, with adaptnet's dependencies and pytest (the venv above pins the CPU build of torch);
# adaptnet comes from src/. Without a CUDA device it refuses in one line (exit 2). Not part of CI.
gpu-check:
	$(GPU_PYTHON) benchmarks/gpu_check.py

bench: venv
	$(BIN)/pip install -q -e ".[bench]"
	$(BIN)/pip install -q --no-deps labml-nn==0.5.1 pytorch-adaptive-computation-time==0.1.3
	$(BIN)/python benchmarks/edit_overhead.py

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache
