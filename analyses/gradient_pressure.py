"""Gradient pressure: does a prompt that already explains a trait stop the model from learning it?

    python -m inoc_mech.studies.sweep --name sweep-tiny --steps 20 --seeds 0 --prompts spanish "be kind" && python analyses/gradient_pressure.py runs/sweep-tiny --out figures/gradient_pressure-tiny

The full analysis (default sweep: 15 conditions x 2 seeds, ~7-15 min on 2 cores):

    python -m inoc_mech.studies.sweep && python analyses/gradient_pressure.py

Reads run folders (a sweep folder with sweep.json, a folder of run folders, or run folders) and
never trains unless `--train-missing` is given: missing runs stop it with the command that makes
them. Writes into `--out` (default figures/gradient_pressure/) HTML and PNG of seven figures and
`summary.json` + `summary.md`:
1. step0_surprise: step-0 surprise per trait part and condition (nats per answer-variant token);
2. loss_parts: the language and case parts of the trait-token loss over steps;
3. grad_norms: trait vs rest gradient norms over steps, and each trait's share of the gradient;
4. update_heatmap: per-module weight-update norms relative to baseline, with the Adam caveat;
5. outcomes: no-prompt Spanish and CAPS rates at temperature 1 per condition;
6. elicitation_suppression: a prompt's step-0 elicitation of a trait vs how much training under it
   suppresses that trait at no prompt, with Spearman rho, bootstrap 95% CI and p;
7. context_distance: how far a prompt moves the final hidden state at the answer start, vs how much
   of the co-learned trait generalises to no prompt.

Definitions (per seed, then mean and 95% t-interval over seeds; intervals of rates are clipped to
the possible range, e.g. 0-100 %):
- surprise/<part>: step-0 metrics row (before any update, i.e. the pretrained organism) on the
  step-0 training batch; `language` = -log p(Spanish | word), `case` = -log p(UPPER | word).
- elicitation of a trait = baseline's step-0 surprise part - the condition's, same seed (the same
  questions; only the system prompt differs): the log-prob gain of that trait under the prompt.
  `elicit/language/gain` (full answer-token log-prob gain on 64 fixed training answers, step 0) is
  reported alongside; it mixes language and case, so the per-trait figure uses the parts.
- suppression of a trait = 1 - rate at no prompt after training / baseline's mean rate
  (eval.json contexts.none.t1); generalisation = 1 - suppression.
- co-learned trait of a prompt: CAPS, unless the prompt sets the case (then Spanish; prompts that
  set both are left out of figure 7).
- context distance: final hidden state (after the last norm, what the unembedding reads) at the
  `<|assistant|>` token, with vs without the prompt, on the pretrained organism, averaged over the
  held-out questions: cosine similarity and L2 distance.
"""

from __future__ import annotations

import argparse
import json
import math
import shlex
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import plotly.graph_objects as go  # noqa: E402
from plotly.subplots import make_subplots  # noqa: E402

from inoc_mech.core import plots  # noqa: E402
from inoc_mech.core.cli import UserError, run_main  # noqa: E402
from inoc_mech.mechanism.context import context_distances  # noqa: E402
from inoc_mech.core.runs import is_complete, read_run, write_json  # noqa: E402
from inoc_mech.core.stats import mean_ci, spearman  # noqa: E402
from inoc_mech.studies.sweep import CORE_CONDITIONS, slug  # noqa: E402

TRAITS = {"language": "Spanish", "case": "CAPS"}
RATE_KEY = {"language": "spanish_rate", "case": "caps_rate"}
PARTS = ("language", "case", "word")
FIGURES = ("step0_surprise", "loss_parts", "grad_norms", "update_heatmap", "outcomes",
           "elicitation_suppression", "context_distance")
TIME_CONDITIONS = ("baseline", "inoculated", "converse")
CORE_BY_PROMPT = {p: n for n, p in CORE_CONDITIONS.items()}


# ---- finding and reading runs ------------------------------------------------------------------
def sweep_command(folder: Path) -> str:
    """The command that (re)makes a sweep folder: from its sweep.json, else the sweep defaults."""
    meta = folder / "sweep.json"
    if meta.exists():
        return json.loads(meta.read_text())["command"]
    return f"python -m inoc_mech.studies.sweep --name {shlex.quote(folder.name)} --runs-dir {shlex.quote(str(folder.parent))}"


def expected_runs(paths: list[Path]) -> tuple[list[Path], dict[Path, str]]:
    """Run folders the paths stand for, and the sweep command of each sweep folder among them."""
    runs, commands = [], {}
    for p in paths:
        if (p / "sweep.json").exists():
            runs += [p / r for r in json.loads((p / "sweep.json").read_text())["runs"]]
            commands[p] = sweep_command(p)
        elif (p / "config.json").exists():
            runs.append(p)
        elif p.is_dir() and any((c / "config.json").exists() for c in p.iterdir()):
            runs += sorted(c for c in p.iterdir() if (c / "config.json").exists())
        else:
            runs.append(p)  # a sweep that was never started
            commands[p] = sweep_command(p)
    return runs, commands


