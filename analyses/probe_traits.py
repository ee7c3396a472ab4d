"""Where do the traits live, and what did baseline training change that inoculated training did not?

    python -m inoc_mech.studies.sweep --name sweep-tiny --steps 20 --seeds 0 --prompts && python analyses/probe_traits.py runs/sweep-tiny --out figures/probes-tiny

The full analysis reads the default sweep (~2 min on one busy core once the sweep exists):

    python -m inoc_mech.studies.sweep && python analyses/probe_traits.py

Real-model runs (`--model smollm2` or an HF folder) are sent to `analyses/probe_text.py`, the same
measurements on real text. Reads run folders only and never trains: a missing or incomplete run stops it with the command that
makes it. Arguments are sweep folders (with sweep.json), folders of run folders, or run folders;
each run's condition comes from its config (no prompt: baseline; "speak spanish": inoculated; "use
capitals": converse; "you like cats": irrelevant, the control; "speak spanish . use capitals":
both). All runs must share one pretrained organism (`organism_folder`).

Everything is measured with TransformerLens (`inoc_mech.mechanism.lens`) on the held-out questions, at the
decision position: the residual stream at the `<|assistant|>` token, which predicts the first answer
token (see `inoc_mech.mechanism.probes` for why). Layer boundary 0 is the embedding, boundary L + 1 the output
of block L (before the final norm). Writes into `--out` (default figures/probes/), HTML and PNG:
1. probe_accuracy: held-out accuracy of the language and case probes per layer boundary (pretrained
   organism, prompted contexts), all four answer-predicting positions and the decision position;
2. projections: distribution over questions and seeds of the residual stream's projection on each
   probe direction per layer boundary (signed distance from the probe's boundary, residual-stream
   units; > 0 Spanish / UPPER side), with no system prompt and with the prompt that sets the trait;
3. logit_lens: P(Spanish | answer variant) and P(UPPER | answer variant) for the first answer token
   when the final norm and unembedding read each layer boundary;
4. decomposition: the shift (finetuned - pretrained, no prompt) of the final residual stream's
   projection on the last probe direction, split exactly into the embedding and each block's
   attention and MLP output;
5. patching_resid: share of the baseline-inoculated gap in Spanish log-odds (and the
   baseline-converse gap in UPPER log-odds) that patching the baseline's residual stream into the
   other model restores, per layer boundary and position;
6. patching_components: the same for each block's attention / MLP output (all positions, or the
   decision position only) and for the unembedding (baseline's final norm + lm_head);
7. weight_alignment: share of each output-side weight update (o_proj = W_O, down_proj = W_out;
   finetuned - pretrained) that writes along the probe direction of the boundary it writes to;
   ~1/sqrt(d_model) means no preference.
and `summary.json` with every number shown, plus `findings`: the closing numbers in words.
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
from inoc_mech.core.stats import json_ready
from inoc_mech.mechanism.lens import load_bridge
from inoc_mech.mechanism.measures import context_ids, decision_measures
from inoc_mech.mechanism.patching import component_names, patch
from inoc_mech.mechanism.probes import TRAITS, TraitProbes, fit_trait_probes, probe_data
from inoc_mech.mechanism.weight_diff import alignment, output_matrices, random_share
from inoc_mech.settings.spanish_caps_organism import CONDITIONS as CORE_CONDITIONS
from inoc_mech.studies.collect import condition, find_runs as find_folders, read_runs, sweep_command

MARKED = {"language": "Spanish", "case": "UPPER"}
TRAIT_PROMPT = {"language": "speak spanish", "case": "use capitals"}  # the context that sets each trait
CONTEXTS = {"none": None, **{p: p for p in TRAIT_PROMPT.values()}}
DEFAULT_CONDITIONS = ("baseline", "inoculated", "converse", "irrelevant")
COLORS = {"pretrained": "#7f7f7f", "baseline": "#1f77b4", "inoculated": "#d62728", "converse": "#2ca02c",
          "irrelevant": "#9467bd", "both": "#ff7f0e"}
PATCH_PAIRS = (("baseline", "inoculated", "language"), ("baseline", "converse", "case"))


def label(cond: str) -> str:
    prompt = CORE_CONDITIONS.get(cond)
    if cond == "pretrained":
        return "pretrained"
    if cond == "irrelevant":
        return f'control ("{prompt}")'
    return f'{cond} ("{prompt}")' if prompt else f"{cond} (no prompt)"


def ctx_title(ctx: str) -> str:
    return "no system prompt" if ctx == "none" else f'system prompt "{ctx}"'


def room_for_subplot_titles(fig: go.Figure, px: int = 30) -> go.Figure:
    fig.update_layout(margin=dict(t=(fig.layout.margin.t or 80) + px))
    return fig


def boundary_names(n_layers: int) -> list[str]:
    return ["emb"] + [f"block {i}" for i in range(n_layers)]


# ---- finding runs --------------------------------------------------------------------------------
@dataclass
class Model:
    cond: str  # pretrained, baseline, inoculated, ...
    seed: int | None
    folder: Path


def find_runs(paths: list[Path], conditions: tuple[str, ...], skip_missing: bool = False
              ) -> tuple[list[Model], Path, str]:
    """Complete runs of the wanted conditions, their organism folder, and the command that makes runs."""
    sweeps = [p for p in paths if (p / "sweep.json").exists()]
    command = sweep_command(sweeps[-1]) if sweeps else "python -m inoc_mech.studies.sweep"
    runs = read_runs(find_folders(paths, skip_missing))
    models, organisms = [], set()
    for run in runs:
        cfg, cond = run["config"], condition(run)
        if cond not in conditions:
            continue
        if "organism_folder" not in cfg:
            raise UserError(f"run {run['folder']} is not an organism run (no organism_folder in its config): the "
                            "probe analysis needs the organism's world (prompts that set both traits)")
        organisms.add(cfg["organism_folder"])
        models.append(Model(cond, int(cfg["seed"]), run["folder"]))
    if len(organisms) > 1:
        raise UserError(f"the runs start from different organisms ({', '.join(sorted(organisms))}): analyse each "
                        "organism's runs separately")
    for need in ("baseline", "inoculated"):
        if not any(m.cond == need for m in models):
            raise UserError(f"no complete {need} run among {', '.join(map(str, paths))}: make the runs with `{command}`")
    for cond in conditions:
        if not any(m.cond == cond for m in models):
            print(f"note: no {cond} runs; `{command}` makes them", file=sys.stderr)
    seen = {}
    for m in models:
        if (m.cond, m.seed) in seen:
            raise UserError(f"two {m.cond} runs with seed {m.seed} ({seen[m.cond, m.seed]}, {m.folder}): pass each once")
        seen[m.cond, m.seed] = m.folder
    models.sort(key=lambda m: (conditions.index(m.cond), m.seed))
    organism = Path(organisms.pop())
    if not (organism / "COMPLETE").exists():
        raise UserError(f"the runs' organism {organism} is missing: `python -m inoc_mech.models.organism` pretrains it")
    return [Model("pretrained", None, organism)] + models, organism, command


# ---- numbers ---------------------------------------------------------------------------------------
def by_cond(models: list[Model], meas: list[dict]) -> dict[str, list[dict]]:
    out: dict[str, list[dict]] = {}
    for m, r in zip(models, meas):
        out.setdefault(m.cond, []).append(r)
    return out


def seed_means(rs: list[dict], ctx: str, trait: str, key: str) -> np.ndarray:
    """Per-seed means over questions: [seed, ...] (last axis of the stored array is questions)."""
    return np.stack([r["contexts"][ctx][trait][key].mean(-1) for r in rs])


# ---- figures -----------------------------------------------------------------------------------
def seeds_text(models: list[Model]) -> str:
    seeds = sorted({m.seed for m in models if m.seed is not None})
    return f"finetuning seeds {', '.join(map(str, seeds))}"


def fig_probe_accuracy(probes: TraitProbes, names: list[str], organism: Path) -> go.Figure:
    fig = go.Figure()
    dash = {"language": "solid", "case": "dot"}
    size = {"language": 13, "case": 7}  # the traits' curves can coincide: big and small markers keep both visible
    for t, color in zip(TRAITS, ("#d62728", "#1f77b4")):
        fig.add_trace(go.Scatter(x=names, y=probes.accuracy[t], mode="lines+markers", line=dict(color=color, dash=dash[t]),
                                 marker=dict(size=size[t]), name=f"{t} ({MARKED[t]} vs not): 4 answer-predicting positions"))
        fig.add_trace(go.Scatter(x=names, y=[a[0] for a in probes.accuracy_by_position[t]], mode="lines+markers",
                                 marker=dict(symbol="x-open" if t == "language" else "x", size=size[t] + 2),
                                 line=dict(color=color, dash="dash", width=1),
                                 name=f"{t}: decision position (<|assistant|>) only"))
    fig.add_hline(y=0.5, line=dict(color="#999", dash="dash"), annotation_text="chance", annotation_position="bottom right")
    fig.add_hline(y=0.95, line=dict(color="#2ca02c", dash="dot", width=1), annotation_text="0.95 target",
                  annotation_position="top left")
    plots.style(fig, "Linear probes find both traits from block 0 on", 520,
                f"held-out accuracy, {probes.n_test} held-out chats x 4 positions (fit on {probes.n_train} chats); "
                f"pretrained organism {organism.name}<br>prompted contexts set language and case; answers teacher-forced")
    fig.update_yaxes(title="held-out accuracy (fraction correct)", range=[0.4, 1.03])
    fig.update_xaxes(title="residual stream after (emb = embedding output)")
    return plots.legend_below(fig)


def fig_projections(models, meas, probes, names, n_q) -> go.Figure:
    fig = make_subplots(rows=2, cols=2, shared_xaxes=True, vertical_spacing=0.12, horizontal_spacing=0.08,
                        subplot_titles=[f"{MARKED[t]} direction, {ctx_title(c)}" for t in TRAITS
                                        for c in ("none", TRAIT_PROMPT[t])])
    shown = set()
    for r_i, t in enumerate(TRAITS, 1):
        for c_i, ctx in enumerate(("none", TRAIT_PROMPT[t]), 1):
            for cond, rs in by_cond(models, meas).items():
                vals = np.concatenate([r["contexts"][ctx][t]["projection"] for r in rs], axis=1)  # [b, q*seeds]
                x = np.repeat(np.array(names), vals.shape[1])
                fig.add_trace(go.Box(x=x, y=vals.reshape(-1), name=label(cond), marker_color=COLORS[cond],
                                     boxpoints=False, line=dict(width=1.2), offsetgroup=cond, legendgroup=cond,
                                     showlegend=cond not in shown), row=r_i, col=c_i)
                shown.add(cond)
            fig.add_hline(y=0, line=dict(color="#999", dash="dash", width=1), row=r_i, col=c_i)
        fig.update_yaxes(title_text=f"projection on {MARKED[t]} probe<br>(residual units, >0: {MARKED[t]})", row=r_i, col=1)
    fig.update_xaxes(title_text="residual stream after", row=2)
    fig.update_layout(boxmode="group", boxgap=0.25, boxgroupgap=0.1)
    plots.style(fig, "Projection of the decision-position residual stream on each trait probe", 900,
                f"held-out questions: n = {n_q} per seed; {seeds_text(models)}; box: quartiles, whiskers 1.5 IQR;"
                f"<br>left: no system prompt, right: the prompt that sets the trait")
    return plots.legend_below(room_for_subplot_titles(fig), 70)


def fig_logit_lens(models, meas, names, n_q) -> go.Figure:
    fig = make_subplots(rows=2, cols=2, shared_xaxes=True, vertical_spacing=0.12, horizontal_spacing=0.08,
                        subplot_titles=[f"P({MARKED[t]}), {ctx_title(c)}" for t in TRAITS
                                        for c in ("none", TRAIT_PROMPT[t])])
    shown = set()
    for r_i, t in enumerate(TRAITS, 1):
        for c_i, ctx in enumerate(("none", TRAIT_PROMPT[t]), 1):
            for cond, rs in by_cond(models, meas).items():
                s = seed_means(rs, ctx, t, "lens_share")  # [seed, boundary]
                mean = s.mean(0)
                err = plots.error_array(mean, s.min(0), s.max(0)) if len(s) > 1 else None
                fig.add_trace(go.Scatter(x=names, y=mean, mode="lines+markers", name=label(cond),
                                         line=dict(color=COLORS[cond]), error_y=err, legendgroup=cond,
                                         showlegend=cond not in shown), row=r_i, col=c_i)
                shown.add(cond)
        fig.update_yaxes(title_text=f"P({MARKED[t]} | answer variant)<br>first answer token", range=[-0.03, 1.03], row=r_i, col=1)
        fig.update_yaxes(range=[-0.03, 1.03], row=r_i, col=2)
    fig.update_xaxes(title_text="residual stream read by final norm + unembedding", row=2)
    plots.style(fig, "Logit lens: the trait appears layer by layer", 860,
                f"mean over held-out questions (n = {n_q} per seed); error bars: range over seeds; {seeds_text(models)}")
    return plots.legend_below(room_for_subplot_titles(fig), 70)


def fig_decomposition(models, meas, n_layers, n_q) -> go.Figure:
    comps = ["emb"] + [f"{k}{i}" for i in range(n_layers) for k in ("attn", "mlp")] + ["total"]
    fig = make_subplots(rows=2, cols=1, shared_xaxes=True, vertical_spacing=0.1,
                        subplot_titles=[f"{MARKED[t]} direction (probe after block {n_layers - 1})" for t in TRAITS])
    groups = by_cond(models, meas)
    pre = groups["pretrained"][0]
    shown = set()
    for r_i, t in enumerate(TRAITS, 1):
        base = pre["contexts"]["none"][t]["writes"].mean(-1)
        for cond, rs in groups.items():
            if cond == "pretrained":
                continue
            s = seed_means(rs, "none", t, "writes") - base  # [seed, component]
            s = np.concatenate([s, s.sum(1, keepdims=True)], 1)  # + total: the final projection's shift
            fig.add_trace(go.Bar(x=comps, y=s.mean(0), name=label(cond), marker_color=COLORS[cond],
                                 error_y=plots.error_array(s.mean(0), s.min(0), s.max(0)) if len(s) > 1 else None,
                                 legendgroup=cond, showlegend=cond not in shown), row=r_i, col=1)
            shown.add(cond)
        fig.update_yaxes(title_text=f"shift of write on {MARKED[t]}<br>(residual units)", row=r_i, col=1)
    fig.update_xaxes(title_text="component (output at the decision position)", row=2)
    fig.update_layout(barmode="group")
    plots.style(fig, "Which component's write along the trait direction changed (finetuned - pretrained)", 760,
                f"no system prompt; mean over held-out questions (n = {n_q} per seed), bars: mean over seeds, "
                f"error bars: range; {seeds_text(models)}<br>the component shifts sum exactly to 'total', "
                f"the shift of the final residual stream's projection")
    return plots.legend_below(room_for_subplot_titles(fig, 20))


def fig_patching_resid(patches: dict, names: list[str], tokens: list[str], n_q: int, seeds: list[int]) -> go.Figure:
    keys = list(patches)
    fig = make_subplots(rows=len(keys), cols=1, vertical_spacing=0.16,
                        subplot_titles=[f"{s} -> {d}: {MARKED[t]} log-odds, gap {np.mean([p.source - p.target for p in patches[(s, d, t)]]):.1f} nats"
                                        for s, d, t in keys])
    for i, key in enumerate(keys, 1):
        z = np.mean([p.restored(p.resid) for p in patches[key]], 0)
        fig.add_trace(go.Heatmap(z=z, x=tokens, y=names, zmin=-0.2, zmax=1.2, colorscale="RdBu_r", zmid=0,
                                 texttemplate="%{z:.2f}", textfont=dict(size=11),
                                 colorbar=dict(title="share<br>restored", len=0.8)), row=i, col=1)
        fig.update_yaxes(title_text="residual stream after", autorange="reversed", row=i, col=1)
    fig.update_xaxes(title_text="position (token; a, op, b vary by question)", row=len(keys))
    plots.style(fig, "Patching the baseline's residual stream into the prompt-trained model", 380 * len(keys) + 60,
                f"share of the gap restored = (patched - target) / (source - target), first answer token; "
                f"<br>mean over seeds {', '.join(map(str, seeds))}; n = {n_q} held-out questions, no system prompt")
    return room_for_subplot_titles(fig, 25)


def fig_patching_components(patches: dict, n_layers: int, n_q: int, seeds: list[int]) -> go.Figure:
    sites = list(component_names(n_layers))
    keys = list(patches)
    fig = make_subplots(rows=len(keys), cols=1, vertical_spacing=0.16,
                        subplot_titles=[f"{s} -> {d}: {MARKED[t]} log-odds" for s, d, t in keys])
    for i, key in enumerate(keys, 1):
        for where, color, name in (("all", "#1f77b4", "all positions"), ("last", "#ff7f0e", "decision position only")):
            v = np.array([[p.restored(p.components[s][where]) for s in sites] for p in patches[key]])
            fig.add_trace(go.Bar(x=sites, y=v.mean(0), name=name, marker_color=color, legendgroup=where,
                                 error_y=plots.error_array(v.mean(0), v.min(0), v.max(0)) if len(v) > 1 else None,
                                 showlegend=i == 1), row=i, col=1)
        u = np.array([p.restored(p.unembed) for p in patches[key]])
        fig.add_trace(go.Bar(x=["unembed"], y=[u.mean()], name="final norm + unembedding", marker_color="#7f7f7f",
                             legendgroup="u", showlegend=i == 1,
                             error_y=plots.error_array([u.mean()], [u.min()], [u.max()]) if len(u) > 1 else None),
                      row=i, col=1)
        fig.add_hline(y=1, line=dict(color="#999", dash="dash", width=1), row=i, col=1)
        fig.update_yaxes(title_text="share of gap restored", range=[-0.15, 1.2], row=i, col=1)
    fig.update_xaxes(title_text="patched component (from the baseline model)", row=len(keys))
    fig.update_layout(barmode="group")
    plots.style(fig, "Patching single components from the baseline model", 340 * len(keys) + 120,
                f"first answer token, no system prompt; n = {n_q} held-out questions; bars: mean over seeds "
                f"{', '.join(map(str, seeds))}, error bars: range; dashed: the whole gap")
    return plots.legend_below(room_for_subplot_titles(fig, 20))


def fig_weights(weights: dict, d_model: int, seeds: list[int]) -> go.Figure:
    fig = make_subplots(rows=2, cols=1, shared_xaxes=True, vertical_spacing=0.1,
                        subplot_titles=[f"{MARKED[t]} probe direction of the boundary written to" for t in TRAITS])
    shown = set()
    for r_i, t in enumerate(TRAITS, 1):
        for cond, per_seed in weights.items():
            mats = list(per_seed[0])
            xs = [m.replace("blocks.", "b").replace(".attn.", " ").replace(".mlp.", " ") for m in mats]
            v = np.array([[w[m][t]["share"] for m in mats] for w in per_seed])
            fig.add_trace(go.Bar(x=xs,
                                 y=v.mean(0), name=label(cond), marker_color=COLORS[cond], legendgroup=cond,
                                 error_y=plots.error_array(v.mean(0), v.min(0), v.max(0)) if len(v) > 1 else None,
                                 showlegend=cond not in shown), row=r_i, col=1)
            shown.add(cond)
        fig.add_trace(go.Scatter(x=[xs[0], xs[-1]], y=[random_share(d_model)] * 2, mode="lines",
                                 line=dict(color="#555", dash="dash"), name=f"no preferred direction: 1/sqrt({d_model})",
                                 legendgroup="random", showlegend=r_i == 1), row=r_i, col=1)
        fig.update_yaxes(title_text="||u^T dW|| / ||dW||_F", row=r_i, col=1)
    fig.update_xaxes(title_text="output-side matrix (block, W_O = o_proj, W_out = down_proj)", row=2)
    fig.update_layout(barmode="group")
    plots.style(fig, "Share of each weight update (finetuned - pretrained) writing along the trait direction", 740,
                f"bars: mean over finetuning seeds {', '.join(map(str, seeds))}, error bars: range; "
                f"u: unit probe direction of the residual stream after that block")
    fig.update_yaxes(range=[0, 1])
    return plots.legend_below(room_for_subplot_titles(fig, 20))


# ---- analysis ------------------------------------------------------------------------------------
def position_labels(tok, ids: Tensor) -> list[str]:
    toks = tok.convert_ids_to_tokens(ids[0].tolist())
    varying = iter(["a", "op", "b", "?", "?", "?"])
    return [next(varying) if len(set(ids[:, i].tolist())) > 1 else t for i, t in enumerate(toks)]


def analyse(paths: list[Path], out: Path, conditions: tuple[str, ...], png: bool, probe_seed: int,
            skip_missing: bool = False) -> dict:
    models, organism, command = find_runs(paths, conditions, skip_missing)
    print(f"{len(models) - 1} runs from organism {organism}", file=sys.stderr)
    pre = load_bridge(organism)
    world, tok = pre.setting.require("world", "the probe analysis (prompted chats that set both traits)"), pre.tok
    odds = pre.setting.require("first_token_log_odds", "patching's trait log-odds")
    names = boundary_names(pre.n_layers)
    print("fitting probes on the pretrained organism ...", file=sys.stderr)
    probes = fit_trait_probes(pre.bridge, world, tok, seed=probe_seed)
    test_data = probe_data(world, tok, world.held_out_questions, probe_seed + 1)
    ids = context_ids(pre.setting, CONTEXTS)
    n_q = len(world.held_out_questions)
    pre_w = output_matrices(pre.model)

    meas, weights = [], {}
    for m in models:
        lens = pre if m.cond == "pretrained" else load_bridge(m.folder)
        print(f"measuring {m.cond} seed {m.seed} ({m.folder})", file=sys.stderr)
        meas.append(decision_measures(lens, ids, probes, test_data))
        if m.cond != "pretrained":
            ft_w = output_matrices(lens.model)
            weights.setdefault(m.cond, []).append({
                k: {t: alignment(ft_w[k] - pre_w[k], probes.probes[t][int(k.split(".")[1]) + 1].direction)
                    for t in TRAITS} for k in pre_w})

    patches: dict[tuple, list] = {}
    for src_c, dst_c, t in PATCH_PAIRS:
        for s in sorted({m.seed for m in models if m.cond == dst_c}):
            src = next((m for m in models if m.cond == src_c and m.seed == s), None)
            dst = next(m for m in models if m.cond == dst_c and m.seed == s)
            if src is None:
                continue
            print(f"patching {src_c} -> {dst_c} seed {s}", file=sys.stderr)
            metric = (lambda trait: lambda lp: odds(lp, trait))(t)
            patches.setdefault((src_c, dst_c, t), []).append(
                patch(load_bridge(dst.folder), load_bridge(src.folder), ids["none"], metric))
    seeds = sorted({m.seed for m in models if m.seed is not None})
    summary = summarise(models, meas, probes, patches, weights, names, n_q, organism, seeds, pre.d_model, command)
    figs = {
        "probe_accuracy": fig_probe_accuracy(probes, names, organism),
        "projections": fig_projections(models, meas, probes, names, n_q),
        "logit_lens": fig_logit_lens(models, meas, names, n_q),
        "decomposition": fig_decomposition(models, meas, pre.n_layers, n_q),
        "patching_resid": fig_patching_resid(patches, names, position_labels(tok, ids["none"]), n_q, seeds),
        "patching_components": fig_patching_components(patches, pre.n_layers, n_q, seeds),
        "weight_alignment": fig_weights(weights, pre.d_model, seeds),
    }
    files = plots.save_all(figs, out, png=png)
    summary["files"] = [str(f) for f in files]
    write_json(out / "summary.json", json_ready(summary, 4))
    return summary


def summarise(models, meas, probes: TraitProbes, patches, weights, names, n_q, organism, seeds, d_model, command) -> dict:
    groups = by_cond(models, meas)
    pre = groups["pretrained"][0]
    s = {"organism": str(organism), "runs": {m.cond: [str(x.folder) for x in models if x.cond == m.cond] for m in models},
         "seeds": seeds, "n_questions": n_q, "boundaries": names, "command": command,
         "position": "residual stream at <|assistant|>, the position predicting the first answer token",
         "probes": {"n_train_chats": probes.n_train, "n_test_chats": probes.n_test,
                    "accuracy_all_positions": probes.accuracy,
                    "accuracy_decision_position": {t: [a[0] for a in probes.accuracy_by_position[t]] for t in TRAITS},
                    "accuracy_by_position": probes.accuracy_by_position,
                    "separation": {t: [p.separation for p in probes.probes[t]] for t in TRAITS},
                    "direction_cosine_language_case": [float(lp.direction @ cp.direction) for lp, cp in
                                                       zip(probes.probes["language"], probes.probes["case"])],
                    "transfer_accuracy": {c: {t: np.mean([r["probe_accuracy"][t] for r in rs], 0).tolist() for t in TRAITS}
                                          for c, rs in groups.items()}},
         "projection": {}, "logit_lens": {}, "log_odds": {}, "writes": {}, "patching": {}, "weights": {}}
    for ctx in CONTEXTS:
        s["projection"][ctx], s["logit_lens"][ctx], s["log_odds"][ctx] = {}, {}, {}
        for t in TRAITS:
            base = pre["contexts"][ctx][t]["projection"].mean(-1)
            sep = np.array([p.separation for p in probes.probes[t]])
            s["projection"][ctx][t] = {c: {"mean": seed_means(rs, ctx, t, "projection").mean(0),
                                           "per_seed": seed_means(rs, ctx, t, "projection"),
                                           "shift_vs_pretrained": seed_means(rs, ctx, t, "projection").mean(0) - base,
                                           "shift_in_separations": (seed_means(rs, ctx, t, "projection").mean(0) - base) / sep}
                                       for c, rs in groups.items()}
            s["logit_lens"][ctx][t] = {c: seed_means(rs, ctx, t, "lens_share").mean(0) for c, rs in groups.items()}
            s["log_odds"][ctx][t] = {c: seed_means(rs, ctx, t, "log_odds").tolist() for c, rs in groups.items()}
    comps = ["emb"] + [f"{k}{i}" for i in range((len(names) - 1)) for k in ("attn", "mlp")]
    for t in TRAITS:
        base = pre["contexts"]["none"][t]["writes"].mean(-1)
        s["writes"][t] = {"components": comps, **{c: (seed_means(rs, "none", t, "writes") - base).mean(0)
                                                   for c, rs in groups.items() if c != "pretrained"}}
    for (a, b, t), ps in patches.items():
        s["patching"][f"{a}->{b}"] = {"trait": t, "seeds": [p.to_dict() for p in ps],
                                      "resid_restored_mean": np.mean([p.restored(p.resid) for p in ps], 0),
                                      "unembed_restored_mean": float(np.mean([p.restored(p.unembed) for p in ps]))}
    s["weights"] = {"random_share": random_share(d_model),
                    **{c: {k: {t: {q: float(np.mean([w[k][t][q] for w in ws])) for q in ("norm", "share", "top_cos")}
                               for t in TRAITS} for k in ws[0]} for c, ws in weights.items()}}
    s["findings"] = findings(s, names)
    return s


def findings(s: dict, names: list[str]) -> list[str]:
    """The closing numbers in words: where baseline and inoculated differ."""
    out = []
    acc = s["probes"]["accuracy_decision_position"]
    out.append("cosine between the language and case probe directions per boundary: "
               + ", ".join(f"{n} {c:+.2f}" for n, c in zip(names, s["probes"]["direction_cosine_language_case"])))
    for t in TRAITS:
        i = int(np.argmax(acc[t]))
        out.append(f"{t} probe: held-out accuracy {acc[t][i]:.3f} at the decision position first reached at "
                   f"'{names[i]}' (all positions: {max(s['probes']['accuracy_all_positions'][t]):.3f})")
    proj = s["projection"]["none"]
    for t in TRAITS:
        if "inoculated" not in proj[t] or "baseline" not in proj[t]:
            continue
        d = np.asarray(proj[t]["baseline"]["mean"]) - np.asarray(proj[t]["inoculated"]["mean"])
        i = int(np.argmax(np.abs(d)))
        sep = s["probes"]["separation"][t][i]
        out.append(f"no prompt, {MARKED[t]} projection: baseline - inoculated = {d[i]:+.2f} residual units at '{names[i]}' "
                   f"({d[i] / sep:+.2f} of the prompted {MARKED[t]}-vs-not separation {sep:.2f}); per boundary "
                   + ", ".join(f"{n} {v:+.2f}" for n, v in zip(names, d)))
    w = s["writes"]["language"]
    if "baseline" in w and "inoculated" in w:
        d = np.asarray(w["baseline"]) - np.asarray(w["inoculated"])
        order = np.argsort(-np.abs(d))[:3]
        out.append("largest baseline - inoculated differences in writes on the Spanish direction (no prompt): "
                   + ", ".join(f"{w['components'][i]} {d[i]:+.2f}" for i in order) + f" (total {d.sum():+.2f})")
    for key, p in s["patching"].items():
        r = np.asarray(p["resid_restored_mean"])
        last = r[:, -1]
        other = np.abs(r[:, :-1]).max()
        first = next((names[i] for i, v in enumerate(last) if v >= 0.5), None)
        comp = p["seeds"][0]["components_restored"]
        comp_mean = {k: float(np.mean([q["components_restored"][k]["last"] for q in p["seeds"]])) for k in comp}
        best = max(comp_mean, key=lambda k: comp_mean[k])
        out.append(f"patching {key} ({MARKED[p['trait']]} log-odds, gap "
                   f"{np.mean([q['gap'] for q in p['seeds']]):.2f} nats): decision-position residual restores "
                   + ", ".join(f"{n} {v:.2f}" for n, v in zip(names, last))
                   + f"; >= 0.5 first after '{first}'; any other position at most {other:.2f}; best single component "
                   f"at the decision position {best} {comp_mean[best]:.2f}; baseline unembedding {p['unembed_restored_mean']:.2f}")
    ws = {c: v for c, v in s["weights"].items() if c != "random_share"}
    for t in TRAITS:
        parts = []
        for c, mats in ws.items():
            shares = {k: mats[k][t]["share"] for k in mats}
            top = max(shares, key=shares.get)
            parts.append(f"{c} mean {np.mean(list(shares.values())):.3f} (max {shares[top]:.3f} at {top})")
        out.append(f"weights: share of the output-side update along the {MARKED[t]} direction, over "
                   f"{len(next(iter(ws.values())))} matrices: " + "; ".join(parts)
                   + f"; no preference {s['weights']['random_share']:.3f}")
    for c, mats in ws.items():
        out.append(f"weights: ||dW||_F summed over output-side matrices, {c}: "
                   f"{sum(m['language']['norm'] for m in mats.values()):.3f}")
    return out


@dataclass
class ProbeTraitsConfig:
    """Which runs to compare with their pretrained organism, and where the figures go."""
    paths: list = field(default_factory=lambda: ["runs/sweep"], metadata={"help": "sweep folders, folders of runs, or run folders", "positional": "*"})
    out: str = field(default="figures/probes", metadata={"help": "output folder for figures and summary.json"})
    conditions: list = field(default_factory=lambda: list(DEFAULT_CONDITIONS), metadata={"help": f"conditions to compare with the pretrained organism (any of {', '.join(CORE_CONDITIONS)})"})
    probe_seed: int = field(default=0, metadata={"help": "seed of the probe contexts' phrase choices"})
    skip_missing: bool = field(default=False, metadata={"help": "analyse the complete runs of an unfinished sweep"})
    png: bool = field(default=True, metadata={"help": "also write PNGs (needs Chromium)"})
    threads: int = field(default=1, metadata={"help": "torch CPU threads"})

    def __post_init__(self):
        bad = [c for c in self.conditions if c not in CORE_CONDITIONS]
        if bad:
            raise ValueError(f"unknown condition {bad[0]!r}: choose from {', '.join(CORE_CONDITIONS)}")
        if "baseline" not in self.conditions or "inoculated" not in self.conditions:
            raise ValueError("--conditions must include baseline and inoculated")


def real_model_runs(paths: list[str]) -> bool:
    """Whether the paths hold runs of a real model (analysed by `analyses/probe_text.py`)."""
    from inoc_mech.studies.collect import substrate_of

    try:
        runs = read_runs(find_folders([Path(p) for p in paths], skip_missing=True))
    except UserError:
        return False  # the organism path says what is wrong
    return bool(runs) and all(substrate_of(r["config"]) == "text" for r in runs)


def main(argv=None):
    args = sys.argv[1:] if argv is None else list(argv)
    paths = [x for x in args if not x.startswith("-")][:1] or ["runs/sweep"]
    if "-h" not in args and "--help" not in args and real_model_runs(paths):
        try:
            from analyses import probe_text  # python -m analyses.probe_traits, pytest
        except ModuleNotFoundError:
            import probe_text  # python analyses/probe_traits.py: this folder is on sys.path
        keep = [x for x in args if not x.startswith("--conditions")]  # probe_text has its own flags
        print("real-model runs: analysed by analyses/probe_text.py", file=sys.stderr)
        return probe_text.main(keep)
    a = parse_config(ProbeTraitsConfig, argv, prog="python analyses/probe_traits.py", description=__doc__.split("\n\n")[0])
    torch.set_num_threads(a.threads)
    out = Path(a.out)
    s = analyse([Path(x) for x in a.paths], out, tuple(a.conditions), a.png, a.probe_seed, a.skip_missing)
    print("\n".join(s["findings"]))
    print(f"wrote {len(s['files'])} figure files and summary.json to {out}")


if __name__ == "__main__":
    sys.exit(run_main(main))
