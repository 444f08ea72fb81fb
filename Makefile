# Every target makes (or reuses) the virtual environment in .venv and installs what it needs.
# torch is pinned first: an unpinned install would pull the newest build with GBs of CUDA packages.
# The reference frameworks that cannot live beside paramctl's own packages get environments of
# their own, built here too: MXNet 1.9.1 (needs numpy 1.23.5), TensorFlow 2.15 and transformers 4.57.
PYTHON ?= python3
VENV ?= .venv
BIN = $(VENV)/bin
STAMP = $(VENV)/.installed
MX_VENV = .venv-mx
TF_VENV = .venv-tf
HF4_VENV = .venv-hf4
REFERENCE_STAMPS = $(MX_VENV)/.installed $(TF_VENV)/.installed $(HF4_VENV)/.installed
export KERAS_BACKEND = torch

.PHONY: demo test test-quick fuzz lint bench clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e '.[dev]'
	$(BIN)/python -m compileall -q paramctl  # bytecode up front: start-up stays fast even with PYTHONDONTWRITEBYTECODE
	touch $(STAMP)

$(MX_VENV)/.installed:
	$(PYTHON) -m venv $(MX_VENV)
	$(MX_VENV)/bin/pip install -q numpy==1.23.5 mxnet==1.9.1
	touch $@

$(TF_VENV)/.installed:
	$(PYTHON) -m venv $(TF_VENV)
	$(TF_VENV)/bin/pip install -q tensorflow-cpu==2.15.1
	touch $@

$(HF4_VENV)/.installed:
	$(PYTHON) -m venv $(HF4_VENV)
	$(HF4_VENV)/bin/pip install -q torch==2.13.0
	$(HF4_VENV)/bin/pip install -q transformers==4.57.6 safetensors accelerate peft
	touch $@

demo: $(STAMP)
	$(BIN)/paramctl ls sample_checkpoints/mlp.pt --format table
	$(BIN)/paramctl tree sample_checkpoints/nested.pt --depth 3 --format table

# PARAMCTL_REFERENCE_VENVS=1: a test that needs MXNet, TensorFlow or transformers 4 fails (not skips)
# when its environment is missing
test: $(STAMP) $(REFERENCE_STAMPS)
	PARAMCTL_REFERENCE_VENVS=1 $(BIN)/python -m pytest

# the suite without the reference frameworks' environments (their tests skip)
test-quick: $(STAMP)
	$(BIN)/python -m pytest

fuzz: $(STAMP)
	PARAMCTL_FUZZ=long $(BIN)/python -m pytest tests/test_fuzz.py tests/test_differential.py

lint: $(STAMP)
	$(BIN)/ruff check paramctl tests sample_checkpoints examples bench
	$(BIN)/ruff format --check paramctl tests sample_checkpoints examples bench
	$(BIN)/mypy

bench: $(STAMP) $(REFERENCE_STAMPS)
	$(BIN)/python -m compileall -q paramctl
	$(BIN)/python bench/bench.py

clean:
	rm -rf $(VENV) $(MX_VENV) $(TF_VENV) $(HF4_VENV) .pytest_cache .mypy_cache .ruff_cache
