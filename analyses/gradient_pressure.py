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
  questions; only the system prompt differs): the log-prob gain of that trait under the prompt (a
  setting without an exact split: the mean loss of the trait's tokens, `loss/trait/<trait>`, instead).
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

import math
import sys
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import plotly.graph_objects as go
import torch
from plotly.subplots import make_subplots

from inoc_mech.core import plots
from inoc_mech.core.cli import UserError, parse_config, run_main
from inoc_mech.core.runs import write_json
from inoc_mech.core.stats import ci_stat as stat, fmt_ci as fmt, json_ready, spearman
from inoc_mech.mechanism.context import context_distances
from inoc_mech.studies.collect import (acquired, condition, figures_folder, find_runs, one_setting, pretrained_eval, pretrained_of, read_runs,
                                      setting_of, train_prompt)

FIGURES = ("step0_surprise", "loss_parts", "grad_norms", "update_heatmap", "outcomes",
           "elicitation_suppression", "context_distance")
TIME_CONDITIONS = ("baseline", "inoculated", "converse")


@dataclass(frozen=True)
class Spec:
    """What the runs' setting says about its traits: names, scorers, loss parts and named conditions."""
    labels: dict  # trait -> label ("language" -> "Spanish")
    rate: dict  # trait -> eval.json rate metric
    parts: tuple  # surprise parts shown (the traits' parts first)
    conditions: dict  # named condition -> prompt
    setting: type  # the setting class

    def co_learned(self, prompt: str) -> str | None:
        """The trait a prompt leaves to be learned: the last trait the prompt does not set (case unless
        the prompt sets it, then language); None if it sets all, or if the setting cannot tell."""
        sets = self.setting.prompt_sets(prompt)
        if sets is None:
            return None
        return next((t for t in reversed(list(self.labels)) if t not in sets), None)


    @classmethod
    def of(cls, s) -> "Spec":
        """The spec of a setting class."""
        return cls({t: s.trait_labels[t] for t in s.traits}, dict(s.rate_keys), tuple(s.surprise_parts),
                   dict(s.conditions), s)


def spec_of(conds: dict) -> Spec:
    """The spec of the setting all runs of the conditions share."""
    return Spec.of(one_setting([r for c in conds.values() for r in c.runs]))


# ---- finding and reading runs ------------------------------------------------------------------
@dataclass
class Condition:
    """All seeds of one training prompt."""
    name: str  # folder-style name: baseline, inoculated, ..., p-<prompt slug>
    prompt: str | None
    runs: list[dict] = field(default_factory=list)  # read_run() dicts, sorted by seed
    core: dict = field(default_factory=dict)  # the setting's named conditions -> prompt

    @property
    def seeds(self) -> list[int]:
        return [r["config"]["seed"] for r in self.runs]

    @property
    def label(self) -> str:
        if self.prompt is None:
            return "baseline (no prompt)"
        core = next((n for n, p in self.core.items() if p == self.prompt), None)
        return f'{core}: "{self.prompt}"' if core else f'"{self.prompt}"'

    @property
    def short(self) -> str:
        return self.name if self.name in self.core else self.prompt


def load_conditions(folders: list[Path]) -> dict[str, Condition]:
    """Conditions in display order: the setting's named ones, then the other prompts in the order given."""
    runs = read_runs(folders)
    setting = one_setting(runs)
    for run in runs:
        row = run["metrics"][0]
        if not run["config"].get("hooks", True):
            raise UserError(f"run {run['folder']} was trained with --no-hooks: rerun it with hooks")
        # a setting with an exact split must have logged it (without it, traits whose token masks coincide, as
        # language and case on Spanish+CAPS replies, would get the same surprise); one without uses token losses
        need = [f"surprise/{p}" for p in setting.surprise_parts] or [f"loss/trait/{t}" for t in setting.traits]
        if not all(k in row for k in need):
            raise UserError(f"run {run['folder']} has no {', '.join(k for k in need if k not in row)} at step 0: its "
                            f"setting ({setting.name} on {setting.substrate}) had no exact loss decomposition for these "
                            "data (real text: built-in data, or JSONL with the 'variants' field), which the "
                            "gradient-pressure analysis needs")
    conds: dict[str, Condition] = {}
    for run in runs:
        name = condition(run)
        conds.setdefault(name, Condition(name, train_prompt(run), core=dict(setting.conditions))).runs.append(run)
    for key in ("organism_folder", "model", "steps", "lr", "batch_size"):
        values = {str(r["config"].get(key)) for c in conds.values() for r in c.runs}
        if len(values) > 1:
            raise UserError(f"the runs differ in {key} ({', '.join(sorted(values))}): analyse them separately")
    for c in conds.values():
        c.runs.sort(key=lambda r: r["config"]["seed"])
        if len(set(c.seeds)) != len(c.seeds):
            raise UserError(f"condition {c.label} has two runs with the same seed: pass each run once")
    core = [conds[n] for n in setting.conditions if n in conds]
    return {c.name: c for c in core + [c for n, c in conds.items() if n not in setting.conditions]}


# ---- numbers read from the runs ----------------------------------------------------------------
def step0(run: dict) -> dict:
    row = run["metrics"][0]
    if row["step"] != 0:
        raise UserError(f"run {run['folder']} has no step-0 metrics row")
    return row


def step0_keys(spec: Spec) -> list[str]:
    """The step-0 surprise metrics shown: the setting's exact parts, or (no split) its traits' token losses."""
    return [f"surprise/{p}" for p in spec.parts] or [f"loss/trait/{t}" for t in spec.labels]


def trait_key(row: dict, trait: str, parts: dict | None = None) -> str:
    """The metric of a metrics row that is a trait's surprise: its part of the loss where the setting splits
    it exactly (`surprise/<part>`, the part named like the trait unless `parts` (`Setting.trait_parts`) says
    otherwise), else the mean loss of its tokens (`loss/trait/<trait>`, e.g. the subliminal setting's
    teacher numbers)."""
    part = (parts or {}).get(trait, trait)
    return f"surprise/{part}" if f"surprise/{part}" in row else f"loss/trait/{trait}"


def trait_surprise(row: dict, trait: str, parts: dict | None = None) -> float:
    return row[trait_key(row, trait, parts)]


def outcome(run: dict, key: str) -> float:
    """A temperature-1 rate at the run's setting's no-prompt context."""
    return run["eval"]["contexts"][setting_of(run).none_context]["t1"][key]


def final_row(run: dict) -> dict:
    rows = [r for r in run["metrics"] if "update_norm/total" in r]
    if not rows:
        raise UserError(f"run {run['folder']} has no update_norm metrics")
    return rows[-1]


def summarise(conds: dict[str, Condition], context: dict[str, dict], n_boot: int, seed: int) -> dict:
    """Every number of the figures and tables, per condition, plus the correlations."""
    spec = spec_of(conds)
    TRAITS, RATE_KEY, PARTS = spec.labels, spec.rate, spec.parts
    base = conds.get("baseline")
    base_step0 = {r["config"]["seed"]: step0(r) for r in base.runs} if base else {}
    base_rate = {t: float(np.mean([outcome(r, RATE_KEY[t]) for r in base.runs])) if base else math.nan
                 for t in TRAITS}
    pre = pretrained_eval([r for c in conds.values() for r in c.runs])
    pre_rate = {t: pre["contexts"][spec.setting.none_context]["t1"][RATE_KEY[t]] if pre else None for t in TRAITS}
    got = {t: acquired(base_rate[t], pre_rate[t]) for t in TRAITS}  # False: nothing to suppress, not computed
    out = {"conditions": {}, "baseline_rate": base_rate, "pretrained_rate": pre_rate, "baseline_acquired": got}
    for name, c in conds.items():
        s0 = [step0(r) for r in c.runs]
        row = {"label": c.label, "prompt": c.prompt, "seeds": c.seeds,
               "runs": [str(r["folder"]) for r in c.runs],
               "step0": {k: stat([m[k] for m in s0]) for k in step0_keys(spec)},
               "elicit_gain": stat([m.get(f"elicit/{list(TRAITS)[0]}/gain", math.nan) for m in s0]),
               "outcome": {k: stat([outcome(r, k) for r in c.runs], 0, 1) for k in (*RATE_KEY.values(), "accuracy")},
               "elicitation": {}, "suppression": {}}
        for t in TRAITS:
            tp = spec.setting.trait_parts
            el = [trait_surprise(base_step0[m_seed], t, tp) - trait_surprise(m, t, tp) if m_seed in base_step0 else math.nan
                  for m, m_seed in zip(s0, c.seeds)]
            row["elicitation"][t] = stat(el)
            row["suppression"][t] = stat([1 - outcome(r, RATE_KEY[t]) / base_rate[t]
                                          if base_rate[t] > 0 and got[t] is not False else math.nan
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
    first, last = list(TRAITS)[0], list(TRAITS)[-1]
    corr[f"{TRAITS[first]} suppression vs elicit/{first}/gain"] = spearman(
        [r["elicit_gain"]["mean"] for r in prompted], [r["suppression"][first]["mean"] for r in prompted],
        n_boot=n_boot, seed=seed).to_dict()
    caps_pts = [r for r in prompted if "context" in r and spec.co_learned(r["prompt"]) == last]
    for k in ("cosine", "l2"):
        corr[f"{TRAITS[last]} generalisation vs context {k}"] = spearman(
            [r["context"][k] for r in caps_pts], [1 - r["suppression"][last]["mean"] for r in caps_pts],
            n_boot=n_boot, seed=seed).to_dict()
    out["spearman"] = corr
    return out


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
    spec = spec_of(conds)
    TRAITS, RATE_KEY, PARTS = spec.labels, spec.rate, spec.parts
    fig = go.Figure()
    rows = [summary["conditions"][n] for n in conds]
    labels = [r["label"] for r in rows]
    for i, key in enumerate(step0_keys(spec)):
        st = [r["step0"][key] for r in rows]
        fig.add_bar(y=labels, x=[s["mean"] for s in st], orientation="h",
                    name=f"{key.split('/')[-1]} " + ("part" if key.startswith("surprise/") else "tokens' loss"),
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
    spec = spec_of(conds)
    shown = [conds[n] for n in TIME_CONDITIONS if n in conds]
    marked = {"language": "Spanish", "case": "UPPER"}
    fig = make_subplots(rows=1, cols=len(spec.labels), horizontal_spacing=0.1, subplot_titles=[
        f"{t} part: -log p({marked.get(t, spec.labels[t])} | word)" for t in spec.labels])
    for i, c in enumerate(shown):
        for j, part in enumerate(spec.labels):
            steps, vals = common_series(c, trait_key(c.runs[0]["metrics"][0], part, spec.setting.trait_parts))
            vals = [[max(v, 1e-7) for v in vs] for vs in vals]
            _mean_band(fig, steps, vals, c.label, plots.COLORS[i], row=1, col=j + 1, legend=j == 0)
    plots.style(fig, "Trait-token loss parts during training", height=480,
                subtitle=f"line: mean, band: range over {seeds_text({c.name: c for c in shown})}; log scale")
    fig.update_yaxes(type="log", title_text="loss part (nats per answer-variant token)", row=1, col=1)
    for j in range(2, len(spec.labels) + 1):
        fig.update_yaxes(type="log", row=1, col=j)
    fig.update_xaxes(title_text="training step")
    plots.legend_below(fig)
    if not shown:
        empty(fig, "needs baseline, inoculated or converse runs")
    return fig


def fig_grad_norms(conds) -> go.Figure:
    spec = spec_of(conds)
    TRAITS, RATE_KEY, PARTS = spec.labels, spec.rate, spec.parts
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
    spec = spec_of(conds)
    TRAITS, RATE_KEY, PARTS = spec.labels, spec.rate, spec.parts
    rows = [summary["conditions"][n] for n in conds]
    fig = go.Figure()
    for i, (t, trait) in enumerate(TRAITS.items()):
        st = [r["outcome"][RATE_KEY[t]] for r in rows]
        fig.add_bar(y=[r["label"] for r in rows], x=[100 * s["mean"] for s in st], orientation="h",
                    name=f"{trait} rate", marker_color=plots.COLORS[i],
                    error_x=plots.error_array([100 * s["mean"] for s in st], [100 * s["ci"][0] for s in st],
                                              [100 * s["ci"][1] for s in st]))
    first = conds[next(iter(conds))].runs[0]
    n_ans = first["eval"]["contexts"][setting_of(first).none_context]["t1"]["n_answers"]
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
    spec = spec_of(conds)
    TRAITS, RATE_KEY, PARTS = spec.labels, spec.rate, spec.parts
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
    spec = spec_of(conds)
    numbers = numbered(conds)
    rows = [dict(summary["conditions"][n], number=numbers[n]) for n in numbers if "context" in summary["conditions"][n]]
    corr = summary["spearman"]
    last = spec.labels[list(spec.labels)[-1]]
    fig = make_subplots(rows=1, cols=2, horizontal_spacing=0.15, subplot_titles=[
        _rho_title(f"{last} vs cosine", corr[f"{last} generalisation vs context cosine"]),
        _rho_title(f"{last} vs L2", corr[f"{last} generalisation vs context l2"])])
    styles = (("circle", plots.COLORS[1]), ("diamond", plots.COLORS[0]))
    for (t, trait), (symbol, color) in zip(reversed(list(spec.labels.items())), styles):
        pts = [r for r in rows if spec.co_learned(r["prompt"]) == t]
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
def markdown(summary: dict, seeds: str, spec: Spec) -> str:
    cs = summary["conditions"]
    traits, first = list(spec.labels), list(spec.labels)[0]
    flags = [f"**The baseline did not acquire {spec.labels[t]}** (no-prompt rate {summary['baseline_rate'][t]:.1%}, "
             f"pretrained {summary['pretrained_rate'][t]:.1%}): there is nothing to suppress, so its suppression is "
             "not computed.\n" for t in traits if summary.get("baseline_acquired", {}).get(t) is False]
    out = [f"# Gradient pressure: summary\n\nMean [95% CI] over {seeds}.\n", *flags,
           "## Step-0 surprise (nats per decomposed token or reply, pretrained model, step-0 batch)\n",
           "| condition | n | " + " | ".join(k.split("/", 1)[1] for k in step0_keys(spec)) + f" | elicit/{first}/gain |",
           "|---" * (len(step0_keys(spec)) + 3) + "|"]
    for r in cs.values():
        s = r["step0"]
        out.append(f"| {r['label']} | {len(r['seeds'])} | " + " | ".join(fmt(s[k]) for k in step0_keys(spec))
                   + f" | {fmt(r['elicit_gain'])} |")
    out += ["\n## Outcomes at no prompt after training (temperature 1, held-out questions, %)\n",
            "| condition | " + " | ".join(spec.labels.values()) + " | accuracy |", "|---" * (len(traits) + 2) + "|"]
    for r in cs.values():
        o = r["outcome"]
        out.append(f"| {r['label']} | " + " | ".join(fmt(o[spec.rate[t]], True) for t in traits)
                   + f" | {fmt(o['accuracy'], True)} |")
    out += ["\n## Elicitation, suppression and context distance per prompt\n",
            "| prompt | " + " | ".join(f"{t} elicitation (nats)" for t in traits) + " | "
            + " | ".join(f"{spec.labels[t]} suppression %" for t in traits) + " | cosine | L2 |",
            "|---" * (2 * len(traits) + 3) + "|"]
    for r in cs.values():
        if r["prompt"] is None:
            continue
        ctx = r.get("context", {})
        out.append(f"| {r['label']} | " + " | ".join(fmt(r["elicitation"][t]) for t in traits) + " | "
                   + " | ".join(fmt(r["suppression"][t], True) for t in traits)
                   + f" | {ctx.get('cosine', math.nan):.3f} | {ctx.get('l2', math.nan):.2f} |")
    out += ["\n## Spearman correlations across prompts (bootstrap 95% CI over prompts)\n",
            "| relation | rho | 95% CI | p | n |", "|---|---|---|---|---|"]
    for name, c in summary["spearman"].items():
        out.append(f"| {name} | {c['rho']:.3f} | [{c['lo']:.3f}, {c['hi']:.3f}] | {c['p']:.2g} | {c['n']} |")
    out.append("\nFigures: " + ", ".join(f"[{f}]({f}.png)" for f in FIGURES))
    return "\n".join(out) + "\n"


# ---- main --------------------------------------------------------------------------------------
def analyse(paths: list[Path], out: Path, png: bool = True, train_missing: bool = False,
            skip_missing: bool = False, n_boot: int = 2000, seed: int = 0, threads: int = 1) -> dict:
    """Read the runs, write figures and summaries into `out`; returns the summary."""
    torch.set_num_threads(threads)
    folders = find_runs(paths, skip_missing, train_missing)
    conds = load_conditions(folders)
    org = pretrained_of(next(iter(conds.values())).runs[0])
    context = context_distances(org, [c.prompt for c in conds.values() if c.prompt is not None])
    summary = summarise(conds, context, n_boot, seed)
    summary["organism_folder"] = org
    summary["setting"] = spec_of(conds).setting.name
    summary["seeds"] = seeds_text(conds)
    figs = {"step0_surprise": fig_step0(conds, summary), "loss_parts": fig_loss_parts(conds),
            "grad_norms": fig_grad_norms(conds), "update_heatmap": fig_update_heatmap(conds, summary),
            "outcomes": fig_outcomes(conds, summary), "elicitation_suppression": fig_elicitation(conds, summary),
            "context_distance": fig_context(conds, summary)}
    written = plots.save_all(figs, out, png=png)
    summary["files"] = [p.name for p in written]
    write_json(out / "summary.json", json_ready(summary))
    (out / "summary.md").write_text(markdown(summary, summary["seeds"], spec_of(conds)))
    return summary


@dataclass
class GradientPressureConfig:
    """Which runs to analyse and where the figures go."""
    paths: list = field(default_factory=lambda: ["runs/sweep"], metadata={"help": "sweep folders or run folders", "positional": "*"})
    out: str = field(default="", metadata={"help": "output folder for figures and summaries (default figures/gradient_pressure/, for a real model's runs figures/<model>/gradient_pressure/)"})
    train_missing: bool = field(default=False, metadata={"help": "run the sweep command for missing runs first"})
    skip_missing: bool = field(default=False, metadata={"help": "analyse the complete runs, skipping missing ones"})
    png: bool = field(default=True, metadata={"help": "also write PNGs (needs Chromium)"})
    n_boot: int = field(default=2000, metadata={"help": "bootstrap resamples for the Spearman CI"})
    seed: int = field(default=0, metadata={"help": "bootstrap seed"})
    threads: int = field(default=1, metadata={"help": "torch CPU threads"})

    def __post_init__(self):
        if self.n_boot < 1:
            raise ValueError("--n-boot must be >= 1")


def main(argv=None):
    a = parse_config(GradientPressureConfig, argv, prog="python analyses/gradient_pressure.py",
                     description=__doc__.split("\n\n")[0])
    if a.out:
        out = Path(a.out)
    else:
        try:
            out = figures_folder(read_runs(find_runs([Path(x) for x in a.paths], skip_missing=True)[:1]), "gradient_pressure")
        except UserError:
            out = Path("figures/gradient_pressure")  # analyse() says what is missing
    s = analyse([Path(x) for x in a.paths], out, a.png, a.train_missing, a.skip_missing, a.n_boot, a.seed, a.threads)
    print((out / "summary.md").read_text())
    print(f"wrote {len(s['files'])} figure files, summary.json and summary.md to {out}")


if __name__ == "__main__":
    sys.exit(run_main(main))
