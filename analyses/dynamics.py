"""Training dynamics of the no-prompt traits: when does a suppressed trait start to leak?

    for s in 0.9 1.0; do python -m inoc_mech.train --inoculate --lora-r 0 --steps 30 --prompt-share $s --leak-every 10 --runs-dir runs/share-tiny --name share-$s --overwrite; done && python analyses/dynamics.py runs/share-tiny --by prompt_share --out figures/share-tiny

Reads run folders trained with `--leak-every N` (a folder of runs, or run folders; it never trains) and
groups them by one field of their config.json (`--by`: prompt_share, lr, steps, lora_r, ...; seeds of a
group are averaged). Writes into `--out` `leak.html` / `.png` (each trait's no-prompt P(marked value) at
the first answer token over the steps, `leak/<trait>/p`, one line per group, mean over seeds with its
range) and `final.html` / `.png` (the run's T=1 no-prompt rate after training, eval.json, against the
group's value), `optimizer.html` / `.png` (each run's gradient norm, its step's update norm and its training
loss over the steps, log scale: where a run diverges, and whether its Adam steps grew first), plus
`summary.md`: per group, the final rate, the first logged step at which the no-prompt P(trait) reached
`--break-at` (default 0.5: halfway from nothing to always; "-" if never) and each run's mean step update norm
over the middle third of its steps.
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

from inoc_mech.core import plots
from inoc_mech.core.cli import UserError, parse_config, run_main
from inoc_mech.core.stats import mean_ci, spread
from inoc_mech.studies.collect import find_runs, one_setting, read_runs


@dataclass
class DynamicsConfig:
    """Which runs, how to group them, where the figures go."""
    runs: list = field(default_factory=lambda: ["runs/share"], metadata={"help": "folder of runs, or run folders", "positional": "*"})
    by: str = field(default="prompt_share", metadata={"help": "config.json field that tells the groups apart (prompt_share, lr, steps, lora_r, ...)"})
    break_at: float = field(default=0.5, metadata={"help": "no-prompt P(trait) at which the suppression counts as broken"})
    out: str = field(default="figures/dynamics", metadata={"help": "output folder"})
    png: bool = field(default=True, metadata={"help": "also write PNGs (needs Chromium)"})

    def __post_init__(self):
        if not 0 < self.break_at < 1:
            raise ValueError("--break-at must be in (0, 1)")


def series(run: dict, key: str) -> tuple[list[int], list[float]]:
    """A logged metric of a run over its steps."""
    rows = [r for r in run["metrics"] if key in r]
    return [r["step"] for r in rows], [r[key] for r in rows]


def leak_series(run: dict, trait: str) -> tuple[list[int], list[float]]:
    return series(run, f"leak/{trait}/p")


def middle_third(run: dict, key: str = "step_update_norm/total") -> float:
    """The mean of a logged metric over the middle third of a run's steps (nan where it was not logged)."""
    n = run["config"]["steps"]
    vals = [v for s, v in zip(*series(run, key)) if n / 3 <= s < 2 * n / 3]
    return float(np.mean(vals)) if vals else math.nan


def first_break(steps: list[int], ps: list[float], level: float) -> int | None:
    return next((s for s, p in zip(steps, ps) if p >= level), None)


def groups_of(runs: list[dict], by: str, trait: str) -> dict:
    """Runs by their value of config field `by` (one scalar type), each group's runs logged at the same steps."""
    values = [r["config"].get(by) for r in runs]
    if any(v is None or not isinstance(v, (int, float, str, bool)) for v in values) or len({type(v) for v in values}) > 1:
        have = sorted(k for k, v in runs[0]["config"].items() if isinstance(v, (int, float, str, bool)))
        raise UserError(f"--by {by!r} is not a scalar config.json field of one type in every run; fields: {', '.join(have)}")
    out: dict = {}
    for r in sorted(runs, key=lambda r: (r["config"][by], r["config"]["seed"])):
        if not leak_series(r, trait)[0]:
            raise UserError(f"run {r['folder']} has no leak/{trait}/p metrics: train it with --leak-every N, or leave it out")
        out.setdefault(r["config"][by], []).append(r)
    for value, rs in out.items():
        if len({tuple(leak_series(r, trait)[0]) for r in rs}) > 1:
            raise UserError(f"the runs with {by} = {value} logged leak metrics at different steps (other --steps or "
                            "--leak-every): group them by that field, or compare like with like")
    return out


def summarise(groups: dict, setting, level: float) -> dict:
    out = {}
    for value, runs in groups.items():
        row = {"n": len(runs), "seeds": [r["config"]["seed"] for r in runs], "traits": {},
               "update_middle": [middle_third(r) for r in runs]}
        for t in setting.traits:
            finals = [r["eval"]["contexts"][setting.none_context]["t1"][setting.rate_keys[t]] for r in runs]
            breaks = [first_break(*leak_series(r, t), level) for r in runs]
            row["traits"][t] = {"final": finals, "final_mean": float(np.mean(finals)), "break_steps": breaks}
        out[value] = row
    return out


