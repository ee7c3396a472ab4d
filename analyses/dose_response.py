"""Dose-response: is the no-prompt change a finetuning makes linear in what its prompt leaves to be learned?

    python -m inoc_mech.studies.sweep --name dose-tiny --steps 20 --seeds 0 1 --prompts "speak spanish" "be kind" --prompted && python analyses/dose_response.py runs/dose-tiny --out figures/dose_response-tiny

Reads sweep folders (each one substrate; they must have been run with `--prompted`, which evaluates the
starting model under every condition's prompt into `pretrained/prompted.json`) and never trains. For
every run and trait of the (Spanish+CAPS) setting:
- y = change of the trait's no-prompt rate (T=1, the setting's no-prompt context) from the starting
  model's: run rate - pretrained rate;
- x = the trait level the data would instil (`--data-level`, 1: every training reply has the trait)
  minus the level the starting model already shows under the run's prompt (T=1 rate, prompted.json);
  the organism also has the exact P(trait) at the first answer token (`p_first`), shown in the table;
- the step-0 elicitation of the trait in nats (baseline's step-0 surprise minus the condition's, same
  seed: `analyses.gradient_pressure`'s definition).
The published model (Wichers et al., appendix H) is y = k x, k near 1. Fit per (sweep, trait): least
squares y = k x + b over the runs, k's 95% interval from a bootstrap over conditions (each with its
seeds), Pearson r and the residual sd; once over all prompts, once over the baseline and the prompts
that set the trait (`Setting.prompt_sets`: its own dose, without the other trait's prompts). Writes into `--out` (default figures/dose_response/)
`dose_response.html` / `.png` (rows: traits; left: y against x with each fit; right: y against the
elicitation in nats) and `summary.md` / `summary.json`.
"""

from __future__ import annotations

import json
import math
import sys
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import plotly.graph_objects as go
from plotly.subplots import make_subplots

from analyses.gradient_pressure import load_conditions, outcome, step0, trait_surprise  # (the installed package: also under python analyses/dose_response.py)
from inoc_mech.core import plots
from inoc_mech.core.cli import UserError, parse_config, run_main
from inoc_mech.core.stats import json_ready, linear_fit, mean_ci
from inoc_mech.studies.collect import find_runs, pretrained_eval, setting_of


@dataclass
class DoseConfig:
    """Which sweeps, and where the figure goes."""
    sweeps: list = field(default_factory=lambda: ["runs/dose"], metadata={"help": "sweep folders run with --prompted (one substrate each)", "positional": "*"})
    out: str = field(default="figures/dose_response", metadata={"help": "output folder"})
    data_level: float = field(default=1.0, metadata={"help": "trait level the training data would instil (1: every reply has the trait)"})
    n_boot: int = field(default=2000, metadata={"help": "bootstrap resamples of the conditions"})
    png: bool = field(default=True, metadata={"help": "also write PNGs (needs Chromium)"})

    def __post_init__(self):
        if not 0 <= self.data_level <= 1:
            raise ValueError("--data-level must be in [0, 1]")
        if self.n_boot < 1:
            raise ValueError("--n-boot must be >= 1")


def sweep_points(folder: Path, data_level: float) -> tuple[str, dict, list[dict]]:
    """(sweep label: its folder name, trait labels, one point per run and trait) of one sweep folder."""
    prompted_file = folder / "pretrained" / "prompted.json"
    if not prompted_file.exists():
        raise UserError(f"{folder}: no pretrained/prompted.json; rerun its sweep command with --prompted (complete runs "
                        "are kept; only the starting model is evaluated under each prompt)")
    prompted = json.loads(prompted_file.read_text())["contexts"]
    conds = load_conditions(find_runs([folder]))
    runs = [r for c in conds.values() for r in c.runs]
    setting = setting_of(runs[0])
    pre = pretrained_eval(runs)
    if pre is None:
        raise UserError(f"{folder}: no pretrained/eval.json (the sweep writes it before its runs)")
    base = conds.get("baseline")
    if base is None:
        raise UserError(f"{folder}: no baseline runs (the no-prompt condition): elicitation needs them")
    base_step0 = {r["config"]["seed"]: step0(r) for r in base.runs}
    label = folder.name  # the sweep: one line per sweep and trait
    points = []
    for name, c in conds.items():
        if name not in prompted:
            raise UserError(f"{folder}: prompted.json has no condition {name!r}: delete it and rerun the sweep with --prompted")
        for t in setting.traits:
            key = setting.rate_keys[t]
            p_rate = prompted[name]["t1"][key]
            p_first = prompted[name].get("p_first", {}).get(t)
            pre_rate = pre["contexts"][setting.none_context]["t1"][key]
            for r in c.runs:
                seed = r["config"]["seed"]
                tp = setting.trait_parts
                el = (trait_surprise(base_step0[seed], t, tp) - trait_surprise(step0(r), t, tp) if seed in base_step0
                      else math.nan)
                told = c.prompt is None or setting.prompt_sets(c.prompt) is not None
                sets = c.prompt is None or t in (setting.prompt_sets(c.prompt) or set())
                points.append({"sweep": label, "trait": t, "condition": name, "prompt": c.prompt, "seed": seed, "sets": sets,
                               "x": data_level - p_rate, "told": told, "prompted_rate": p_rate, "p_first": p_first,
                               "elicitation": el, "y": outcome(r, key) - pre_rate, "rate": outcome(r, key),
                               "pretrained_rate": pre_rate})
    return label, dict(setting.trait_labels), points