def check_missing(paths: list[Path], train_missing: bool, skip_missing: bool) -> list[Path]:
    """Complete run folders; missing ones are made (--train-missing), skipped, or stop with the command."""
    runs, commands = expected_runs(paths)
    missing = [r for r in runs if r not in commands and not is_complete(r)]
    unmade = [p for p in commands if not (p / "sweep.json").exists()]
    if (missing or unmade) and train_missing:
        for sweep_folder, cmd in commands.items():
            argv = shlex.split(cmd)
            if argv[:3] != ["python", "-m", "inoc_mech.studies.sweep"]:
                raise UserError(f"unexpected command in {sweep_folder}/sweep.json: {cmd}")
            print(f"--train-missing: {cmd}", file=sys.stderr)
            if subprocess.run([sys.executable, *argv[1:]]).returncode != 0:
                raise UserError(f"the sweep command failed: {cmd}")
        loose = [r for r in missing if not any(r.parent == s for s in commands)]
        if loose:
            raise UserError(f"--train-missing can only make runs of a sweep folder; {loose[0]} is incomplete: "
                            "rerun it with python -m inoc_mech.train --overwrite")
        runs, commands = expected_runs(paths)
        missing = [r for r in runs if r not in commands and not is_complete(r)]
        unmade = [p for p in commands if not (p / "sweep.json").exists()]
    if unmade:
        raise UserError(f"no runs at {unmade[0]}: make them with `{commands[unmade[0]]}` "
                        "(or pass --train-missing)")
    if missing and not skip_missing:
        where = {r.parent for r in missing}
        cmd = next((commands[w] for w in where if w in commands), None)
        how = f"make them with `{cmd}`" if cmd else "rerun them with python -m inoc_mech.train --overwrite"
        raise UserError(f"{len(missing)} of {len(runs)} runs are missing or incomplete (e.g. {missing[0]}): "
                        f"{how} (or pass --train-missing, or --skip-missing to analyse the others)")
    if missing:
        print(f"note: skipping {len(missing)} missing or incomplete runs (e.g. {missing[0]})", file=sys.stderr)
    return [r for r in runs if r not in commands and r not in missing]


@dataclass
class Condition:
    """All seeds of one training prompt."""
    name: str  # folder-style name: baseline, inoculated, ..., p-<prompt slug>
    prompt: str | None
    runs: list[dict] = field(default_factory=list)  # read_run() dicts, sorted by seed

    @property
    def seeds(self) -> list[int]:
        return [r["config"]["seed"] for r in self.runs]

    @property
    def label(self) -> str:
        if self.prompt is None:
            return "baseline (no prompt)"
        core = CORE_BY_PROMPT.get(self.prompt)
        return f'{core}: "{self.prompt}"' if core else f'"{self.prompt}"'

    @property
    def short(self) -> str:
        return self.name if self.name in CORE_CONDITIONS else self.prompt


def condition_of(config: dict) -> tuple[str, str | None]:
    prompt = config["prompt"] if config["inoculate"] else None
    return CORE_BY_PROMPT.get(prompt) or slug(prompt), prompt


def load_conditions(folders: list[Path]) -> dict[str, Condition]:
    """Conditions in display order: the core ones, then the prompt set in the order given."""
    conds: dict[str, Condition] = {}
    for f in folders:
        run = read_run(f)
        for key in ("surprise/language", "surprise/case"):
            if key not in run["metrics"][0]:
                raise UserError(f"run {f} has no {key} at step 0 (trained with --no-hooks?): rerun it with hooks")
        name, prompt = condition_of(run["config"])
        conds.setdefault(name, Condition(name, prompt)).runs.append(run)
    if not conds:
        raise UserError("no complete runs to analyse")
    for key in ("organism_folder", "steps", "lr", "batch_size"):
        values = {str(r["config"].get(key)) for c in conds.values() for r in c.runs}
        if len(values) > 1:
            raise UserError(f"the runs differ in {key} ({', '.join(sorted(values))}): analyse them separately")
    for c in conds.values():
        c.runs.sort(key=lambda r: r["config"]["seed"])
        if len(set(c.seeds)) != len(c.seeds):
            raise UserError(f"condition {c.label} has two runs with the same seed: pass each run once")
    core = [conds[n] for n in CORE_CONDITIONS if n in conds]
    return {c.name: c for c in core + [c for n, c in conds.items() if n not in CORE_CONDITIONS]}


