# The README's two commands are `make demo` and `make test`; both set up from nothing (Python 3.11 + pip).
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
AUGREL := $(VENV)/bin/augrel
# pip never pulls a CUDA build of torch by accident: where no GPU is present the CPU wheel is installed
# first (it satisfies the project's torch range); with a GPU, pip takes torch's default (CUDA) build.
# FAISS likewise: the `cpu` extra (faiss-cpu) without a GPU, the `gpu` extra (faiss-gpu-cu12) with one; both
# builds install the module `faiss`, so a GPU host drops a faiss-cpu left from an earlier CPU setup first.
TORCH_CPU ?= torch==2.13.0
HAS_GPU := $(shell command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1 && echo 1)
STAMP := $(VENV)/.augrel-installed
DEMO_DIR ?= runs/demo
PYTEST_ARGS ?=

.PHONY: setup browser test test-all demo bench lint format clean

setup: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
ifeq ($(HAS_GPU),1)
	$(PY) -m pip install --quiet torch
	$(PY) -m pip uninstall --quiet --yes faiss-cpu 2>/dev/null || true
	$(PY) -m pip install --quiet -e '.[dev,gpu]'
else
	$(PY) -m pip install --quiet '$(TORCH_CPU)'
	$(PY) -m pip install --quiet -e '.[dev,cpu]'
endif
	touch $(STAMP)

# The report test renders the HTML report in headless Chromium: Debian's package, installed when missing and
# apt-get can (root, or password-less sudo); otherwise that one test skips and says why.
browser:
	@command -v chromium >/dev/null 2>&1 || command -v chromium-browser >/dev/null 2>&1 || { \
	  SUDO=; [ "$$(id -u)" = 0 ] || SUDO="sudo -n"; \
	  if command -v apt-get >/dev/null 2>&1 && $$SUDO true 2>/dev/null; then \
	    echo "installing chromium (Debian) for the report test"; \
	    $$SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -qq chromium >/dev/null \
	      || echo "chromium could not be installed: the report rendering test will skip"; \
	  else echo "no apt-get or no root: the report rendering test will skip"; fi; }

# Everything but the tests that load real models (`slow`) or need a GPU (`gpu`): see test-all.
test: setup browser
	$(PY) -m pytest -m "not slow and not gpu" $(PYTEST_ARGS)

test-all: setup browser
	$(PY) -m pytest $(PYTEST_ARGS)

demo: setup
	$(AUGREL) run configs/demo.yaml --set out=$(DEMO_DIR)
	$(AUGREL) review export --judgments $(DEMO_DIR)/judgments-pool --pairs $(DEMO_DIR)/pool/unlabelled \
	    --budget 20 --strategy uncertain --out $(DEMO_DIR)/review

bench: setup
	@shopt -s nullglob; for b in benchmarks/*.py; do echo "== $$b"; $(PY) $$b --quick || exit 1; done

lint: setup
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

format: setup
	$(VENV)/bin/ruff check --fix .
	$(VENV)/bin/ruff format .

clean:
	rm -rf runs .pytest_cache .ruff_cache
