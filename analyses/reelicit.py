"""Re-elicitation table and figure: how much each run's trait comes back under prompts related to the inoculation prompt.

    python -m inoc_mech.studies.sweep --name sweep-tiny --steps 20 --seeds 0 --prompts && python analyses/reelicit.py runs/sweep-tiny --conditions baseline inoculated --out figures/reelicit-tiny

For each sweep folder, the runs (all, or `--conditions`) are read under their setting's re-elicitation
contexts (`Setting.reelicit_prompts`: the inoculation prompt, paraphrases, a negation, partial prompts, a
prompt of the same form with other content, an irrelevant prompt; and none): from eval.json for runs
trained with `--eval-reelicit`, else evaluated by `inoc_mech.studies.reelicit` unless `<sweep>/reelicit.json`
has them already (an evaluation, never training). Writes into `--out` (default figures/reelicit/)
`reelicit-<sweep>.html` / `.png` (the T=1 trait rates per context, one bar per condition, seeds as dots)
and `reelicit.md` (mean ± sd [min-max] over seeds, with the accuracy at no prompt).
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field
from pathlib import Path

from analyses.contexts import figure, table  # (the installed package: also under python analyses/reelicit.py)
from inoc_mech.core import plots
from inoc_mech.core.cli import parse_config, run_main
from inoc_mech.settings.base import setting_class
from inoc_mech.studies.reelicit import PRETRAINED, context_names, reelicit


@dataclass
class ReelicitFigConfig:
    """Which sweeps, and where the table goes."""
    sweeps: list = field(default_factory=lambda: ["runs/sweep"], metadata={"help": "sweep folders", "positional": "*"})
    conditions: list = field(default_factory=lambda: ["baseline", "inoculated"], metadata={"help": "conditions to show (none given: every run)"})
    samples: int = field(default=0, metadata={"help": "T=1 samples per question for runs still to evaluate (0: the run's own)"})
    out: str = field(default="figures/reelicit", metadata={"help": "output folder"})
    png: bool = field(default=True, metadata={"help": "also write PNGs (needs Chromium)"})


def main(argv=None):
    a = parse_config(ReelicitFigConfig, argv, prog="python analyses/reelicit.py", description=__doc__.split("\n\n")[0])
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    md, figs = [], {}
    for folder in map(Path, a.sweeps):
        data = reelicit(folder, a.conditions or None, a.samples)
        pre = data.pop(PRETRAINED, None)
        first = next(iter(data.values()))
        setting = setting_class(first["setting"], first["substrate"])
        groups: dict[str, list[dict]] = {}
        for v in sorted(data.values(), key=lambda v: ((a.conditions or []).index(v["condition"])
                                                      if v["condition"] in (a.conditions or []) else 99, v["seed"])):
            groups.setdefault(v["condition"], []).append({"eval": {"contexts": v["contexts"]}})
        ctxs = context_names(setting)
        prompts = {c: first["contexts"][c].get("prompt") for c in ctxs}
        md.append(f"### {folder} ({first['setting']} on {first['substrate']})\n\n" + "\n".join(
            f"- `{c}`: {p!r}" for c, p in prompts.items()) + "\n\n" + table(groups, setting, ctxs, pre))
        figs[f"reelicit-{folder.name}"] = figure(groups, setting, ctxs, title=f"Re-elicitation: {folder.name}")
    text = "Trait rates (%, T=1) of finished runs under prompts related to the inoculation prompt, mean ± sd [min-max] over seeds.\n\n" + "\n\n".join(md) + "\n"
    (out / "reelicit.md").write_text(text)
    plots.save_all(figs, out, png=a.png)
    print(text)
    print(f"wrote {out}/reelicit.md and {', '.join(figs)}.html" + (" (+ .png)" if a.png else ""))


if __name__ == "__main__":
    sys.exit(run_main(main))