# ---- numbers read from the runs ----------------------------------------------------------------
def step0(run: dict) -> dict:
    row = run["metrics"][0]
    if row["step"] != 0:
        raise UserError(f"run {run['folder']} has no step-0 metrics row")
    return row


def outcome(run: dict, key: str) -> float:
    return run["eval"]["contexts"]["none"]["t1"][key]


def final_row(run: dict) -> dict:
    rows = [r for r in run["metrics"] if "update_norm/total" in r]
    if not rows:
        raise UserError(f"run {run['folder']} has no update_norm metrics")
    return rows[-1]


def stat(values: list[float], lo: float = -math.inf, hi: float = math.inf) -> dict:
    """Per-seed values, mean and 95% t-interval, the interval clipped to the possible range [lo, hi]."""
    ci = mean_ci(values)
    bounds = [min(max(b, lo), hi) if math.isfinite(b) else b for b in (ci.lo, ci.hi)]
    return {"values": [float(v) for v in values], "mean": ci.mean, "ci": bounds, "n": ci.n}


def summarise(conds: dict[str, Condition], context: dict[str, dict], n_boot: int, seed: int) -> dict:
    """Every number of the figures and tables, per condition, plus the correlations."""
    base = conds.get("baseline")
    base_step0 = {r["config"]["seed"]: step0(r) for r in base.runs} if base else {}
    base_rate = {t: float(np.mean([outcome(r, RATE_KEY[t]) for r in base.runs])) if base else math.nan
                 for t in TRAITS}
    out = {"conditions": {}, "baseline_rate": base_rate}
    for name, c in conds.items():
        s0 = [step0(r) for r in c.runs]
        row = {"label": c.label, "prompt": c.prompt, "seeds": c.seeds,
               "runs": [str(r["folder"]) for r in c.runs],
               "step0": {f"surprise/{p}": stat([m[f"surprise/{p}"] for m in s0]) for p in PARTS},
               "elicit_gain": stat([m.get("elicit/language/gain", math.nan) for m in s0]),
               "outcome": {k: stat([outcome(r, k) for r in c.runs], 0, 1) for k in ("spanish_rate", "caps_rate", "accuracy")},
               "elicitation": {}, "suppression": {}}
        for t in TRAITS:
            el = [base_step0[m_seed][f"surprise/{t}"] - m[f"surprise/{t}"] if m_seed in base_step0 else math.nan
                  for m, m_seed in zip(s0, c.seeds)]
            row["elicitation"][t] = stat(el)
            row["suppression"][t] = stat([1 - outcome(r, RATE_KEY[t]) / base_rate[t] if base_rate[t] > 0 else math.nan
                                          for r in c.runs], 1 - 1 / base_rate[t] if base_rate[t] > 0 else -math.inf, 1)
        if c.prompt is not None and c.prompt in context:
            row["context"] = context[c.prompt]
        out["conditions"][name] = row
    prompted = [r for r in out["conditions"].values() if r["prompt"] is not None]
    corr = {}
    for t, trait in TRAITS.items():
        x = [r["elicitation"][t]["mean"] for r in prompted]
        y = [r["suppression"][t]["mean"] for r in prompted]
        corr[f"{trait} suppression vs {t} elicitation"] = spearman(x, y, n_boot=n_boot, seed=seed).to_dict()
    corr["Spanish suppression vs elicit/language/gain"] = spearman(
        [r["elicit_gain"]["mean"] for r in prompted], [r["suppression"]["language"]["mean"] for r in prompted],
        n_boot=n_boot, seed=seed).to_dict()
    caps_pts = [r for r in prompted if "context" in r and co_learned(r["prompt"]) == "case"]
    for k in ("cosine", "l2"):
        corr[f"CAPS generalisation vs context {k}"] = spearman(
            [r["context"][k] for r in caps_pts], [1 - r["suppression"]["case"]["mean"] for r in caps_pts],
            n_boot=n_boot, seed=seed).to_dict()
    out["spearman"] = corr
    return out


def co_learned(prompt: str) -> str | None:
    """The trait a prompt leaves to be learned: case unless the prompt sets it; None if it sets both."""
    from inoc_mech.models.world import World

    language, case = World().prompt_controls(prompt)
    if case is None:
        return "case"
    return "language" if language is None else None


# ---- figures -----------------------------------------------------------------------------------
def seeds_text(conds: dict[str, Condition]) -> str:
    seeds = sorted({s for c in conds.values() for s in c.seeds})
    ns = sorted({len(c.runs) for c in conds.values()})
    n = str(ns[0]) if len(ns) == 1 else f"{ns[0]}-{ns[-1]}"
    return f"seeds {', '.join(map(str, seeds))}; n = {n} runs per condition"


