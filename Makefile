# Every target makes (or reuses) the virtual environment in .venv and installs what it needs.
# torch is pinned first: an unpinned install would pull the newest build with GBs of CUDA packages.
PYTHON ?= python3
VENV ?= .venv
BIN = $(VENV)/bin
STAMP = $(VENV)/.installed
export KERAS_BACKEND = torch

.PHONY: demo test lint bench clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e '.[dev]'
	$(BIN)/python -m compileall -q paramctl  # bytecode up front: start-up stays fast even with PYTHONDONTWRITEBYTECODE
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/paramctl ls sample_checkpoints/mlp.pt --format table
	$(BIN)/paramctl tree sample_checkpoints/nested.pt --depth 3 --format table

test: $(STAMP)
	$(BIN)/python -m pytest

lint: $(STAMP)
	$(BIN)/ruff check paramctl tests sample_checkpoints examples bench
	$(BIN)/ruff format --check paramctl tests sample_checkpoints examples bench
	$(BIN)/mypy

bench: $(STAMP)
	$(BIN)/python -m compileall -q paramctl
	$(BIN)/python bench/bench.py

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache
