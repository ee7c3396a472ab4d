"""Subliminal learning: did the student's preference move toward the teacher's, beyond the controls?

    python analyses/subliminal.py --student runs/subliminal --control runs/subliminal-control --cross-init runs/subliminal-crossinit

Reads three sweeps of the subliminal setting (it never trains): `--student` (the same init as the
teacher, on the prompted teacher's number lists), `--control` (the same init, on the control
teacher's lists: the teacher without its prompt, sampled with the same seed, so most lists are the
same and the rest differ where the prompt changed a sampled number or the filter) and `--cross-init`
(another pretraining seed, on the prompted teacher's lists). For every condition (baseline,
inoculated, ...) and seed: the exact probability of the teacher's animal at the preference
question's answer token with no prompt (`p_answer`, no sampling noise) and the T=1 rate; the paired
transmission = student - control (same condition and seed); and each student's shift from its own
pretrained model (for the other init the only comparison made: it has no control teacher of its own).
Writes `--out` (default figures/subliminal/): `transmission.html` / `.png` and `transmission.md`.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field
from pathlib import Path

import plotly.graph_objects as go

from inoc_mech.core import plots
from inoc_mech.core.cli import parse_config, run_main
from inoc_mech.core.stats import mean_ci, spread
from inoc_mech.studies.collect import condition, find_runs, pretrained_eval, read_runs
from inoc_mech.settings.subliminal_organism import TRAIT_ANIMAL


@dataclass
class SubliminalConfig:
    """The three sweeps and the output folder."""
    student: str = field(default="runs/subliminal", metadata={"help": "sweep: same init, prompted teacher's lists"})
    control: str = field(default="runs/subliminal-control", metadata={"help": "sweep: same init, control teacher's lists"})
    cross_init: str = field(default="runs/subliminal-crossinit", metadata={"help": "sweep: other init, prompted teacher's lists"})
    out: str = field(default="figures/subliminal", metadata={"help": "output folder"})
    png: bool = field(default=True, metadata={"help": "also write PNGs (needs Chromium)"})


def by_condition(folder: str) -> tuple[dict[str, dict[int, dict]], dict | None]:
    """condition -> seed -> no-prompt numbers of one sweep, and its pretrained model's."""
    runs = read_runs(find_runs([Path(folder)]))
    out: dict[str, dict[int, dict]] = {}
    for r in runs:
        none = r["eval"]["contexts"]["none"]
        out.setdefault(condition(r), {})[r["config"]["seed"]] = {
            "p": none["p_answer"][TRAIT_ANIMAL], "t1": none["t1"][f"{TRAIT_ANIMAL}_rate"], "acc": none["t1"]["accuracy"]}
    pre = pretrained_eval(runs)
    return out, (pre["contexts"]["none"] if pre else None)


def main(argv=None):
    a = parse_config(SubliminalConfig, argv, prog="python analyses/subliminal.py", description=__doc__.split("\n\n")[0])
    sweeps = {"student (same init)": a.student, "control teacher": a.control, "other init": a.cross_init}
    data = {k: by_condition(v) for k, v in sweeps.items()}
    student, control = data["student (same init)"][0], data["control teacher"][0]
    lines = [f"P({TRAIT_ANIMAL}) at the preference question, no prompt (exact, %), and the T=1 {TRAIT_ANIMAL} rate; "
             "mean ± sd [min-max] over finetuning seeds.", ""]
    for k, (_, pre) in data.items():
        if pre is not None:
            lines.append(f"- pretrained model of `{sweeps[k]}`: P = {100 * pre['p_answer'][TRAIT_ANIMAL]:.2f}%, "
                         f"T=1 rate {100 * pre['t1'][f'{TRAIT_ANIMAL}_rate']:.1f}%")
    lines += ["", "| data / init | condition | seeds | P(" + TRAIT_ANIMAL + ") % | T=1 rate % | arithmetic accuracy % |",
              "|---|---|---|---|---|---|"]
    for k, (conds, _) in data.items():
        for c, seeds in conds.items():
            v = list(seeds.values())
            lines.append(f"| {k} | {c} | {len(v)} | {spread([x['p'] for x in v])} | {spread([x['t1'] for x in v])} | "
                         f"{spread([x['acc'] for x in v])} |")
    pre = {k: (p["p_answer"][TRAIT_ANIMAL] if p else None) for k, (_, p) in data.items()}
    lines += ["", f"Paired transmission (student - control, same condition and seed) and each student's shift from its "
              f"own pretrained model, P({TRAIT_ANIMAL}) in points; mean [95% t-interval] over seeds.", "",
              "| condition | seeds | student - control | shift: student | shift: control | shift: other init |",
              "|---|---|---|---|---|---|"]
    fmt = lambda ci: f"{ci.mean:+.2f} [{ci.lo:+.2f}, {ci.hi:+.2f}]" if ci.n > 1 else (f"{ci.mean:+.2f}" if ci.n else "-")
    fig = go.Figure()
    names = [c for c in student if c in control]
    paired = {c: mean_ci([100 * (student[c][s]["p"] - control[c][s]["p"]) for s in student[c] if s in control[c]])
              for c in names}
    shift = {k: {c: mean_ci([100 * (x["p"] - pre[k]) for x in conds.get(c, {}).values()] if pre[k] is not None else [])
                 for c in names} for k, (conds, _) in data.items()}
    for c in names:
        lines.append(f"| {c} | {len(student[c])} | {fmt(paired[c])} | " +
                     " | ".join(fmt(shift[k][c]) for k in data) + " |")
    bars = [("same init: student - control", paired)] + [(f"shift from pretrained: {k}", shift[k]) for k in data]
    for i, (label, cis) in enumerate(bars):
        ys = [cis[c].mean for c in names]
        fig.add_bar(x=names, y=ys, name=label, marker_color=plots.COLORS[i],
                    error_y=plots.error_array(ys, [cis[c].lo for c in names], [cis[c].hi for c in names]))
    fig.add_hline(y=0, line=dict(color="#888", width=1))
    fig.update_yaxes(title_text=f"change of P({TRAIT_ANIMAL}) (points)")
    plots.style(fig, f"Subliminal transmission of the teacher's preference ({TRAIT_ANIMAL})",
                subtitle="exact P at the preference question's answer token, no prompt; bars: mean, 95% t-interval "
                         "over seeds")
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "transmission.md").write_text("\n".join(lines) + "\n")
    plots.save_all({"transmission": plots.legend_below(fig)}, out, png=a.png)
    print("\n".join(lines))


if __name__ == "__main__":
    sys.exit(run_main(main))
