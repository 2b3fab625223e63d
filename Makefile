# `make demo` runs the main job (the offline tiny pipeline); `make test` runs the test suite.
# Both create .venv on first use. torch==2.13.0 is installed first, from the local CPU wheel,
# so that no dependency can pull a multi-GB CUDA build.
PY      ?= python3
VENV    := .venv
BIN     := $(VENV)/bin
STAMP   := $(VENV)/.installed
CONFIG  ?= configs/tiny.yaml

export DS_ACCELERATOR ?= cpu
export PYTHONWARNINGS ?= ignore::FutureWarning
export HF_HUB_OFFLINE ?= 1
export TRANSFORMERS_OFFLINE ?= 1
export HF_DATASETS_OFFLINE ?= 1
export TOKENIZERS_PARALLELISM ?= false

.PHONY: setup demo test clean-runs

setup: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q torch==2.13.0
	$(BIN)/python -m pip install -q -e ".[dev]"
	touch $(STAMP)

demo: setup
	$(BIN)/tagi-ds pipeline --config $(CONFIG)

test: setup
	$(BIN)/python -m pytest -q tests

clean-runs:
	rm -rf runs