def summarise(points: list[dict], n_boot: int) -> dict:
    out = {}
    for sub in dict.fromkeys(p["sweep"] for p in points):
        for t in dict.fromkeys(p["trait"] for p in points if p["sweep"] == sub):
            pts = [p for p in points if p["sweep"] == sub and p["trait"] == t]
            fit = linear_fit([p["x"] for p in pts], [p["y"] for p in pts], [p["condition"] for p in pts], n_boot=n_boot)
            nats = linear_fit([p["elicitation"] for p in pts], [p["y"] for p in pts], [p["condition"] for p in pts],
                              n_boot=n_boot)  # (points of one sweep: its conditions are the groups)
            own = [p for p in pts if p["sets"]]  # the baseline and the prompts that set this trait (its dose)
            fit_own = linear_fit([p["x"] for p in own], [p["y"] for p in own], [p["condition"] for p in own], n_boot=n_boot)
            told = all(p["told"] for p in pts)  # False: the setting cannot tell which prompts set the trait
            conds = {}
            for p in pts:
                conds.setdefault(p["condition"], []).append(p)
            out[f"{sub}/{t}"] = {"sweep": sub, "trait": t, "fit": fit.to_dict(), "fit_nats": nats.to_dict(),
                                 "fit_own": fit_own.to_dict(), "told": told,
                                 "conditions": {c: {"prompt": ps[0]["prompt"], "x": ps[0]["x"], "p_first": ps[0]["p_first"],
                                                    "prompted_rate": ps[0]["prompted_rate"],
                                                    "y": mean_ci([p["y"] for p in ps]).__dict__,
                                                    "elicitation": mean_ci([p["elicitation"] for p in ps]).__dict__,
                                                    "n": len(ps)} for c, ps in conds.items()}}
    return out


def figure(points: list[dict], summary: dict, labels: dict) -> go.Figure:
    traits = list(dict.fromkeys(p["trait"] for p in points))
    fig = make_subplots(rows=len(traits), cols=2, horizontal_spacing=0.1, vertical_spacing=0.16,
                        subplot_titles=[s for t in traits for s in (
                            f"{labels.get(t, t)}: change vs (data level - prompted starting level)",
                            f"{labels.get(t, t)}: change vs step-0 elicitation")])
    subs = list(dict.fromkeys(p["sweep"] for p in points))
    for row, t in enumerate(traits, 1):
        for i, sub in enumerate(subs):
            s = summary.get(f"{sub}/{t}")
            if s is None:
                continue
            color = plots.COLORS[i % len(plots.COLORS)]
            for col, xk, fk in ((1, "x", "fit"), (2, "elicitation", "fit_nats")):
                conds = s["conditions"]
                xs = [c[xk] if xk == "x" else c["elicitation"]["mean"] for c in conds.values()]
                ys = [100 * c["y"]["mean"] for c in conds.values()]
                fig.add_scatter(x=xs, y=ys, mode="markers", marker=dict(color=color, size=8), name=sub, legendgroup=sub,
                                showlegend=row == 1 and col == 1, row=row, col=col,
                                text=[c["prompt"] or "baseline (no prompt)" for c in conds.values()],
                                hovertemplate="%{text}<br>x %{x:.3f}<br>change %{y:.1f} pts<extra></extra>")
                f = s[fk]
                if math.isfinite(f["k"]):
                    finite = [x for x in xs if math.isfinite(x)]
                    lo, hi = min(finite), max(finite)
                    fig.add_scatter(x=[lo, hi], y=[100 * (f["k"] * lo + f["b"]), 100 * (f["k"] * hi + f["b"])],
                                    mode="lines", line=dict(color=color, dash="dash"), showlegend=False, row=row, col=col,
                                    hoverinfo="skip")
            f = s["fit"]
            text = (f"{sub}: k = {f['k']:.2f} [{f['k_lo']:.2f}, {f['k_hi']:.2f}], r = {f['r']:.2f}" if math.isfinite(f["k"])
                    else f"{sub}: k not defined (no spread in x)")
            fig.add_annotation(text=text,
                               xref="x domain" if row == 1 else f"x{2 * row - 1} domain",
                               yref="y domain" if row == 1 else f"y{2 * row - 1} domain",
                               x=0.02, y=0.98 - 0.09 * i, showarrow=False, xanchor="left", font=dict(color=color))
        fig.add_scatter(x=[0, 1], y=[0, 100], mode="lines", line=dict(color="#999", dash="dot"), name="k = 1",
                        showlegend=row == 1, row=row, col=1, hoverinfo="skip")
        fig.update_xaxes(title_text="data level - prompted starting level", row=row, col=1)
        fig.update_xaxes(title_text="step-0 elicitation (nats: per trait token on the organism, per reply on real text)",
                         row=row, col=2)
        fig.update_yaxes(title_text="no-prompt change (pts)", row=row, col=1)
    plots.style(fig, "Dose-response: no-prompt change after finetuning vs what the prompt leaves to learn",
                height=420 * len(traits) + 120,
                subtitle="points: conditions (mean over seeds); dashed: least-squares fit over runs; dotted: k = 1 through 0")
    return plots.legend_below(fig)


