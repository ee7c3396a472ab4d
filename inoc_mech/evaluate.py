"""Re-evaluate a finished run folder with its own setting and print its evaluation table (the run is not modified).

    python -m inoc_mech.evaluate runs/demo-inoculated --samples-per-question 1
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field

from inoc_mech.core.cli import parse_config
from inoc_mech.core.runs import format_table


@dataclass
class EvaluateConfig:
    """Which run to re-evaluate, and how."""
    run: str = field(default="", metadata={"help": "a run folder under runs/", "positional": None})
    seed: int = field(default=0, metadata={"help": "sampling seed"})
    samples_per_question: int = field(default=3, metadata={"help": "temperature-1 samples per held-out question"})

    def __post_init__(self):
        if not self.run:
            raise ValueError("give a run folder: python -m inoc_mech.evaluate runs/<name>")
        if self.samples_per_question < 1:
            raise ValueError("--samples-per-question must be >= 1")


def main(argv=None):
    from inoc_mech.settings.load import load

    cfg = parse_config(EvaluateConfig, argv, prog="python -m inoc_mech.evaluate", description=__doc__.split("\n\n")[0])
    loaded = load(cfg.run)
    print(format_table(loaded.setting.evaluate(loaded.model, seed=cfg.seed, samples=cfg.samples_per_question)))


if __name__ == "__main__":
    from inoc_mech.core.cli import run_main
    sys.exit(run_main(main))