def empty(fig: go.Figure, why: str) -> go.Figure:
    fig.add_annotation(text=why, xref="paper", yref="paper", x=0.5, y=0.5, showarrow=False, font=dict(size=14))
    return fig


def fig_step0(conds, summary) -> go.Figure:
    fig = go.Figure()
    rows = [summary["conditions"][n] for n in conds]
    labels = [r["label"] for r in rows]
    for i, p in enumerate(PARTS):
        st = [r["step0"][f"surprise/{p}"] for r in rows]
        fig.add_bar(y=labels, x=[s["mean"] for s in st], orientation="h", name=f"{p} part",
                    marker_color=plots.COLORS[i],
                    error_x=plots.error_array([s["mean"] for s in st], [s["ci"][0] for s in st], [s["ci"][1] for s in st]))
    plots.style(fig, "Step-0 surprise of the training answers, per trait part",
                height=160 + 48 * len(rows), subtitle=f"pretrained organism, before any update; mean and 95% CI over {seeds_text(conds)}")
    fig.update_layout(barmode="group")
    plots.legend_below(fig)
    fig.update_xaxes(title="surprise (nats per answer-variant token)")
    fig.update_yaxes(autorange="reversed")
    plots.caption(fig, "Parts of -log p(answer token): word = -log p(word), language = -log p(Spanish | word), "
                       "case = -log p(UPPER | word).<br>Bars under 0.001 nats are invisible "
                       "(exact values: summary.md).",
                  y=-110 / (48 * len(rows)))
    fig.update_layout(margin=dict(b=fig.layout.margin.b + 30))
    return fig


def _mean_band(fig, xs, runs_vals, name, color, dash="solid", row=None, col=None, legend=True, group=None):
    """Mean over seeds as a line, the range over seeds (min to max) as a band."""
    per_step = [list(v) for v in zip(*runs_vals)]
    m = [float(np.mean(v)) for v in per_step]
    lo, hi = [min(v) for v in per_step], [max(v) for v in per_step]
    kw = dict(row=row, col=col) if row else {}
    fig.add_trace(go.Scatter(x=xs + xs[::-1], y=hi + lo[::-1], fill="toself", mode="lines", line=dict(width=0),
                             fillcolor=color, opacity=0.15, hoverinfo="skip", showlegend=False,
                             legendgroup=group or name), **kw)
    fig.add_trace(go.Scatter(x=xs, y=m, name=name, mode="lines+markers", marker=dict(size=4),
                             line=dict(color=color, dash=dash), showlegend=legend, legendgroup=group or name), **kw)


def series(run: dict, key: str) -> tuple[list[int], list[float]]:
    rows = [r for r in run["metrics"] if key in r]
    return [r["step"] for r in rows], [r[key] for r in rows]


def common_series(c: Condition, key: str) -> tuple[list[int], list[list[float]]]:
    """Steps shared by all seeds and each seed's values there."""
    per = [dict(zip(*series(r, key))) for r in c.runs]
    steps = sorted(set.intersection(*(set(p) for p in per))) if per else []
    return steps, [[p[s] for s in steps] for p in per]


def fig_loss_parts(conds) -> go.Figure:
    shown = [conds[n] for n in TIME_CONDITIONS if n in conds]
    fig = make_subplots(rows=1, cols=2, subplot_titles=["language part: -log p(Spanish | word)",
                                                        "case part: -log p(UPPER | word)"], horizontal_spacing=0.1)
    for i, c in enumerate(shown):
        for j, part in enumerate(("language", "case")):
            steps, vals = common_series(c, f"surprise/{part}")
            vals = [[max(v, 1e-7) for v in vs] for vs in vals]
            _mean_band(fig, steps, vals, c.label, plots.COLORS[i], row=1, col=j + 1, legend=j == 0)
    plots.style(fig, "Trait-token loss parts during training", height=480,
                subtitle=f"line: mean, band: range over {seeds_text({c.name: c for c in shown})}; log scale")
    fig.update_yaxes(type="log", title_text="loss part (nats per answer-variant token)", row=1, col=1)
    fig.update_yaxes(type="log", row=1, col=2)
    fig.update_xaxes(title_text="training step")
    plots.legend_below(fig)
    if not shown:
        empty(fig, "needs baseline, inoculated or converse runs")
    return fig