def fig_leak(groups: dict, setting, by: str, level: float) -> go.Figure:
    traits = list(setting.traits)
    fig = make_subplots(rows=len(traits), cols=1, vertical_spacing=0.14,
                        subplot_titles=[f"no-prompt P({setting.trait_labels[t]}) at the first answer token" for t in traits])
    for row, t in enumerate(traits, 1):
        for i, (value, runs) in enumerate(groups.items()):
            series = [leak_series(r, t) for r in runs]  # the same steps in every run of a group (groups_of)
            steps = series[0][0]
            vals = np.array([s[1] for s in series])
            color = plots.COLORS[i % len(plots.COLORS)]
            fig.add_scatter(x=steps, y=vals.mean(0), mode="lines", line=dict(color=color), name=f"{by} = {value}",
                            legendgroup=str(value), showlegend=row == 1, row=row, col=1)
            if len(vals) > 1:
                fig.add_scatter(x=steps + steps[::-1], y=list(vals.max(0)) + list(vals.min(0)[::-1]), fill="toself",
                                fillcolor=color, opacity=0.15, line=dict(width=0), showlegend=False, hoverinfo="skip",
                                legendgroup=str(value), row=row, col=1)
        fig.add_hline(y=level, line=dict(color="#999", dash="dot"), row=row, col=1)
        fig.update_yaxes(title_text="P", range=[0, 1.02], row=row, col=1)
        fig.update_xaxes(title_text="step", row=row, col=1)
    n = sorted({len(r) for r in groups.values()})
    plots.style(fig, f"When the suppressed trait leaks: no-prompt P(trait) during training, by {by}",
                height=380 * len(traits) + 120,
                subtitle=f"lines: mean over seeds (n = {'-'.join(map(str, sorted({n[0], n[-1]})))}), band: their range; "
                         f"dotted: --break-at {level}")
    return plots.legend_below(fig)


def fig_final(summary: dict, setting, by: str) -> go.Figure:
    fig = go.Figure()
    xs = list(summary)
    for i, t in enumerate(setting.traits):
        stats = [mean_ci(summary[v]["traits"][t]["final"]) for v in xs]
        fig.add_scatter(x=xs, y=[100 * s.mean for s in stats], mode="lines+markers", name=setting.trait_labels[t],
                        line=dict(color=plots.COLORS[i % len(plots.COLORS)]),
                        error_y=plots.error_array([100 * s.mean for s in stats],
                                                  [max(0, 100 * s.lo) if math.isfinite(s.lo) else math.nan for s in stats],
                                                  [min(100, 100 * s.hi) if math.isfinite(s.hi) else math.nan for s in stats]))
    fig.update_xaxes(title_text=by)
    fig.update_yaxes(title_text="no-prompt rate after training, T=1 (%)", range=[0, 105])
    plots.style(fig, f"No-prompt trait rates after training, by {by}", subtitle="mean over seeds, 95% t-interval")
    return fig


OPTIMIZER = {"grad_norm/total": "gradient norm", "step_update_norm/total": "step update norm", "loss": "training loss"}


def fig_optimizer(groups: dict, by: str) -> go.Figure:
    fig = make_subplots(rows=len(OPTIMIZER), cols=1, vertical_spacing=0.08, subplot_titles=list(OPTIMIZER.values()))
    for row, key in enumerate(OPTIMIZER, 1):
        for i, (value, runs) in enumerate(groups.items()):
            for j, r in enumerate(runs):
                steps, vals = series(r, key)
                fig.add_scatter(x=steps, y=vals, mode="lines", line=dict(color=plots.COLORS[i % len(plots.COLORS)], width=1),
                                name=f"{by} = {value}", legendgroup=str(value), showlegend=row == 1 and j == 0,
                                hovertext=f"seed {r['config']['seed']}", row=row, col=1)
        fig.update_yaxes(type="log", title_text=OPTIMIZER[key], row=row, col=1)
        fig.update_xaxes(title_text="step", row=row, col=1)
    plots.style(fig, f"The optimizer during training, by {by}", height=300 * len(OPTIMIZER) + 120,
                subtitle="one line per run (seed); log scale")
    return plots.legend_below(fig)


def markdown(summary: dict, setting, by: str, level: float) -> str:
    heads = [f"{setting.trait_labels[t]} % at no prompt" for t in setting.traits] + [
        f"first step with P({setting.trait_labels[t]}) >= {level}" for t in setting.traits] + [
        "step update norm, middle third of the steps"]
    lines = [f"| {by} | runs | " + " | ".join(heads) + " |", "|---" * (len(heads) + 2) + "|"]
    for value, row in summary.items():
        cells = [spread(row["traits"][t]["final"]) for t in setting.traits]
        cells += [", ".join("-" if b is None else str(b) for b in row["traits"][t]["break_steps"]) for t in setting.traits]
        cells.append(", ".join("-" if math.isnan(u) else f"{u:.1e}" for u in row["update_middle"]))
        lines.append(f"| {value} | {row['n']} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv=None):
    a = parse_config(DynamicsConfig, argv, prog="python analyses/dynamics.py", description=__doc__.split("\n\n")[0])
    runs = read_runs(find_runs(a.runs), skip_bad=True)
    setting = one_setting(runs)
    groups = groups_of(runs, a.by, setting.traits[0])
    summary = summarise(groups, setting, a.break_at)
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    md = (f"No-prompt traits during and after training, grouped by {a.by} (T=1 rates: mean ± sd [min-max] over "
          f"seeds; break steps and step update norms per seed).\n\n" + markdown(summary, setting, a.by, a.break_at) + "\n")
    (out / "summary.md").write_text(md)
    (out / "summary.json").write_text(json.dumps({str(k): v for k, v in summary.items()}, indent=1))
    plots.save_all({"leak": fig_leak(groups, setting, a.by, a.break_at), "final": fig_final(summary, setting, a.by),
                    "optimizer": fig_optimizer(groups, a.by)}, out, png=a.png)
    print(md)
    print(f"wrote {out}/leak.html, final.html, optimizer.html" + (" (+ .png)" if a.png else ""))


if __name__ == "__main__":
    sys.exit(run_main(main))
