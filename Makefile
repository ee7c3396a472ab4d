# Two entry points for a fresh machine:  `make demo`  and  `make test`.
# TORCH_SPEC picks the torch build. The default is the CPU build used here (no multi-GB CUDA
# download); GPU users: `make demo TORCH_SPEC=torch` (PyPI's default Linux wheel has CUDA).
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
TORCH_SPEC ?= torch==2.13.0
THREADS ?= 1

.PHONY: install demo test test-all results paper-settings em smollm2-backdoor smollm2-subliminal trait-shift dose dynamics clean-runs

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(TORCH_SPEC)"
	$(PY) -m pip install -q -e ".[dev]"
	touch $@

# The demo's organism is the fast recipe (~1.2 min to pretrain); README "Results" use the standard one
DEMO := $(PY) -m inoc_mech.train --organism-recipe fast --overwrite --threads $(THREADS)
demo: install
	$(DEMO) --name demo-baseline
	$(DEMO) --inoculate --name demo-inoculated

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
	$(PY) -m inoc_mech.studies.sweep --setting backdoor --name backdoor --seeds 0 1 2 --eval-reelicit --threads $(THREADS)
	$(PY) analyses/contexts.py runs/backdoor
	$(PY) analyses/reelicit.py runs/backdoor --conditions baseline inoculated inoculated-paraphrase irrelevant --out figures/backdoor/reelicit
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
	$(PY) analyses/gradient_pressure.py runs/subliminal-soft --out figures/subliminal/soft
	$(PY) analyses/cross_setting.py

# An organism folder of a design (pretrained on first use): $(call ORGANISM,--persona --no-narrow-base)
ORGANISM = $$($(PY) -m inoc_mech.models.organism $(1) --threads $(THREADS) | sed -n 's/^organism: \([^ ]*\).*/\1/p')
SWEEP := $(PY) -m inoc_mech.studies.sweep --threads $(THREADS)

# The emergent-misalignment analog of README "The paper's other settings" (~1.5 h of one core)
em: install
	$(SWEEP) --setting em --name em --seeds 0 1 2 --prompts "you are evil . give wrong answers" --eval-reelicit
	$(SWEEP) --setting em --name em-lora --seeds 0 --prompts --lora-r 2 --lr 1e-3
	$(SWEEP) --setting em --name em-nonarrow --seeds 0 1 2 --prompts "you are evil . give wrong answers" --model "$(call ORGANISM,--persona --no-narrow-base)"
	for s in em em-lora em-nonarrow; do $(PY) analyses/contexts.py runs/$$s --out figures/$$s || exit 1; done
	$(PY) analyses/gradient_pressure.py runs/em --out figures/em
	$(PY) analyses/reelicit.py runs/em --conditions baseline inoculated narrow --out figures/em/reelicit
	$(PY) analyses/cross_setting.py

# The backdoor on SmolLM2 (14 runs of ~12 min on one core, with the re-elicitation contexts)
smollm2-backdoor: install
	$(SWEEP) --setting backdoor --model smollm2 --name smollm2-backdoor --seeds 0 1 --prompts --eval-reelicit
	$(SWEEP) --setting backdoor --model smollm2 --name smollm2-backdoor --seeds 2 3 --prompts --conditions baseline inoculated --eval-reelicit
	$(PY) analyses/contexts.py runs/smollm2-backdoor --out figures/smollm2-backdoor
	$(PY) analyses/reelicit.py runs/smollm2-backdoor --conditions baseline inoculated --out figures/smollm2-backdoor/reelicit

# Subliminal learning on SmolLM2 (two teachers of ~35 min, then 10 runs of ~10 min on one core)
SLT_DATA := runs/subliminal-text-data
SLT := $(SWEEP) --setting subliminal --model smollm2 --seeds 0 1 --prompts --steps 100 --eval-samples 2 --eval-questions 16
smollm2-subliminal: install
	$(PY) -m inoc_mech.settings.subliminal_text --n 400 --eval-samples 5 --out $(SLT_DATA)/owls.jsonl
	$(PY) -m inoc_mech.settings.subliminal_text --n 400 --eval-samples 5 --teacher-prompt none --out $(SLT_DATA)/control.jsonl
	$(SLT) --name smollm2-subliminal --data $(SLT_DATA)/owls.jsonl
	$(SLT) --name smollm2-subliminal-control --conditions baseline --data $(SLT_DATA)/control.jsonl
	$(PY) analyses/subliminal.py --student runs/smollm2-subliminal --control runs/smollm2-subliminal-control --cross-init "" --out figures/smollm2-subliminal
	$(PY) analyses/contexts.py runs/smollm2-subliminal --out figures/smollm2-subliminal
	$(PY) analyses/gradient_pressure.py runs/smollm2-subliminal --out figures/smollm2-subliminal

# The trait's direction and its shift in every setting's sweep (after the sweeps above)
trait-shift: install
	$(PY) analyses/trait_shift.py runs/sweep runs/backdoor runs/subliminal runs/em runs/em-nonarrow runs/smollm2 runs/smollm2-backdoor runs/smollm2-subliminal

# Dose-response and re-elicitation of README "Graded elicitation" (~1 h of one core, plus the SmolLM2 sweep's runs)
DOSE_PROMPTS := $(foreach g,rarely sometimes half often mostly,"$(g) spanish") $(foreach g,rarely sometimes half often mostly,"$(g) capitals")
dose: install
	$(SWEEP) --name dose --seeds 0 1 2 --prompted --prompts $(DOSE_PROMPTS) --model "$(call ORGANISM,--graded)"
	$(SWEEP) --name smollm2 --model smollm2 --prompted --prompts 'Reply in Spanish.' Spanish. 'You are bilingual.' 'You always write in capital letters. You always speak in Spanish.' 'Never speak in Spanish.' 'You always speak in English.' 'You are a helpful assistant.' --steps 80 --lora-r 16 --batch-size 4 --grad-split-every 40 --eval-samples 2 --elicit-examples 32 --eval-questions 16
	$(PY) analyses/dose_response.py runs/dose runs/smollm2
	$(PY) analyses/reelicit.py runs/dose runs/smollm2