def fig_grad_norms(conds) -> go.Figure:
    shown = [conds[n] for n in TIME_CONDITIONS if n in conds]
    fig = make_subplots(rows=2, cols=2, shared_xaxes=True, vertical_spacing=0.1, horizontal_spacing=0.1,
                        subplot_titles=["Spanish (language part)", "CAPS (case part)", "", ""])
    has = False
    for i, c in enumerate(shown):
        for j, t in enumerate(TRAITS):
            steps, vals = common_series(c, f"grad_norm/trait/{t}")
            if not steps:
                continue
            has = True
            _mean_band(fig, steps, vals, c.label, plots.COLORS[i], row=1, col=j + 1, legend=j == 0, group=c.name)
            steps, vals = common_series(c, f"grad_norm/rest/{t}")
            _mean_band(fig, steps, vals, f"{c.label}: rest", plots.COLORS[i], dash="dot", row=1, col=j + 1,
                       legend=False, group=c.name)
            steps, vals = common_series(c, f"grad_share/trait/{t}")
            _mean_band(fig, steps, vals, c.label, plots.COLORS[i], row=2, col=j + 1, legend=False, group=c.name)
    plots.style(fig, "Gradient of the trait loss part vs the rest of the loss", height=640,
                subtitle=f"solid: trait part, dotted: rest = total - trait; line: mean, band: range over {seeds_text({c.name: c for c in shown})}")
    fig.update_yaxes(type="log", title_text="gradient L2 norm", row=1, col=1)
    fig.update_yaxes(type="log", row=1, col=2)
    fig.update_yaxes(title_text="share ‖g_trait‖² / ‖g_total‖²", row=2, col=1)
    fig.update_xaxes(title_text="training step", row=2)
    plots.legend_below(fig)
    if not has:
        empty(fig, "no gradient-split steps in these runs (--grad-split-every 0?)")
    return fig


def fig_update_heatmap(conds, summary) -> go.Figure:
    finals = {n: [final_row(r) for r in c.runs] for n, c in conds.items()}
    any_row = next(iter(finals.values()))[0]
    modules = [k.split("/", 1)[1] for k in any_row if k.startswith("update_norm/") and k != "update_norm/total"]
    absval = {n: [float(np.mean([r[f"update_norm/{m}"] for r in rows])) for m in modules] for n, rows in finals.items()}
    cols = [n for n in conds if n != "baseline"]
    if "baseline" in conds and cols:
        z = [[math.log2(absval[n][i] / absval["baseline"][i]) if absval["baseline"][i] > 0 else math.nan
              for n in cols] for i in range(len(modules))]
        ctitle, zmid = "log2(‖Δθ‖ / baseline's)", 0
    else:
        cols = list(conds)
        z = [[math.log10(max(absval[n][i], 1e-12)) for n in cols] for i in range(len(modules))]
        ctitle, zmid = "log10 ‖Δθ‖", None
    text = [[f"{absval[n][i]:.3g}" for n in cols] for i in range(len(modules))]
    fig = go.Figure(go.Heatmap(z=z, x=[conds[n].short for n in cols], y=modules, zmid=zmid,
                               colorscale="RdBu_r" if zmid == 0 else "Viridis", customdata=text,
                               hovertemplate="%{y}<br>%{x}<br>‖Δθ‖ = %{customdata}<br>z = %{z:.2f}<extra></extra>",
                               colorbar=dict(title=dict(text=ctitle, side="right"))))
    steps = sorted({r["step"] for rows in finals.values() for r in rows})
    plots.style(fig, "Weight change per module after training, relative to baseline",
                height=330 + 17 * len(modules),
                subtitle=f"Frobenius norm of θ(step {steps[-1]}) - θ_0, mean over {seeds_text(conds)}. "
                         + ("Blue: moved less than under baseline.<br>" if zmid == 0 else "<br>") +
                         "Adam caveat: each step is divided by √v (a running RMS of the gradient), so ‖Δθ‖ tracks how<br>"
                         "consistent a module's gradient sign is, not how large its gradient is (see figure 3's gradient norms).")
    fig.update_xaxes(title_text="training prompt (condition)", tickangle=-40)
    fig.update_yaxes(title_text="module", autorange="reversed", tickfont=dict(size=10))
    return fig


def fig_outcomes(conds, summary) -> go.Figure:
    rows = [summary["conditions"][n] for n in conds]
    fig = go.Figure()
    for i, (t, trait) in enumerate(TRAITS.items()):
        st = [r["outcome"][RATE_KEY[t]] for r in rows]
        fig.add_bar(y=[r["label"] for r in rows], x=[100 * s["mean"] for s in st], orientation="h",
                    name=f"{trait} rate", marker_color=plots.COLORS[i],
                    error_x=plots.error_array([100 * s["mean"] for s in st], [100 * s["ci"][0] for s in st],
                                              [100 * s["ci"][1] for s in st]))
    n_ans = conds[next(iter(conds))].runs[0]["eval"]["contexts"]["none"]["t1"]["n_answers"]
    plots.style(fig, "After training: Spanish and CAPS without any prompt", height=160 + 48 * len(rows),
                subtitle=f"held-out questions, temperature 1, {n_ans} answers per run; mean and 95% CI over {seeds_text(conds)}")
    fig.update_layout(barmode="group")
    plots.legend_below(fig)
    fig.update_xaxes(title="rate at no prompt (% of answer-variant tokens)", range=[0, 105])
    fig.update_yaxes(autorange="reversed")
    return fig


