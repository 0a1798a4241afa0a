# Everything a fresh clone needs: `make demo` and `make test` create .venv and install into it.
PYTHON ?= python3
VENV ?= .venv
TORCH_VERSION ?= 2.13.0
# Installed first and pinned, so no other package pulls in a different (multi-GB CUDA) torch.
TORCH_SPEC ?= torch==$(TORCH_VERSION)
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-$(TORCH_VERSION)

.PHONY: install test lint pytest demo bench gpu-check clean

install: $(STAMP)

$(STAMP): pyproject.toml Makefile
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --upgrade pip
	$(BIN)/python -m pip install "$(TORCH_SPEC)"
	$(BIN)/python -m pip install "$(TORCH_SPEC)" -e ".[test]"
	touch $@

## make test: lint (ruff + mypy on the package) then the pytest suite.
test: lint pytest

lint: $(STAMP)
	$(BIN)/ruff check lightning_spa tests examples benchmarks
	$(BIN)/mypy

pytest: $(STAMP)
	$(BIN)/python -m pytest -q $(PYTEST_ARGS)

## make demo: the digits app with the paper's recipe (SPA, gradual schedule, diagnostics).
## DEMO_ARGS=--lightning runs it with the unified `lightning` package's CLI and Trainer.
demo: $(STAMP)
	$(BIN)/python examples/demo.py $(DEMO_ARGS)

## make bench: optimizer-step and callback-overhead benchmarks (prints tables; slow).
bench: $(STAMP)
	$(BIN)/python benchmarks/optimizer_step.py
	$(BIN)/python benchmarks/diagnostics_overhead.py

## make gpu-check: every CUDA check in one script (needs a CUDA device; a few minutes on one GPU).
gpu-check: $(STAMP)
	$(BIN)/python benchmarks/gpu_check.py $(GPU_CHECK_ARGS)

clean:
	rm -rf $(VENV) lightning_logs runs .pytest_cache .mypy_cache .ruff_cache
