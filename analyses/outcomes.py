"""Outcome and step-0 tables over run folders, grouped by model and condition, with spread over seeds.

    python analyses/outcomes.py runs/baseline-s0 runs/inoculated-s0

Prints markdown: per model and condition the no-prompt rate of each trait at temperature 1 (the
run's setting says which eval.json metric scores which trait, and which context is "no prompt")
and the accuracy, as mean, sd and min-max over runs; then the step-0 surprise parts and trait
gradient norms where the runs have them. Reads run folders only: it never trains. Incomplete or
failed runs are skipped with a note. Works on organism and real-model runs alike.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field
from pathlib import Path

from inoc_mech.core.cli import parse_config, run_main
from inoc_mech.core.stats import spread
from inoc_mech.studies.collect import group, one_setting, read_runs


@dataclass
class OutcomesConfig:
    """Which runs to tabulate."""
    runs: list = field(default_factory=list, metadata={"help": "run folders", "positional": "+"})
    context: str = field(default="", metadata={"help": "evaluation context (default: the setting's no-prompt one, e.g. none)"})
    per_run: bool = field(default=False, metadata={"help": "also list every run"})


def label(run: dict) -> str:
    """Model (organism design or model folder) and condition of a run."""
    c = run["config"]
    if c.get("organism_folder"):
        model = Path(c["organism_folder"]).name.split("-")[0] or c.get("organism_head", "?")
    else:
        model = Path(str(c.get("model", "?"))).name
    return f"{model} / {'inoculated: ' + repr(c['prompt']) if c['inoculate'] else 'baseline'}"


def metrics(run: dict, context: str, decode: str) -> dict:
    ctx = run["eval"]["contexts"]
    if context not in ctx:
        from inoc_mech.core.cli import UserError
        raise UserError(f"run {run['folder']} has no evaluation context {context!r} (it has {', '.join(ctx)}): "
                        "pass one of those with --context")
    return ctx[context][decode]


def outcome_table(groups: dict[str, list[dict]], context: str, rates: dict[str, str]) -> str:
    cols = list(rates.values())
    lines = ["| condition | runs | " + " | ".join(f"{c} %" for c in rates) + " | accuracy % |", "|---" * (len(cols) + 3) + "|"]
    for name, runs in groups.items():
        m = [metrics(r, context, "t1") for r in runs]
        lines.append(f"| {name} | {len(runs)} | " + " | ".join(spread([x[k] for x in m]) for k in cols)
                     + f" | {spread([x['accuracy'] for x in m])} |")
    return "\n".join(lines)


def per_run_table(groups: dict[str, list[dict]], context: str, rates: dict[str, str]) -> str:
    heads = [f"{c} % T=1" for c in rates] + ["accuracy %"] + [f"{c} % greedy" for c in rates]
    lines = ["| run | condition | " + " | ".join(heads) + " |", "|---" * (len(heads) + 2) + "|"]
    for name, runs in groups.items():
        for r in runs:
            t, g = metrics(r, context, "t1"), metrics(r, context, "greedy")
            cells = [t[k] for k in rates.values()] + [t["accuracy"]] + [g[k] for k in rates.values()]
            lines.append(f"| {r['folder'].name} | {name} | " + " | ".join(f"{100 * v:.1f}" for v in cells) + " |")
    return "\n".join(lines)


def step0_table(groups: dict[str, list[dict]], traits: tuple[str, ...]) -> str:
    keys = [f"surprise/{t}" for t in traits] + ["surprise/word"] + [f"grad_norm/trait/{t}" for t in traits] \
        + [f"elicit/{traits[0]}/gain"]
    lines = ["| condition | " + " | ".join(keys) + " |", "|---" * (len(keys) + 1) + "|"]
    for name, runs in groups.items():
        row0 = [r["metrics"][0] for r in runs]
        cells = [spread([m[k] for m in row0 if k in m], pct=False) if any(k in m for m in row0) else "-" for k in keys]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv=None):
    a = parse_config(OutcomesConfig, argv, prog="python analyses/outcomes.py", description=__doc__.split("\n\n")[0])
    runs = read_runs(a.runs, skip_bad=True)
    setting = one_setting(runs)
    context = a.context or setting.none_context
    rates = {setting.trait_labels[t]: setting.rate_keys[t] for t in setting.traits}
    groups = group(runs, key=label)
    print(f"No-prompt outcomes (context {context!r}, temperature 1, held-out questions):\n")
    print(outcome_table(groups, context, rates))
    if a.per_run:
        print("\nPer run:\n")
        print(per_run_table(groups, context, rates))
    print("\nStep 0 (before any update), nats and gradient L2 norms:\n")
    print(step0_table(groups, setting.traits))


if __name__ == "__main__":
    sys.exit(run_main(main))