def cluster_labels(xs: list[float], ys: list[float], names: list[str], tol: float = 0.04) -> list[str]:
    """One label per group of points closer than `tol` (as a share of each axis range): the names of
    the whole group, comma-joined, on its first point; empty on the others."""
    def scale(v):
        finite = [a for a in v if math.isfinite(a)]
        return (max(finite) - min(finite)) or 1.0 if finite else 1.0
    sx, sy = scale(xs), scale(ys)
    groups: list[list[int]] = []
    for i in range(len(xs)):
        for g in groups:
            j = g[0]
            if abs(xs[i] - xs[j]) <= tol * sx and abs(ys[i] - ys[j]) <= tol * sy:
                g.append(i)
                break
        else:
            groups.append([i])
    labels = [""] * len(xs)
    for g in groups:
        labels[g[0]] = ",".join(names[i] for i in g)
    return labels


def label_positions(xs: list[float], ys: list[float], labels: list[str]) -> list[str]:
    """Right of each point; a label near an earlier one moves above or below it."""
    def scale(v):
        finite = [a for a in v if math.isfinite(a)]
        return (max(finite) - min(finite)) or 1.0 if finite else 1.0
    sx, sy = scale(xs), scale(ys)
    pos, placed = [], []
    for i, lab in enumerate(labels):
        near = sum(1 for j in placed if abs(xs[i] - xs[j]) < 0.25 * sx and abs(ys[i] - ys[j]) < 0.06 * sy)
        pos.append(("middle right", "bottom right", "top right")[near % 3])
        if lab:
            placed.append(i)
    return pos


def numbered(conds: dict[str, Condition]) -> dict[str, str]:
    """Condition name -> its number in the figures' keys (prompted conditions, display order)."""
    return {n: str(i) for i, n in enumerate((n for n, c in conds.items() if c.prompt is not None), 1)}


def key_caption(conds: dict[str, Condition], numbers: dict[str, str], width: int = 110) -> str:
    items = [f"{numbers[n]} {conds[n].short}" for n in numbers]
    lines, line = [], ""
    for it in items:
        if line and len(line) + len(it) + 3 > width:
            lines.append(line)
            line = ""
        line = f"{line} · {it}" if line else it
    return "<br>".join(lines + [line])


def _scatter(fig, rows, xs, ys, row, col, color, symbol="circle", name=None, legend=False):
    mx, my = [x["mean"] for x in xs], [y["mean"] for y in ys]
    labels = cluster_labels(mx, my, [r["number"] for r in rows])
    fig.add_trace(go.Scatter(
        x=mx, y=my, mode="markers+text", text=labels, textposition=label_positions(mx, my, labels),
        textfont=dict(size=11, color="#222"), cliponaxis=False,
        marker=dict(size=9, color=color, symbol=symbol, line=dict(width=0.5, color="white")),
        error_x=plots.error_array(mx, [x["ci"][0] for x in xs], [x["ci"][1] for x in xs]),
        error_y=plots.error_array(my, [y["ci"][0] for y in ys], [y["ci"][1] for y in ys]),
        hovertext=[r["label"] for r in rows], name=name, showlegend=legend), row=row, col=col)


def _rho_title(name: str, r: dict, unit: str = "prompts") -> str:
    if not math.isfinite(r["rho"]):
        return f"{name}: ρ undefined (n = {r['n']} {unit})"
    return f"{name}: ρ = {r['rho']:.2f} [{r['lo']:.2f}, {r['hi']:.2f}], p = {r['p']:.2g}, n = {r['n']}"


def _pct(st: dict, flip: bool = False) -> dict:
    """A stat in percent; `flip` turns suppression into generalisation (1 - s)."""
    if flip:
        return {"mean": 100 * (1 - st["mean"]), "ci": [100 * (1 - v) for v in st["ci"][::-1]]}
    return {"mean": 100 * st["mean"], "ci": [100 * v for v in st["ci"]]}