def markdown(summary: dict, labels: dict) -> str:
    lines = ["| sweep | trait | points | k [95% CI] | intercept | Pearson r | runs (conditions) | residual sd | r vs elicitation (nats) |",
             "|---|---|---|---|---|---|---|---|---|"]
    for s in summary.values():
        for which, f in (("all prompts", s["fit"]), ("baseline + prompts that set the trait", s["fit_own"])):
            g = s["fit_nats"]["r"] if which == "all prompts" else math.nan
            if not math.isfinite(f["k"]):  # x without spread, or a setting that cannot tell which prompts set it
                why = ("the setting cannot tell which prompts set the trait" if which != "all prompts" and not s["told"]
                       else "fewer than 3 conditions" if f["n_groups"] < 3
                       else "no spread in x: no prompt changes the starting model's rate")
                lines.append(f"| {s['sweep']} | {labels.get(s['trait'], s['trait'])} | {which} | not defined ({why}) | | | "
                             f"{f['n']} ({f['n_groups']}) | | {'-' if math.isnan(g) else f'{g:.2f}'} |")
                continue
            lines.append(f"| {s['sweep']} | {labels.get(s['trait'], s['trait'])} | {which} | {f['k']:.2f} [{f['k_lo']:.2f}, {f['k_hi']:.2f}] | "
                         f"{100 * f['b']:.1f} pts | {f['r']:.2f} | {f['n']} ({f['n_groups']}) | {100 * f['residual_sd']:.1f} pts | "
                         f"{'-' if math.isnan(g) else f'{g:.2f}'} |")
    lines += ["", "Per condition (mean over seeds): x = data level - prompted starting rate; change in points.", "",
              "| sweep | trait | condition | prompt | prompted starting rate % | exact P(trait) at the first answer token % | x | step-0 elicitation (nats) | change (pts) |",
              "|---|---|---|---|---|---|---|---|---|"]
    for s in summary.values():
        for name, c in s["conditions"].items():
            pf = "-" if c["p_first"] is None else f"{100 * c['p_first']:.1f}"
            lines.append(f"| {s['sweep']} | {labels.get(s['trait'], s['trait'])} | {name} | {c['prompt'] or '-'} | "
                         f"{100 * c['prompted_rate']:.1f} | {pf} | {c['x']:.3f} | "
                         f"{c['elicitation']['mean']:.3f} | {100 * c['y']['mean']:.1f} |")
    return "\n".join(lines)


def main(argv=None):
    a = parse_config(DoseConfig, argv, prog="python analyses/dose_response.py", description=__doc__.split("\n\n")[0])
    points, labels = [], {}
    names = [Path(f).name for f in a.sweeps]
    if len(set(names)) < len(names):
        raise UserError(f"sweep folders must have distinct names (each is a line of the figure): {names}")
    for folder in a.sweeps:
        folder = Path(folder)
        if not (folder / "sweep.json").exists():
            raise UserError(f"{folder}: not a sweep folder (no sweep.json): give folders written by inoc_mech.studies.sweep")
        _, lab, pts = sweep_points(folder, a.data_level)  # labelled by the sweep folder's name
        labels.update(lab)
        points += pts
    summary = summarise(points, a.n_boot)
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    md = ("Dose-response (T=1 rates; fits over runs, k's 95% CI from a bootstrap over conditions). Published: k about 1 "
          "(Wichers et al., toy task), r 0.57-0.90.\n\n" + markdown(summary, labels) + "\n")
    (out / "summary.md").write_text(md)
    (out / "summary.json").write_text(json.dumps(json_ready({"sweeps": a.sweeps, "data_level": a.data_level,
                                                             "fits": summary, "points": points}), indent=1))
    plots.save_all({"dose_response": figure(points, summary, labels)}, out, png=a.png)
    print(md)
    print(f"wrote {out}/dose_response.html" + (" (+ .png)" if a.png else ""))


if __name__ == "__main__":
    sys.exit(run_main(main))
