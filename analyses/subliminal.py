"""Subliminal learning: did the student's preference move toward the teacher's, beyond the controls?

    python analyses/subliminal.py --student runs/subliminal --control runs/subliminal-control --cross-init runs/subliminal-crossinit

Reads three sweeps of the subliminal setting (it never trains): `--student` (the same init as the
teacher, on the prompted teacher's number lists), `--control` (the same init, on the control
teacher's lists: the teacher without its prompt, same sampling seed, so the two data sets differ
only where the prompt changed a sampled number) and `--cross-init` (another pretraining seed, on the
prompted teacher's lists). For every condition (baseline, inoculated, ...) and seed: the exact
probability of the teacher's animal at the preference question's answer token with no prompt
(`p_answer`, no sampling noise) and the T=1 rate, and the paired transmission = student - control
(same condition and seed). Writes `--out` (default figures/subliminal/): `transmission.html` / `.png`
and `transmission.md`.
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
    lines += ["", "Paired transmission: student - control (same condition and seed), P(" + TRAIT_ANIMAL + ") in points; "
              "95% t-interval over seeds.", "", "| condition | seeds | student - control | other init - control |", "|---|---|---|---|"]
    fig = go.Figure()
    other = data["other init"][0]
    names = [c for c in student if c in control]
    for i, (label, src) in enumerate((("same init", student), ("other init", other))):
        ys, los, his = [], [], []
        for c in names:
            d = [100 * (src[c][s]["p"] - control[c][s]["p"]) for s in src.get(c, {}) if s in control[c]]
            ci = mean_ci(d)
            ys.append(ci.mean)
            los.append(ci.lo)
            his.append(ci.hi)
        fig.add_bar(x=names, y=ys, name=f"{label} student - control", marker_color=plots.COLORS[i],
                    error_y=plots.error_array(ys, los, his))
        if label == "same init":
            same = (ys, los, his)
    for j, c in enumerate(names):
        d_other = [100 * (other[c][s]["p"] - control[c][s]["p"]) for s in other.get(c, {}) if s in control[c]]
        o = mean_ci(d_other)
        lines.append(f"| {c} | {len(student[c])} | {same[0][j]:+.2f} [{same[1][j]:+.2f}, {same[2][j]:+.2f}] | "
                     f"{o.mean:+.2f} [{o.lo:+.2f}, {o.hi:+.2f}] |")
    fig.add_hline(y=0, line=dict(color="#888", width=1))
    fig.update_yaxes(title_text=f"change of P({TRAIT_ANIMAL}) vs the control student (points)")
    plots.style(fig, f"Subliminal transmission of the teacher's preference ({TRAIT_ANIMAL})",
                subtitle="exact P at the preference question's answer token, no prompt; paired by condition and seed; "
                         "bars: mean, 95% t-interval over seeds")
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "transmission.md").write_text("\n".join(lines) + "\n")
    plots.save_all({"transmission": plots.legend_below(fig)}, out, png=a.png)
    print("\n".join(lines))


if __name__ == "__main__":
    sys.exit(run_main(main))
