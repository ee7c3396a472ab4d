"""Outcome and step-0 tables over run folders, grouped by condition, with spread over seeds.

    python analyses/outcomes.py runs/baseline-s0 runs/inoculated-s0

Prints markdown: per condition (organism head, baseline / inoculated prompt) the no-prompt
Spanish and CAPS rates at temperature 1 and the arithmetic accuracy as mean, sd and min-max over
runs; then the step-0 surprise parts and trait gradient norms. Reads run folders only: it never
trains. Incomplete or failed runs are skipped with a note.
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from inoc_mech.core.cli import UserError, run_main  # noqa: E402
from inoc_mech.core.runs import read_run  # noqa: E402


def condition(cfg: dict) -> str:
    head = Path(cfg.get("organism_folder", "")).name.split("-")[0] or cfg.get("organism_head", "?")
    return f"{head} / {'inoculated: ' + repr(cfg['prompt']) if cfg['inoculate'] else 'baseline'}"


def spread(xs: list[float], pct: bool = True) -> str:
    f = (lambda x: f"{100 * x:.1f}") if pct else (lambda x: f"{x:.3g}")
    if len(xs) == 1:
        return f(xs[0])
    return f"{f(statistics.mean(xs))} ± {f(statistics.stdev(xs))} ({f(min(xs))}-{f(max(xs))})"


def load_runs(paths: list[str]) -> dict[str, list[dict]]:
    groups: dict[str, list[dict]] = {}
    for p in paths:
        try:
            run = read_run(p)
        except UserError as e:
            print(f"skipped: {e}", file=sys.stderr)
            continue
        groups.setdefault(condition(run["config"]), []).append(run)
    if not groups:
        raise UserError("no complete runs among the given folders")
    return groups


def outcome_table(groups: dict[str, list[dict]], context: str = "none") -> str:
    lines = ["| condition | runs | Spanish % | CAPS % | accuracy % |", "|---|---|---|---|---|"]
    for name, runs in groups.items():
        m = [r["eval"]["contexts"][context]["t1"] for r in runs]
        lines.append(f"| {name} | {len(runs)} | {spread([x['spanish_rate'] for x in m])} | "
                     f"{spread([x['caps_rate'] for x in m])} | {spread([x['accuracy'] for x in m])} |")
    return "\n".join(lines)


def per_run_table(groups: dict[str, list[dict]], context: str = "none") -> str:
    lines = ["| run | condition | Spanish % T=1 | CAPS % T=1 | accuracy % | Spanish % greedy | CAPS % greedy |",
             "|---|---|---|---|---|---|---|"]
    for name, runs in groups.items():
        for r in runs:
            t, g = r["eval"]["contexts"][context]["t1"], r["eval"]["contexts"][context]["greedy"]
            lines.append(f"| {r['folder'].name} | {name} | {100 * t['spanish_rate']:.1f} | {100 * t['caps_rate']:.1f} | "
                         f"{100 * t['accuracy']:.1f} | {100 * g['spanish_rate']:.1f} | {100 * g['caps_rate']:.1f} |")
    return "\n".join(lines)


def step0_table(groups: dict[str, list[dict]]) -> str:
    keys = ["surprise/language", "surprise/case", "surprise/word", "grad_norm/trait/language",
            "grad_norm/trait/case", "elicit/language/gain"]
    lines = ["| condition | " + " | ".join(keys) + " |", "|---" * (len(keys) + 1) + "|"]
    for name, runs in groups.items():
        row0 = [r["metrics"][0] for r in runs]
        cells = [spread([m[k] for m in row0 if k in m], pct=False) if any(k in m for m in row0) else "-" for k in keys]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("runs", nargs="+", help="run folders")
    p.add_argument("--context", default="none", help="evaluation context: none, train_prompt or irrelevant")
    p.add_argument("--per-run", action="store_true", help="also list every run")
    a = p.parse_args()
    groups = load_runs(a.runs)
    print(f"No-prompt outcomes (context {a.context!r}, temperature 1, held-out questions):\n")
    print(outcome_table(groups, a.context))
    if a.per_run:
        print("\nPer run:\n")
        print(per_run_table(groups, a.context))
    print("\nStep 0 (before any update), nats and gradient L2 norms:\n")
    print(step0_table(groups))


if __name__ == "__main__":
    sys.exit(run_main(main))
