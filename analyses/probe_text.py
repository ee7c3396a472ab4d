"""Probes, projections, patching and weight alignment on a real model's runs (SmolLM2 or any HF causal LM).

    python -m inoc_mech.settings.tiny /tmp/tiny-llama && python -m inoc_mech.studies.sweep --model /tmp/tiny-llama --name tiny-text-sweep --steps 2 --seeds 0 --prompts --eval-questions 2 --eval-samples 1 --max-new-tokens 4 --elicit-examples 4 && python analyses/probe_text.py runs/tiny-text-sweep --out figures/probes-tiny-text --train-problems 8 --test-problems 4 --patch-problems 2

`python analyses/probe_traits.py` sends real-model runs here. Reads run folders only (baseline,
inoculated, converse, irrelevant; every seed found) and the model they started from (`--model` of
their config, the same for all). Instruments: `inoc_mech.mechanism.reply_probes`. Writes into
`--out` (default figures/<model>/probes/), HTML and PNG:
1. probe_accuracy: held-out accuracy of the language and case probes per layer boundary, fit on the
   base model's residual stream under prompts that set both traits (teacher-forced replies of all
   four variants), positions pooled and at the answer start;
2. projections: the no-prompt answer-start residual's projection on each boundary's probe direction
   (mean over held-out questions, then over seeds) for base, baseline, inoculated, converse;
3. patching: share of the baseline-inoculated gap in sequence-level Spanish log-odds (and in UPPER
   log-odds) restored by patching the baseline's answer-start residual into the inoculated model at
   each boundary (mean and range over seeds);
4. weight_alignment: share of each output-side update (merged LoRA: W_O, W_out) along the probe
   direction of the boundary it writes to, against 1/sqrt(d_model) for no preference;
and `summary.json` with every number shown and `findings` in words.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import plotly.graph_objects as go
import torch

from inoc_mech.core import plots
from inoc_mech.core.cli import UserError, parse_config, run_main
from inoc_mech.core.runs import write_json
from inoc_mech.core.stats import json_ready
from inoc_mech.mechanism.lens import load_bridge
from inoc_mech.mechanism.reply_probes import (TRAITS, fit_reply_probes, patch_answer_start, projections,
                                              weight_alignment)
from inoc_mech.mechanism.weight_diff import random_share
from inoc_mech.studies.collect import condition, figures_folder, find_runs, pretrained_of, read_runs, substrate_of

CONDITIONS = ("baseline", "inoculated", "converse", "irrelevant")
MARKED = {"language": "Spanish", "case": "UPPER"}
COLORS = {"base": "#7f7f7f", "baseline": "#1f77b4", "inoculated": "#d62728", "converse": "#2ca02c",
          "irrelevant": "#9467bd"}


def text_runs(paths: list[Path], skip_missing: bool = False) -> tuple[dict[str, list[dict]], str]:
    """Complete real-model runs by condition, and the model folder they all started from."""
    runs = [r for r in read_runs(find_runs(paths, skip_missing)) if condition(r) in CONDITIONS]
    if not runs:
        raise UserError(f"no complete baseline/inoculated/converse/irrelevant runs in {', '.join(map(str, paths))}")
    if any(substrate_of(r["config"]) != "text" for r in runs):
        raise UserError("these are organism runs: use python analyses/probe_traits.py")
    bases = {pretrained_of(r) for r in runs}
    if len(bases) > 1:
        raise UserError(f"the runs start from different models ({', '.join(sorted(bases))}): analyse each separately")
    by = {c: sorted([r for r in runs if condition(r) == c], key=lambda r: r["config"]["seed"]) for c in CONDITIONS}
    for need in ("baseline", "inoculated"):
        if not by[need]:
            raise UserError(f"no complete {need} run among {', '.join(map(str, paths))}")
    return by, bases.pop()


def analyse(paths: list[Path], out: Path | None, cfg) -> dict:
    from inoc_mech.settings.textdata import sample_problems

    by, model = text_runs(paths, cfg.skip_missing)
    out = out or figures_folder(by["baseline"], "probes")
    base = load_bridge(model)
    tok = base.tok
    L = base.n_layers
    print(f"fitting probes on {model} ({L} layers) ...", file=sys.stderr)
    probes = fit_reply_probes(base, sample_problems(cfg.train_problems, cfg.probe_seed, "train"),
                              sample_problems(cfg.test_problems, cfg.probe_seed, "eval"), cfg.probe_seed)
    questions = sample_problems(cfg.test_problems, cfg.probe_seed + 1, "eval")
    proj = {"base": [projections(base, probes, questions, tok)]}
    align, patch = {}, []
    boundaries = list(range(0, L + 1, cfg.patch_stride)) + ([L] if L % cfg.patch_stride else [])
    lenses = {}
    for c in ("baseline", "inoculated", "converse", "irrelevant"):
        for r in by[c]:
            print(f"measuring {c} seed {r['config']['seed']} ({r['folder']})", file=sys.stderr)
            lens = load_bridge(r["folder"])
            proj.setdefault(c, []).append(projections(lens, probes, questions, tok))
            align.setdefault(c, []).append(weight_alignment(base, lens, probes))
            if c in ("baseline", "inoculated"):
                lenses[c, r["config"]["seed"]] = lens
            else:
                del lens
    for (c, seed), lens in sorted(lenses.items()):
        if c != "inoculated" or ("baseline", seed) not in lenses:
            continue
        print(f"patching baseline -> inoculated, seed {seed} ...", file=sys.stderr)
        p = patch_answer_start(lens, lenses["baseline", seed], tok,
                               sample_problems(cfg.patch_problems, cfg.probe_seed + 2, "eval"), boundaries)
        patch.append({"seed": seed, **p})

    summary = summarise(probes, proj, align, patch, base.d_model, L)
    summary.update(model=model, runs={c: [str(r["folder"]) for r in rs] for c, rs in by.items()},
                   config={k: v for k, v in vars(cfg).items()})
    figs = {"probe_accuracy": fig_accuracy(summary), "projections": fig_projections(summary),
            "weight_alignment": fig_alignment(summary)}
    if patch:
        figs["patching"] = fig_patching(summary)
    files = plots.save_all(figs, out, png=cfg.png)
    summary["files"] = [str(f) for f in files]
    summary["findings"] = findings(summary)
    write_json(out / "summary.json", json_ready(summary))
    return summary


def summarise(probes, proj, align, patch, d_model: int, L: int) -> dict:
    s = {"n_layers": L, "boundaries": ["emb"] + [f"block {i}" for i in range(L)],
         "probe": {"accuracy": probes.accuracy, "accuracy_answer_start": {t: [a[0] for a in probes.accuracy_by_position[t]]
                                                                             for t in TRAITS},
                   "best": {t: list(probes.best(t)) for t in TRAITS}, "n_train": probes.n_train, "n_test": probes.n_test},
         "projections": {}, "weights": {"random_share": random_share(d_model), "by_condition": {}}, "patching": patch}
    for c, per_seed in proj.items():
        s["projections"][c] = {t: {"mean": np.mean([p[t].mean(1) for p in per_seed], 0).tolist(),
                                   "seed_means": [p[t].mean(1).tolist() for p in per_seed]} for t in TRAITS}
    for c, per_seed in align.items():
        names = list(per_seed[0])
        s["weights"]["by_condition"][c] = {
            "matrices": names,
            **{t: {"share": np.mean([[a[n][t]["share"] for n in names] for a in per_seed], 0).tolist(),
                   "norm": np.mean([[a[n][t]["norm"] for n in names] for a in per_seed], 0).tolist()} for t in TRAITS}}
    if patch:
        s["patching_mean"] = {t: np.mean([p["share"][t] for p in patch], 0).tolist() for t in TRAITS}
        s["patching_boundaries"] = patch[0]["boundaries"]
    return s


# ---- figures ---------------------------------------------------------------------------------------
def fig_accuracy(s) -> go.Figure:
    fig = go.Figure()
    x = s["boundaries"]
    for i, t in enumerate(TRAITS):
        col = plots.COLORS[i]
        fig.add_scatter(x=x, y=s["probe"]["accuracy"][t], name=f"{t}: positions pooled", line=dict(color=col))
        fig.add_scatter(x=x, y=s["probe"]["accuracy_answer_start"][t], name=f"{t}: answer start",
                        line=dict(color=col, dash="dot"))
    fig.update_yaxes(title="held-out accuracy", range=[0.4, 1.02])
    fig.update_xaxes(title="layer boundary (residual stream)")
    return plots.legend_below(plots.style(fig, "Language and case probes on the base model",
                                          subtitle=f"{s['probe']['n_train']} train / {s['probe']['n_test']} held-out "
                                                   "prompted chats (all four reply variants)"))


def fig_projections(s) -> go.Figure:
    from plotly.subplots import make_subplots

    fig = make_subplots(rows=1, cols=2, subplot_titles=[f"{MARKED[t]} direction" for t in TRAITS])
    for j, t in enumerate(TRAITS):
        for c, v in s["projections"].items():
            fig.add_scatter(x=s["boundaries"], y=v[t]["mean"], name=c, legendgroup=c, showlegend=j == 0,
                            line=dict(color=COLORS.get(c)), row=1, col=j + 1)
    fig.update_yaxes(title="projection (> 0: trait side)", col=1)
    fig.update_xaxes(title="layer boundary")
    fig.update_layout(margin=dict(t=110))
    return plots.legend_below(plots.style(fig, "No-prompt answer-start residual on each probe direction",
                                          subtitle="mean over held-out questions and seeds"))


def fig_patching(s) -> go.Figure:
    fig = go.Figure()
    x = [s["boundaries"][b] for b in s["patching_boundaries"]]
    for i, t in enumerate(TRAITS):
        per = np.array([p["share"][t] for p in s["patching"]])
        fig.add_scatter(x=x, y=per.mean(0), name=f"{MARKED[t]} log-odds", line=dict(color=plots.COLORS[i]),
                        error_y=plots.error_array(per.mean(0), per.min(0), per.max(0)))
    fig.add_hline(y=1, line=dict(color="#999", dash="dot"))
    fig.update_yaxes(title="share of the baseline - inoculated gap restored")
    fig.update_xaxes(title="layer boundary patched (answer-start position)")
    gaps = ", ".join(f"{MARKED[t]} {np.mean([p['gap'][t] for p in s['patching']]):.2f}" for t in TRAITS)
    return plots.legend_below(plots.style(fig, "Patching the baseline's answer-start residual into the inoculated model",
                                          subtitle=f"sequence-level log-odds, no prompt; gap (nats): {gaps}; "
                                                   f"bars: range over {len(s['patching'])} seed(s)"), gap_px=95)


def fig_alignment(s) -> go.Figure:
    from plotly.subplots import make_subplots

    fig = make_subplots(rows=1, cols=2, subplot_titles=[f"{MARKED[t]} direction" for t in TRAITS])
    for j, t in enumerate(TRAITS):
        for c, v in s["weights"]["by_condition"].items():
            fig.add_scatter(x=v["matrices"], y=v[t]["share"], name=c, legendgroup=c, showlegend=j == 0, mode="markers",
                            marker=dict(color=COLORS.get(c), size=5), row=1, col=j + 1)
        fig.add_hline(y=s["weights"]["random_share"], line=dict(color="#999", dash="dot"), row=1, col=j + 1)
    fig.update_yaxes(title="share of ||dW|| along the direction", col=1)
    fig.update_xaxes(showticklabels=False, title="output-side matrices (W_O, W_out by block)")
    fig.update_layout(margin=dict(t=110))
    return plots.legend_below(plots.style(fig, "Alignment of the merged update with the probe directions",
                                          subtitle="dotted: 1/sqrt(d_model), no preference"))


def findings(s) -> list[str]:
    out = []
    for t in TRAITS:
        i, a = s["probe"]["best"][t]
        out.append(f"probe {t}: best held-out accuracy {a:.3f} at {s['boundaries'][i]} "
                   f"(answer start there: {s['probe']['accuracy_answer_start'][t][i]:.3f})")
    last = -1
    for t in TRAITS:
        vals = ", ".join(f"{c} {v[t]['mean'][last]:+.2f}" for c, v in s["projections"].items())
        out.append(f"projection on the last boundary's {MARKED[t]} direction, no prompt: {vals}")
    if s.get("patching"):
        for t in TRAITS:
            m = np.array(s["patching_mean"][t])
            k = int(np.nanargmax(m)) if np.isfinite(m).any() else 0
            first = next((b for b, v in zip(s["patching_boundaries"], m) if v >= 0.5), None)
            out.append(f"patching {MARKED[t]} log-odds (gap {np.mean([p['gap'][t] for p in s['patching']]):.2f} nats): "
                       f"most restored at {s['boundaries'][s['patching_boundaries'][k]]} (share {m[k]:.2f}); "
                       f"first boundary with share >= 0.5: {s['boundaries'][first] if first is not None else 'none'}")
    for c, v in s["weights"]["by_condition"].items():
        out.append(f"weights {c}: mean share along the Spanish direction {np.mean(v['language']['share']):.3f}, "
                   f"UPPER {np.mean(v['case']['share']):.3f} (no preference {s['weights']['random_share']:.3f})")
    return out


@dataclass
class ProbeTextConfig:
    """Which real-model runs to analyse, and where the figures go."""
    paths: list = field(default_factory=lambda: ["runs/smollm2"], metadata={"help": "sweep folders, folders of runs, or run folders", "positional": "*"})
    out: str = field(default="", metadata={"help": "output folder (default figures/<model folder name>/probes/)"})
    train_problems: int = field(default=48, metadata={"help": "train-split problems (x4 replies) the probes are fit on"})
    test_problems: int = field(default=24, metadata={"help": "eval-split problems for probe accuracy and projections"})
    patch_problems: int = field(default=8, metadata={"help": "eval-split problems (x4 replies, per boundary) for patching"})
    patch_stride: int = field(default=2, metadata={"help": "patch every N-th layer boundary (and the last)"})
    probe_seed: int = field(default=0, metadata={"help": "seed of the problems and instruction wording"})
    skip_missing: bool = field(default=False, metadata={"help": "analyse the complete runs of an unfinished sweep"})
    png: bool = field(default=True, metadata={"help": "also write PNGs (needs Chromium)"})
    threads: int = field(default=1, metadata={"help": "torch CPU threads"})

    def __post_init__(self):
        if self.train_problems < 2 or self.test_problems < 1 or self.patch_problems < 1 or self.patch_stride < 1:
            raise ValueError("--train-problems >= 2, --test-problems, --patch-problems and --patch-stride >= 1")


def main(argv=None):
    a = parse_config(ProbeTextConfig, argv, prog="python analyses/probe_text.py", description=__doc__.split("\n\n")[0])
    torch.set_num_threads(a.threads)
    s = analyse([Path(x) for x in a.paths], Path(a.out) if a.out else None, a)
    print("\n".join(s["findings"]))
    print(f"wrote {len(s['files'])} figure files and summary.json")


if __name__ == "__main__":
    sys.exit(run_main(main))