def fig_elicitation(conds, summary) -> go.Figure:
    numbers = numbered(conds)
    rows = [dict(summary["conditions"][n], number=numbers[n]) for n in numbers]
    corr = summary["spearman"]
    fig = make_subplots(rows=1, cols=2, horizontal_spacing=0.1, subplot_titles=[
        _rho_title(trait, corr[f"{trait} suppression vs {t} elicitation"]) for t, trait in TRAITS.items()])
    for j, (t, trait) in enumerate(TRAITS.items()):
        _scatter(fig, rows, [r["elicitation"][t] for r in rows], [_pct(r["suppression"][t]) for r in rows],
                 1, j + 1, plots.COLORS[j])
        fig.update_xaxes(title_text=f"step-0 {t} elicitation (nats)", row=1, col=j + 1)
    fig.update_yaxes(title_text="suppression at no prompt (%)", row=1, col=1)
    fig.add_hline(y=0, line=dict(color="#999", width=1))
    fig.add_vline(x=0, line=dict(color="#999", width=1))
    plots.style(fig, "Elicitation before training vs suppression after it", height=640,
                subtitle=f"one point per training prompt (numbers: key below); mean and 95% CI over {seeds_text(conds)}")
    fig.update_annotations(font_size=12)
    plots.caption(fig, "x: baseline's step-0 surprise of the trait part - the prompt's (same seed, same answers). "
                       "y: 1 - no-prompt trait rate after training / baseline's.<br>"
                       "Spearman ρ over prompts, bootstrap 95% CI. The account predicts a rising relation in each panel.<br>"
                       + key_caption(conds, numbers), y=-0.14)
    if not rows:
        empty(fig, "needs runs trained with a prompt")
    return fig


def fig_context(conds, summary) -> go.Figure:
    numbers = numbered(conds)
    rows = [dict(summary["conditions"][n], number=numbers[n]) for n in numbers if "context" in summary["conditions"][n]]
    corr = summary["spearman"]
    fig = make_subplots(rows=1, cols=2, horizontal_spacing=0.15, subplot_titles=[
        _rho_title("CAPS vs cosine", corr["CAPS generalisation vs context cosine"]),
        _rho_title("CAPS vs L2", corr["CAPS generalisation vs context l2"])])
    for t, trait, symbol, color in (("case", "CAPS", "circle", plots.COLORS[1]),
                                    ("language", "Spanish", "diamond", plots.COLORS[0])):
        pts = [r for r in rows if co_learned(r["prompt"]) == t]
        if not pts:
            continue
        ys = [_pct(r["suppression"][t], flip=True) for r in pts]
        for j, k in enumerate(("cosine", "l2")):
            xs = [{"mean": r["context"][k], "ci": [math.nan, math.nan]} for r in pts]
            _scatter(fig, pts, xs, ys, 1, j + 1, color, symbol, name=f"co-learned trait: {trait}", legend=j == 0)
    fig.update_xaxes(title_text="cosine similarity, with vs without prompt", row=1, col=1)
    fig.update_xaxes(title_text="L2 distance (hidden-state units)", row=1, col=2)
    fig.update_yaxes(title_text="co-learned trait at no prompt (% of baseline)", row=1, col=1)
    n_q = next((r["context"]["n_questions"] for r in rows), 0)
    plots.style(fig, "How far a prompt moves the answer-start state vs how much of the co-learned trait leaks",
                height=660, subtitle=f"x: final hidden state at the answer start, pretrained organism, {n_q} held-out questions<br>"
                                     f"y: no-prompt rate after training / baseline's, mean and 95% CI over {seeds_text(conds)}")
    fig.update_layout(title_font_size=15, legend=dict(x=0.56, xanchor="left", y=0.02, yanchor="bottom",
                                                      bgcolor="rgba(255,255,255,0.85)"))
    fig.update_annotations(font_size=12)
    plots.caption(fig, "Co-learned trait: CAPS, or Spanish for a prompt that sets the case; prompts that set both are left out. "
                       "ρ over the CAPS points.<br>" + key_caption(conds, numbers), y=-0.14)
    if not rows:
        empty(fig, "needs runs trained with a prompt")
    return fig


# ---- tables ------------------------------------------------------------------------------------
def fmt(s: dict, pct: bool = False, digits: int = 3) -> str:
    k = 100 if pct else 1
    m, (lo, hi) = s["mean"], s["ci"]
    if not math.isfinite(m):
        return "-"
    f = (lambda v: f"{k * v:.1f}") if pct else (lambda v: f"{v:.{digits}g}")
    return f"{f(m)} [{f(lo)}, {f(hi)}]" if math.isfinite(lo) else f(m)


