"""The selectivity design sweep: organism designs x finetuning levers x organism seeds.

    python -m inoc_mech.studies.designs --designs factored --levers default --organism-seeds 0 --dry-run

Each entry of DESIGNS is an organism (OrganismConfig overrides), each entry of LEVERS a finetuning
setting (SweepConfig overrides). For every measured (design, lever) pair and organism seed this
pretrains the organism if it is not cached (~6-8 min of one core each) and runs the core sweep
conditions (baseline, inoculated "speak spanish", converse "use capitals", both, irrelevant;
finetuning seed 0) into `<runs-dir>/<design>-o<seed>-<lever>/`, the layout that
`analyses/selectivity.py` reads. Complete runs are skipped, so the same command continues an
interrupted sweep. The full set is ~2 h of 2 cores; `--dry-run` prints what is left.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field
from pathlib import Path

from inoc_mech.core.cli import UserError, parse_config

# design name (letters and digits only: it is the first part of a sweep folder name) -> organism
DESIGNS = {
    "factored": {},  # the default organism: output rows = word + language + case
    "free": {"head": "free"},  # one free output row per token
    "factored2l": {"n_layers": 2},  # depth 2 instead of 4
    "factoredbias": {"bias": True},  # biases in attention and MLP projections
    "factoredformats": {"formats": True},  # a third prompt-controlled property (answer format)
    "factoredwide": {"d_model": 256, "d_mlp": 1024},  # twice the width
}
# lever name -> finetuning settings (defaults: full finetuning, Adam lr 1e-4, 300 steps, batch 32)
LEVERS = {
    "default": {},
    "lr3e-4": {"lr": 3e-4},
    "lr3e-5": {"lr": 3e-5},
    "steps600": {"steps": 600},
    "lora8": {"lora_r": 8, "lora_alpha": 32.0, "lr": 1e-3},  # LoRA on every projection; head and embeddings frozen
    "lora8-lr3e-4": {"lora_r": 8, "lora_alpha": 32.0, "lr": 3e-4},
    "lora8-lr5e-4": {"lora_r": 8, "lora_alpha": 32.0, "lr": 5e-4},
    "frozen-embed-head": {"freeze": ["embed", "unembed"]},  # full finetuning without embeddings and head
    "prompt-share-0.9": {"prompt_share": 0.9},  # 10% of the Spanish+CAPS examples without the prompt
    "lora1": {"lora_r": 1, "lora_alpha": 4.0, "lr": 1e-3},  # alpha / r = 4 as lora8
    "lora2": {"lora_r": 2, "lora_alpha": 8.0, "lr": 1e-3},
    "lora32": {"lora_r": 32, "lora_alpha": 128.0, "lr": 1e-3},
}
# the (design, lever) pairs of the measured table (README "When does inoculation stay selective?")
MEASURED = [("factored", lever) for lever in LEVERS] + [
    ("free", "default"), ("free", "lora8"), ("factored2l", "default"), ("factoredbias", "default"),
    ("factoredformats", "default"), ("factoredwide", "default")]


@dataclass
class DesignsConfig:
    """Which part of the design sweep to run."""
    designs: list = field(default_factory=list, metadata={"help": f"designs to run (default: all measured): {', '.join(DESIGNS)}"})
    levers: list = field(default_factory=list, metadata={"help": f"levers to run (default: all measured): {', '.join(LEVERS)}"})
    organism_seeds: list = field(default_factory=lambda: [0, 1, 2], metadata={"help": "organism pretraining seeds"})
    seeds: list = field(default_factory=lambda: [0], metadata={"help": "finetuning seeds (1 2: a check on fresh data orders)"})
    runs_dir: str = field(default="runs/selectivity", metadata={"help": "folder of the sweep folders"})
    organism_cache: str = field(default="runs/_organism", metadata={"help": "folder of cached organisms"})
    jobs: int = field(default=0, metadata={"help": "runs at once (0: as the sweep decides, at most 2)"})
    dry_run: bool = field(default=False, metadata={"help": "print the sweeps and what is left, train nothing"})

    def __post_init__(self):
        for name, known in (("designs", DESIGNS), ("levers", LEVERS)):
            bad = [x for x in getattr(self, name) if x not in known]
            if bad:
                raise ValueError(f"unknown --{name} {bad}; choose from {', '.join(known)}")
        self.organism_seeds = [int(s) for s in self.organism_seeds]
        self.seeds = [int(s) for s in self.seeds]

    def pairs(self) -> list[tuple[str, str]]:
        return [(d, lv) for d, lv in MEASURED
                if (not self.designs or d in self.designs) and (not self.levers or lv in self.levers)]


def organism_config(design: str, seed: int, cache: str):
    from inoc_mech.models.organism import OrganismConfig

    return OrganismConfig(seed=seed, cache=cache, **DESIGNS[design])


def sweep_config(design: str, lever: str, seed: int, org: Path, cfg: DesignsConfig):
    from inoc_mech.studies.sweep import SweepConfig

    return SweepConfig(name=f"{design}-o{seed}-{lever}", runs_dir=cfg.runs_dir, prompts=[], seeds=cfg.seeds,
                       model=str(org), jobs=cfg.jobs, dry_run=cfg.dry_run, **LEVERS[lever])


def run(cfg: DesignsConfig) -> None:
    from inoc_mech.models.organism import ensure_organism
    from inoc_mech.studies.sweep import sweep

    pairs = cfg.pairs()
    if not pairs:
        raise UserError("no measured (design, lever) pair matches --designs / --levers")
    for design, lever in pairs:
        for seed in cfg.organism_seeds:
            ocfg = organism_config(design, seed, cfg.organism_cache)
            org = ocfg.folder()
            if cfg.dry_run:
                state = "cached" if (org / "COMPLETE").exists() else "to pretrain"
                print(f"{design}-o{seed}-{lever}: organism {org} ({state})")
                if not (org / "COMPLETE").exists():
                    continue
            else:
                org = ensure_organism(ocfg)
            sweep(sweep_config(design, lever, seed, org, cfg))
    if not cfg.dry_run:
        print(f"analyse: python analyses/selectivity.py {cfg.runs_dir} --out figures/selectivity")


def main(argv=None):
    run(parse_config(DesignsConfig, argv, prog="python -m inoc_mech.studies.designs", description=__doc__.split("\n\n")[1]))


if __name__ == "__main__":
    from inoc_mech.core.cli import run_main
    sys.exit(run_main(main))
