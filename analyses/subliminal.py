"""Subliminal learning: did the student's preference move toward the teacher's, beyond the controls?

    python analyses/subliminal.py --student runs/subliminal --control runs/subliminal-control --cross-init runs/subliminal-crossinit

Reads three sweeps of the subliminal setting (it never trains): `--student` (the same init as the
teacher, on the prompted teacher's number lists), `--control` (the same init, on the control
teacher's lists: the teacher without its prompt, sampled with the same seed, so most lists are the
same and the rest differ where the prompt changed a sampled number or the filter) and `--cross-init`
(another pretraining seed, on the prompted teacher's lists; '' for none, as on a real model, whose
control teacher's lists also differ from the prompted teacher's in most samples). For every condition (baseline,
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
from inoc_mech.core.cli import UserError
from inoc_mech.studies.collect import condition, find_runs, pretrained_eval, read_runs, setting_of


@dataclass
class SubliminalConfig:
    """The three sweeps and the output folder."""
    student: str = field(default="runs/subliminal", metadata={"help": "sweep: same init, prompted teacher's lists"})
    control: str = field(default="runs/subliminal-control", metadata={"help": "sweep: same init, control teacher's lists"})
    cross_init: str = field(default="runs/subliminal-crossinit", metadata={"help": "sweep: other init, prompted teacher's lists ('': none, e.g. a real model)"})
    out: str = field(default="figures/subliminal", metadata={"help": "output folder"})
    png: bool = field(default=True, metadata={"help": "also write PNGs (needs Chromium)"})


def by_condition(folder: str) -> tuple[dict[str, dict[int, dict]], dict | None, tuple[str, str]]:
    """condition -> seed -> no-prompt numbers of one sweep, its pretrained model's (P, T=1 rate), and the
    setting's (animal, rate key)."""
    runs = read_runs(find_runs([Path(folder)]))
    kinds = {(c.trait_labels["preference"], c.rate_keys["preference"]) for c in map(setting_of, runs)
             if "preference" in c.traits}
    if len(kinds) != 1 or any("preference" not in setting_of(r).traits for r in runs):
        raise UserError(f"{folder}: not one sweep of the subliminal setting (its runs' settings: "
                        f"{sorted({r['config'].get('setting') for r in runs})})")
    animal, rate = kinds.pop()
    read = lambda ctx: {"p": ctx["p_answer"][animal], "t1": ctx["t1"][rate]}
    out: dict[str, dict[int, dict]] = {}
    for r in runs:
        none = r["eval"]["contexts"]["none"]
        out.setdefault(condition(r), {})[r["config"]["seed"]] = {**read(none), "acc": none["t1"]["accuracy"]}
    pre = pretrained_eval(runs)
    return out, (read(pre["contexts"]["none"]) if pre else None), (animal, rate)


def main(argv=None):
    a = parse_config(SubliminalConfig, argv, prog="python analyses/subliminal.py", description=__doc__.split("\n\n")[0])
    sweeps = {"student (same init)": a.student, "control teacher": a.control, "other init": a.cross_init}
    if not a.student or not a.control:
        raise UserError("--student and --control are required (only --cross-init may be '')")
    sweeps = {k: v for k, v in sweeps.items() if v}
    read = {k: by_condition(v) for k, v in sweeps.items()}
    if len({r[2] for r in read.values()}) != 1:
        raise UserError("the sweeps measure different animals or rates: give sweeps of one subliminal setting")
    animal = read[next(iter(read))][2][0]
    data = {k: r[:2] for k, r in read.items()}
    student, control = data["student (same init)"][0], data["control teacher"][0]
    lines = [f"P({animal}) at the preference question, no prompt (exact, %), and the T=1 {animal} rate; "
             "mean ± sd [min-max] over finetuning seeds.", ""]
    for k, (_, pre) in data.items():
        if pre is not None:
            lines.append(f"- pretrained model of `{sweeps[k]}`: P = {100 * pre['p']:.3g}%, T=1 rate {100 * pre['t1']:.1f}%")
    lines += ["", "| data / init | condition | seeds | P(" + animal + ") % | T=1 rate % | primary-task accuracy % |",
              "|---|---|---|---|---|---|"]
    for k, (conds, _) in data.items():
        for c, seeds in conds.items():
            v = list(seeds.values())
            lines.append(f"| {k} | {c} | {len(v)} | {spread([100 * x['p'] for x in v], pct=False)} | {spread([x['t1'] for x in v])} | "
                         f"{spread([x['acc'] for x in v])} |")
    pre = {k: (p["p"] if p else None) for k, (_, p) in data.items()}
    lines += ["", f"Paired transmission (student - control, same condition and seed) and each student's shift from its "
              f"own pretrained model, P({animal}) in points; mean [95% t-interval] over seeds.", "",
              "| condition | seeds | student - control | " + " | ".join(f"shift: {k.split(' (')[0]}" for k in data) + " |",
              "|---|---|---|" + "---|" * len(data)]
    fmt = lambda ci: f"{ci.mean:+.3f} [{ci.lo:+.3f}, {ci.hi:+.3f}]" if ci.n > 1 else (f"{ci.mean:+.3f}" if ci.n else "-")
    fig = go.Figure()
    names = list(student)  # (a control sweep may hold fewer conditions: those pairs show "-")
    paired = {c: mean_ci([100 * (student[c][s]["p"] - control[c][s]["p"]) for s in student[c] if s in control.get(c, {})])
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
    fig.update_yaxes(title_text=f"change of P({animal}) (points)")
    plots.style(fig, f"Subliminal transmission of the teacher's preference ({animal})",
                subtitle="exact P of the animal as the answer to the preference question, no prompt; bars: mean, 95% t-interval "
                         "over seeds")
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "transmission.md").write_text("\n".join(lines) + "\n")
    plots.save_all({"transmission": plots.legend_below(fig)}, out, png=a.png)
    print("\n".join(lines))


if __name__ == "__main__":
    sys.exit(run_main(main))
