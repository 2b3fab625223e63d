# `make demo` runs the main job (the offline tiny pipeline); `make test` runs the test suite.
# Both create .venv on first use from the lock file requirements/cpu-dev.lock: exact versions, the set CI tests.
# torch==2.13.0+cpu comes from the machine's local CPU wheel, so no dependency can pull a multi-GB CUDA build.
# `make lock` regenerates the locks from pyproject.toml's ranges (a deliberate upgrade: commit the diff with a note);
# `make test-latest` runs the suite in a throw-away venv with the newest versions those ranges allow.
PY      ?= python3
VENV    := .venv
BIN     := $(VENV)/bin
STAMP   := $(VENV)/.installed
CONFIG  ?= configs/tiny.yaml
LOCK    := requirements/cpu-dev.lock
GPULOCK := requirements/gpu.lock
TOOLS   := .dev/tools
LATEST  := .dev/latest
# The CPU lock is for this environment (Linux x86_64, CPython 3.11, the local torch CPU wheel).
LOCK_PY := 3.11
TORCH_CPU := torch==2.13.0+cpu
TORCH_GPU := torch==2.13.0

export DS_ACCELERATOR ?= cpu
export PYTHONWARNINGS ?= ignore::FutureWarning
export HF_HUB_OFFLINE ?= 1
export TRANSFORMERS_OFFLINE ?= 1
export HF_DATASETS_OFFLINE ?= 1
export TOKENIZERS_PARALLELISM ?= false

.PHONY: setup demo test test-latest lock clean-runs

setup: $(STAMP)

# The lock holds every package (torch included); the project itself goes in editable with --no-deps, so nothing
# outside the lock is resolved. `pip check` fails the setup if the lock and pyproject.toml's ranges disagree.
$(STAMP): pyproject.toml $(LOCK)
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -c 'import sys; v = "%d.%d" % sys.version_info[:2]; sys.exit(0 if v == "$(LOCK_PY)" else "$(LOCK) is for CPython $(LOCK_PY), this venv has " + v + ": use PY=python$(LOCK_PY), or make lock")'
	$(BIN)/python -m pip install -q -r $(LOCK)
	$(BIN)/python -m pip install -q --no-deps --no-build-isolation -e .
	$(BIN)/python -m pip check
	touch $(STAMP)

demo: setup
	$(BIN)/tagi-ds pipeline --config $(CONFIG)

test: setup
	$(BIN)/python -m pytest -q tests

# Newest versions pyproject.toml allows (torch stays the local CPU wheel: the newest torch on an index is a CUDA build).
test-latest:
	rm -rf $(LATEST) && mkdir -p .dev
	$(PY) -m venv $(LATEST)
	$(LATEST)/bin/python -m pip install -q --upgrade pip
	$(LATEST)/bin/python -m pip install -q $(TORCH_CPU)
	$(LATEST)/bin/python -m pip install -q --upgrade --upgrade-strategy eager -e ".[dev]"
	$(LATEST)/bin/python -m pip freeze --exclude-editable > .dev/latest-freeze.txt
	$(LATEST)/bin/python requirements/compare.py $(LOCK) .dev/latest-freeze.txt
	$(LATEST)/bin/python -m pytest -q tests

# uv resolves for CPython $(LOCK_PY) on Linux x86_64; the GPU lock takes PyPI's CUDA torch and is not tested here.
lock:
	mkdir -p .dev
	test -x $(TOOLS)/bin/uv || ($(PY) -m venv $(TOOLS) && $(TOOLS)/bin/python -m pip install -q uv)
	echo "$(TORCH_CPU)" > .dev/torch-cpu.txt
	$(TOOLS)/bin/uv pip compile pyproject.toml --extra dev --python-version $(LOCK_PY) --find-links /opt/wheels \
	  --override .dev/torch-cpu.txt --no-header --annotation-style line -o $(LOCK)
	echo "$(TORCH_GPU)" > .dev/torch-gpu.txt
	$(TOOLS)/bin/uv pip compile pyproject.toml --extra gpu --python-version $(LOCK_PY) \
	  --python-platform x86_64-manylinux_2_28 --override .dev/torch-gpu.txt --no-header --annotation-style line -o $(GPULOCK)

clean-runs:
	rm -rf runs
