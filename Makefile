# Two entry points for a fresh machine:  `make demo`  and  `make test`.
# TORCH_SPEC picks the torch build. The default is the CPU build used here (no multi-GB CUDA
# download); GPU users: `make demo TORCH_SPEC=torch` (PyPI's default Linux wheel has CUDA).
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
TORCH_SPEC ?= torch==2.13.0
THREADS ?= 1

.PHONY: install demo test test-all results clean-runs

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(TORCH_SPEC)"
	$(PY) -m pip install -q -e ".[dev]"
	touch $@

demo: install
	$(PY) -m inoc_mech.train --name demo-baseline --overwrite --threads $(THREADS)
	$(PY) -m inoc_mech.train --inoculate --name demo-inoculated --overwrite --threads $(THREADS)

test: install
	$(PY) -m pytest -q

results: install
	$(PY) -m inoc_mech.studies.sweep --threads $(THREADS)
	$(PY) analyses/gradient_pressure.py
	$(PY) analyses/probe_traits.py

test-all: install
	$(PY) -m pytest -q -m "slow or not slow"

clean-runs:
	find runs -mindepth 1 -maxdepth 1 ! -name README.md -exec rm -rf {} +