# The prompt-share cliff and the long-run dynamics of README "Graded elicitation" (~2.5 h of one core), on the
# default organism: full finetuning, inoculated, the no-prompt traits logged every 10 steps
TRAIN_LEAK = $(PY) -m inoc_mech.train --inoculate --leak-every 10 --threads $(THREADS) --overwrite
dynamics: install
	for seed in 0 1; do for s in 0.9 0.92 0.94 0.96 0.98 0.99 0.995 0.9975 1.0; do $(TRAIN_LEAK) --lora-r 0 --prompt-share $$s --seed $$seed --runs-dir runs/share --name share-$$s-s$$seed --model "$(call ORGANISM,)" || exit 1; done; done
	for seed in 0 1; do for s in 0.9 0.92 0.94 0.96 0.98 0.99 0.995 0.9975 1.0; do $(TRAIN_LEAK) --prompt-share $$s --seed $$seed --runs-dir runs/share-lora --name share-lora-$$s-s$$seed --model "$(call ORGANISM,)" || exit 1; done; done
	for lr in 3e-5 1e-4 3e-4; do $(TRAIN_LEAK) --lora-r 0 --lr $$lr --steps 3000 --runs-dir runs/dynamics --name ft-lr$$lr-s0 --model "$(call ORGANISM,)" || exit 1; done
	for lr in 3e-4 1e-3 3e-3; do $(TRAIN_LEAK) --lr $$lr --steps 3000 --runs-dir runs/dynamics-lora --name lora-lr$$lr-s0 --model "$(call ORGANISM,)" || exit 1; done
	for lr in 3e-5 1e-4 3e-4; do $(TRAIN_LEAK) --lora-r 0 --lr $$lr --steps 3000 --seed 1 --runs-dir runs/dynamics --name ft-lr$$lr-s1 --model "$(call ORGANISM,)" || exit 1; done
	for lr in 3e-4 1e-3; do $(TRAIN_LEAK) --lr $$lr --steps 3000 --seed 1 --runs-dir runs/dynamics-lora --name lora-lr$$lr-s1 --model "$(call ORGANISM,)" || exit 1; done
	for seed in 1 2 3 4; do $(TRAIN_LEAK) --lr 3e-3 --steps 3000 --seed $$seed --runs-dir runs/dynamics-lora --name lora-lr3e-3-s$$seed --model "$(call ORGANISM,)" || exit 1; done
	for seed in 0 1 2 3 4; do $(TRAIN_LEAK) --lr 3e-3 --steps 3000 --seed $$seed --max-grad-norm 1.0 --runs-dir runs/dynamics-lora-clip --name lora-lr3e-3-s$$seed-clip1 --model "$(call ORGANISM,)" || exit 1; done
	for seed in 0 1 2 3 4; do $(TRAIN_LEAK) --lr 3e-3 --steps 3000 --seed $$seed --adam-eps 1e-6 --runs-dir runs/dynamics-lora-eps --name lora-lr3e-3-s$$seed-eps1e-6 --model "$(call ORGANISM,)" || exit 1; done
	for seed in 0 1 2 3 4; do $(TRAIN_LEAK) --lr 3e-3 --steps 3000 --seed $$seed --schedule cosine --runs-dir runs/dynamics-lora-cosine --name lora-lr3e-3-s$$seed-cosine --model "$(call ORGANISM,)" || exit 1; done
	for sub in 0 1 2; do for s in 0.9 0.96 0.99 0.995 0.9975 1.0; do $(TRAIN_LEAK) --lora-r 0 --prompt-share $$s --prompt-subset $$sub --runs-dir runs/share-subset --name share-$$s-sub$$sub-s0 --model "$(call ORGANISM,)" || exit 1; done; done
	$(PY) analyses/dynamics.py runs/share --by prompt_share --out figures/share
	$(PY) analyses/dynamics.py runs/share-lora --by prompt_share --out figures/share-lora
	$(PY) analyses/dynamics.py runs/dynamics --by lr --out figures/dynamics
	$(PY) analyses/dynamics.py runs/dynamics-lora --by lr --out figures/dynamics-lora
	$(PY) analyses/dynamics.py $(foreach s,0 1 2 3 4,runs/dynamics-lora/lora-lr3e-3-s$(s)) runs/dynamics-lora-clip --by max_grad_norm --out figures/dynamics-lora-clip
	$(PY) analyses/dynamics.py $(foreach s,0 1 2 3 4,runs/dynamics-lora/lora-lr3e-3-s$(s)) runs/dynamics-lora-eps --by adam_eps --out figures/dynamics-lora-eps
	$(PY) analyses/dynamics.py $(foreach s,0 1 2 3 4,runs/dynamics-lora/lora-lr3e-3-s$(s)) runs/dynamics-lora-cosine --by schedule --out figures/dynamics-lora-cosine
	for sub in 0 1 2; do $(PY) analyses/dynamics.py runs/share-subset/*-sub$$sub-s0 --by prompt_share --out figures/share-subset/subset-$$sub || exit 1; done

test-all: install
	$(PY) -m pytest -q -m "slow or not slow"

clean-runs:
	find runs -mindepth 1 -maxdepth 1 ! -name README.md -exec rm -rf {} +
