# Two entry points for a fresh machine:  `make demo`  and  `make test`.
# TORCH_SPEC picks the torch build. The default is the CPU build used here (no multi-GB CUDA
# download); GPU users: `make demo TORCH_SPEC=torch` (PyPI's default Linux wheel has CUDA).
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
TORCH_SPEC ?= torch==2.13.0
THREADS ?= 1

.PHONY: install demo test test-all results paper-settings clean-runs

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

# The backdoor and subliminal studies of README "The paper's other settings" (~1.5 h of one core; the sweeps run 2 jobs)
SL := $(PY) -m inoc_mech.studies.sweep --setting subliminal --seeds 0 1 2 --prompts --threads $(THREADS)
TEACH := $(PY) -m inoc_mech.settings.subliminal_organism --n 3000
paper-settings: install
	$(PY) -m inoc_mech.studies.sweep --setting backdoor --name backdoor --seeds 0 1 2 --threads $(THREADS)
	$(PY) analyses/contexts.py runs/backdoor
	$(PY) analyses/gradient_pressure.py runs/backdoor --out figures/backdoor
	$(TEACH) --out runs/subliminal-data/owls.jsonl
	$(TEACH) --teacher-prompt none --out runs/subliminal-data/control.jsonl
	$(TEACH) --labels soft --out runs/subliminal-data/owls-soft.jsonl
	$(TEACH) --labels soft --teacher-prompt none --out runs/subliminal-data/control-soft.jsonl
	$(SL) --name subliminal --data runs/subliminal-data/owls.jsonl
	$(SL) --name subliminal-control --data runs/subliminal-data/control.jsonl
	$(SL) --name subliminal-crossinit --organism-seed 1 --data runs/subliminal-data/owls.jsonl
	$(SL) --name subliminal-soft --data runs/subliminal-data/owls-soft.jsonl
	$(SL) --name subliminal-soft-control --data runs/subliminal-data/control-soft.jsonl
	$(SL) --name subliminal-soft-crossinit --organism-seed 1 --data runs/subliminal-data/owls-soft.jsonl
	$(PY) analyses/subliminal.py
	$(PY) analyses/subliminal.py --student runs/subliminal-soft --control runs/subliminal-soft-control --cross-init runs/subliminal-soft-crossinit --out figures/subliminal/soft
	$(PY) analyses/gradient_pressure.py runs/subliminal --out figures/subliminal
	$(PY) analyses/cross_setting.py

test-all: install
	$(PY) -m pytest -q -m "slow or not slow"

clean-runs:
	find runs -mindepth 1 -maxdepth 1 ! -name README.md -exec rm -rf {} +
