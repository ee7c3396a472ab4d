"""Re-evaluate a finished run folder and print its evaluation table (the run is not modified).

    python -m inoc_mech.evaluate runs/demo-inoculated --samples-per-question 1
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from inoc_mech.core.runs import load_run_model
from inoc_mech.models.world_eval import IRRELEVANT_EVAL_PROMPT, evaluate_contexts, format_table


def main(argv=None):
    """Re-evaluate a finished run folder and print its table (does not modify the run)."""
    p = argparse.ArgumentParser(prog="python -m inoc_mech.evaluate", description=main.__doc__)
    p.add_argument("run", help="a run folder under runs/")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--samples-per-question", type=int, default=3)
    a = p.parse_args(argv)
    model, tok, world, cfg = load_run_model(Path(a.run))
    contexts = {"none": None, "train_prompt": cfg["prompt"], "irrelevant": IRRELEVANT_EVAL_PROMPT}
    print(format_table(evaluate_contexts(model, tok, world, contexts, a.seed, a.samples_per_question)))


if __name__ == "__main__":
    from inoc_mech.core.cli import run_main
    sys.exit(run_main(main))