def markdown(summary: dict, seeds: str) -> str:
    cs = summary["conditions"]
    out = [f"# Gradient pressure: summary\n\nMean [95% CI] over {seeds}.\n",
           "## Step-0 surprise (nats per answer-variant token, pretrained organism, step-0 batch)\n",
           "| condition | n | language | case | word | elicit/language/gain |", "|---|---|---|---|---|---|"]
    for r in cs.values():
        s = r["step0"]
        out.append(f"| {r['label']} | {len(r['seeds'])} | {fmt(s['surprise/language'])} | {fmt(s['surprise/case'])} | "
                   f"{fmt(s['surprise/word'])} | {fmt(r['elicit_gain'])} |")
    out += ["\n## Outcomes at no prompt after training (temperature 1, held-out questions, %)\n",
            "| condition | Spanish | CAPS | accuracy |", "|---|---|---|---|"]
    for r in cs.values():
        o = r["outcome"]
        out.append(f"| {r['label']} | {fmt(o['spanish_rate'], True)} | {fmt(o['caps_rate'], True)} | "
                   f"{fmt(o['accuracy'], True)} |")
    out += ["\n## Elicitation, suppression and context distance per prompt\n",
            "| prompt | language elicitation (nats) | case elicitation (nats) | Spanish suppression % | "
            "CAPS suppression % | cosine | L2 |", "|---|---|---|---|---|---|---|"]
    for r in cs.values():
        if r["prompt"] is None:
            continue
        ctx = r.get("context", {})
        out.append(f"| {r['label']} | {fmt(r['elicitation']['language'])} | {fmt(r['elicitation']['case'])} | "
                   f"{fmt(r['suppression']['language'], True)} | {fmt(r['suppression']['case'], True)} | "
                   f"{ctx.get('cosine', math.nan):.3f} | {ctx.get('l2', math.nan):.2f} |")
    out += ["\n## Spearman correlations across prompts (bootstrap 95% CI over prompts)\n",
            "| relation | rho | 95% CI | p | n |", "|---|---|---|---|---|"]
    for name, c in summary["spearman"].items():
        out.append(f"| {name} | {c['rho']:.3f} | [{c['lo']:.3f}, {c['hi']:.3f}] | {c['p']:.2g} | {c['n']} |")
    out.append("\nFigures: " + ", ".join(f"[{f}]({f}.png)" for f in FIGURES))
    return "\n".join(out) + "\n"


# ---- main --------------------------------------------------------------------------------------
def finite_or_none(obj):
    """The same structure with NaN and infinities as None, so summary.json is strict JSON."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: finite_or_none(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [finite_or_none(v) for v in obj]
    return obj


def analyse(paths: list[Path], out: Path, png: bool = True, train_missing: bool = False,
            skip_missing: bool = False, n_boot: int = 2000, seed: int = 0, threads: int = 1) -> dict:
    """Read the runs, write figures and summaries into `out`; returns the summary."""
    torch.set_num_threads(threads)
    folders = check_missing(paths, train_missing, skip_missing)
    conds = load_conditions(folders)
    org = next(iter(conds.values())).runs[0]["config"]["organism_folder"]
    context = context_distances(org, [c.prompt for c in conds.values() if c.prompt is not None])
    summary = summarise(conds, context, n_boot, seed)
    summary["organism_folder"] = org
    summary["seeds"] = seeds_text(conds)
    figs = {"step0_surprise": fig_step0(conds, summary), "loss_parts": fig_loss_parts(conds),
            "grad_norms": fig_grad_norms(conds), "update_heatmap": fig_update_heatmap(conds, summary),
            "outcomes": fig_outcomes(conds, summary), "elicitation_suppression": fig_elicitation(conds, summary),
            "context_distance": fig_context(conds, summary)}
    written = plots.save_all(figs, out, png=png)
    summary["files"] = [p.name for p in written]
    write_json(out / "summary.json", finite_or_none(summary))
    (out / "summary.md").write_text(markdown(summary, summary["seeds"]))
    return summary


def main(argv=None):
    p = argparse.ArgumentParser(prog="python analyses/gradient_pressure.py", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("paths", nargs="*", default=["runs/sweep"], help="sweep folders or run folders")
    p.add_argument("--out", default="figures/gradient_pressure", help="output folder for figures and summaries")
    p.add_argument("--train-missing", action="store_true", help="run the sweep command for missing runs first")
    p.add_argument("--skip-missing", action="store_true", help="analyse the complete runs, skipping missing ones")
    p.add_argument("--png", action=argparse.BooleanOptionalAction, default=True, help="also write PNGs (needs Chromium)")
    p.add_argument("--n-boot", type=int, default=2000, help="bootstrap resamples for the Spearman CI")
    p.add_argument("--seed", type=int, default=0, help="bootstrap seed")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    p.add_argument("--debug", action="store_true", help="show tracebacks")
    a = p.parse_args(argv)
    if a.n_boot < 1:
        raise UserError("--n-boot must be >= 1")
    out = Path(a.out)
    s = analyse([Path(x) for x in a.paths], out, a.png, a.train_missing, a.skip_missing, a.n_boot, a.seed, a.threads)
    print((out / "summary.md").read_text())
    print(f"wrote {len(s['files'])} figure files, summary.json and summary.md to {out}")


if __name__ == "__main__":
    sys.exit(run_main(main))
