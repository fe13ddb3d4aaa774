# One venv, the CPU build of torch first (a bare `torch` range would pull a multi-GB CUDA build on a
# machine without one), then the package with its tested ranges.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
TORCH ?= torch==2.13.0
# Optional pip constraints, e.g. .ci/lowest.txt or .ci/highest.txt (CI installs both ends of every range).
CONSTRAINTS ?=
PIP_C := $(if $(CONSTRAINTS),-c $(CONSTRAINTS),)
export HF_HUB_OFFLINE := 1
export HF_DATASETS_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false
export DS_ACCELERATOR ?= cpu
export TORCH_EXTENSIONS_DIR ?= $(HOME)/.cache/torch_extensions

.PHONY: install demo test test-slow test-all clean

$(VENV)/.installed: pyproject.toml $(CONSTRAINTS)
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install -q "$(TORCH)"
	$(PY) -m pip install -q $(PIP_C) -e ".[all]"
	$(PY) -m pip check
	touch $@

install: $(VENV)/.installed

demo: install  ## the tiny staged recipe end to end: offline, CPU, a few minutes
	$(PY) -m pipeline.run --config recipes/tiny/pipeline.yaml

test: install  ## fast CPU tier
	OMP_NUM_THREADS=1 $(PY) -m pytest -m "not slow" -q

test-slow: install  ## multi-process DDP / DeepSpeed runs and long trainings
	OMP_NUM_THREADS=1 $(PY) -m pytest -m slow -q

clean:
	rm -rf outputs .pytest_cache
