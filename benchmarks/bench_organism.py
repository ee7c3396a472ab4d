"""Organism pretraining wall time: the standard recipe against the fast one, measured in one run.

    python benchmarks/bench_organism.py --steps-scale 0.05

Each (recipe, seed) pretrains from scratch in its own process (one CPU thread, nothing cached: a temporary
cache folder), and the processes run one after the other. Printed: pretraining seconds (the loop alone, as
`organism.json` records them), seconds per step, the report's quality numbers (held-out accuracy, worst
prompt following, base rates at T=1 and exact; only meaningful at `--steps-scale 1`) and the ratio of the
standard recipe's time (same seed) to each. Recipes: `models.organism.RECIPES` (`standard` is
`OrganismConfig()`, the organisms of README "Results"; `fast` is 1,200 steps of batch 64 at lr 1e-3 with MLP
width 256, length buckets and bf16 autocast). `--steps-scale` multiplies every recipe's steps (and warmup) for a quick
look; the seconds per step are then what to compare. Shared machines are noisy: read the ratios, and run
it when nothing else runs.
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path

from inoc_mech.core.cli import parse_config

REPO = Path(__file__).resolve().parents[1]
from inoc_mech.models.organism import RECIPES

CHILD = r"""
import json, sys
from dataclasses import replace
from inoc_mech.models.organism import OrganismConfig, ensure_organism
kw, scale, cache = json.loads(sys.argv[1]), float(sys.argv[2]), sys.argv[3]
cfg = OrganismConfig(**kw, cache=cache)
cfg = replace(cfg, steps=max(2, round(cfg.steps * scale)), warmup=max(1, round(cfg.warmup * scale)))
folder = ensure_organism(cfg, progress=False, quiet=True)
meta = json.loads((folder / "organism.json").read_text())
print("RESULT " + json.dumps({"steps": cfg.steps, "seconds": meta["pretrain_seconds"], "report": meta["report"]}))
"""


@dataclass
class BenchOrganismConfig:
    """What to pretrain."""
    recipes: list = field(default_factory=lambda: list(RECIPES), metadata={"help": f"recipes to time ({', '.join(RECIPES)})"})
    steps_scale: float = field(default=1.0, metadata={"help": "multiply every recipe's steps (1: the full pretraining)"})
    seeds: list = field(default_factory=lambda: [0], metadata={"help": "pretraining seeds (each recipe pretrains once per seed)"})

    def __post_init__(self):
        unknown = [r for r in self.recipes if r not in RECIPES]
        if unknown or not self.recipes:
            raise ValueError(f"--recipes: unknown {unknown}; choose from {', '.join(RECIPES)}")
        if not 0 < self.steps_scale <= 1:
            raise ValueError("--steps-scale must be in (0, 1]")
        try:
            self.seeds = [int(x) for x in self.seeds]
        except ValueError:
            raise ValueError("--seeds must be integers") from None


def main(argv=None):
    a = parse_config(BenchOrganismConfig, argv, prog="python benchmarks/bench_organism.py",
                     description=__doc__.split("\n\n")[0])
    out = {}
    with tempfile.TemporaryDirectory() as cache:
        for seed in a.seeds:
            for name in a.recipes:
                kw = {**RECIPES[name], "seed": seed, "threads": 1}
                p = subprocess.run([sys.executable, "-c", CHILD, json.dumps(kw), str(a.steps_scale), f"{cache}/{name}"],
                                   cwd=REPO, capture_output=True, text=True, env={"OMP_NUM_THREADS": "1", **_env()})
                line = next((l for l in p.stdout.splitlines() if l.startswith("RESULT ")), None)
                if p.returncode or line is None:
                    print(f"recipe {name} seed {seed} failed:\n{p.stderr[-3000:]}", file=sys.stderr)
                    return 1
                out[name, seed] = json.loads(line[len("RESULT "):])
                print(f"{name} seed {seed}: {out[name, seed]['seconds']:.1f} s", file=sys.stderr)
    print("| recipe | seed | steps | pretraining s | s / step | held-out accuracy | worst prompt following | "
          "base Spanish / CAPS, T=1 | exact | standard's time / this |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for (name, seed), r in out.items():
        rep, base = r["report"], out.get(("standard", seed))
        follow = min(x["rate_greedy"] for x in rep["prompt_following"].values())
        b, e = rep["base_rates_t1"], rep["base_rates_exact"]
        ratio = f"{base['seconds'] / r['seconds']:.2f}x" if base else "-"
        print(f"| {name} | {seed} | {r['steps']} | {r['seconds']:.1f} | {r['seconds'] / r['steps']:.3f} | "
              f"{rep['held_out_accuracy_greedy']:.1%} | {follow:.0%} | {b['spanish']:.1%} / {b['caps']:.1%} (n={b['n_answers']}) | "
              f"{e['spanish']:.1%} / {e['caps']:.1%} | {ratio} |")
    return 0


def _env() -> dict:
    import os
    return {k: v for k, v in os.environ.items() if k != "OMP_NUM_THREADS"}


if __name__ == "__main__":
    sys.exit(main())
