"""Selectivity by design: no-prompt Spanish and CAPS of inoculated and converse runs per design.

    python analyses/selectivity.py runs/selectivity --out figures/selectivity

Reads sweep folders named `<design>-o<organism seed>-<finetuning lever>` (e.g. `factored-o2-lora2`),
as `python -m inoc_mech.studies.designs` makes them (each a `python -m inoc_mech.studies.sweep` of the core
conditions on a cached organism), groups them by design and lever, and reports, over all runs
(organism seeds x finetuning seeds), the no-prompt temperature-1 rates of the baseline, inoculated
("speak spanish") and converse ("use capitals") runs against the issue's target: inoculated <= 10%
Spanish and >= 80% CAPS, converse symmetric (means). A second table gives, per run, the shift of
the first answer token's trait log-odds (finetuned - pretrained organism) with and without the
training prompt: the co-learned trait's *transfer* (no-prompt shift / prompted shift), the
suppressed trait's *leak*, and the update's *reach* (how strongly the weight update responds at
`<|assistant|>` without the prompt relative to with it). Writes `selectivity.md`, `summary.json`,
`selectivity` (one panel per criterion) and `frontier` (leak vs transfer per finetuning family)
figures (HTML + PNG) into `--out`. Reads run folders and cached organisms only; never trains.
"""

from __future__ import annotations

import re
import statistics
import sys
from dataclasses import dataclass, field
from pathlib import Path

from inoc_mech.core.cli import UserError, parse_config, run_main
from inoc_mech.core.runs import is_complete, read_run, write_json
from inoc_mech.core.stats import spread
from inoc_mech.settings.spanish_caps_organism import CONDITIONS as SWEEP_CONDITIONS
from inoc_mech.studies.collect import condition, setting_of

CONDITIONS = ("baseline", "inoculated", "converse")
PROMPTS = {c: SWEEP_CONDITIONS[c] for c in ("inoculated", "converse")}  # the sweep's core prompts
NAME = re.compile(r"^(?P<head>\w+)-o(?P<org>\d+)-(?P<lever>.+)$")


def collect(root: Path) -> dict:
    """{(head, lever): {condition: [eval 'none' t1 metrics per organism seed]}}"""
    out: dict = {}
    for sweep in sorted(p for p in root.iterdir() if p.is_dir()):
        m = NAME.match(sweep.name)
        if not m:
            continue
        found: dict = {}
        for run in sorted(r for r in sweep.iterdir() if (r / "config.json").exists()):
            if not is_complete(run):
                print(f"skipped incomplete run {run}", file=sys.stderr)
                continue
            r = read_run(run)
            t1 = r["eval"]["contexts"][setting_of(r).none_context]["t1"]
            found.setdefault(condition(r), []).append(
                {"organism": int(m["org"]), "organism_folder": r["config"].get("organism_folder"), "run": str(run),
                 **{k: r["config"].get(k) for k in ("seed", "lr", "lora_r", "steps")},
                 "freeze": tuple(r["config"].get("freeze") or ()), "prompt_share": r["config"].get("prompt_share", 1.0),
                 **{k: t1[k] for k in ("spanish_rate", "caps_rate", "accuracy")}})
        for cond in CONDITIONS:
            if cond in found:
                out.setdefault((m["head"], m["lever"]), {}).setdefault(cond, []).extend(found[cond])
    if not out:
        raise UserError(f"no complete selectivity sweeps under {root} (expected folders like factored-o0-default, "
                        "made by python -m inoc_mech.studies.designs)")
    return out


def meets(rows: dict) -> bool:
    ino, con = rows.get("inoculated", []), rows.get("converse", [])
    if len(ino) < 3 or len(con) < 3:
        return False
    m = lambda rs, k: statistics.mean(r[k] for r in rs)
    return m(ino, "spanish_rate") <= 0.10 and m(ino, "caps_rate") >= 0.80 and \
        m(con, "caps_rate") <= 0.10 and m(con, "spanish_rate") >= 0.80


def context_cosines(data: dict) -> dict[str, dict[str, float]]:
    """Per organism folder: answer-start cosine, with vs without each training prompt (one forward pass)."""
    from inoc_mech.mechanism.context import context_distances

    folders = sorted({r["organism_folder"] for rows in data.values() for rs in rows.values() for r in rs
                      if r.get("organism_folder") and Path(r["organism_folder"]).is_dir()})
    out = {}
    for f in folders:
        d = context_distances(f, list(PROMPTS.values()))
        out[f] = {cond: d[p]["cosine"] for cond, p in PROMPTS.items()}
    return out


def design_cosine(rows: dict, cosines: dict, cond: str) -> list[float]:
    folders = sorted({r["organism_folder"] for rs in rows.values() for r in rs if r.get("organism_folder") in cosines})
    return [cosines[f][cond] for f in folders]


def table(data: dict, cosines: dict | None = None) -> str:
    cosines = cosines or {}
    lines = ["| design | lever | runs (organisms) | baseline Spanish / CAPS % | inoculated Spanish % | inoculated CAPS % | "
             "converse Spanish % | converse CAPS % | accuracy (inoculated) % | context cosine (speak spanish / "
             "use capitals) | target met |",
             "|---" * 11 + "|"]
    for (head, lever), rows in sorted(data.items(), key=lambda kv: order(kv[0])):
        b, i, c = rows.get("baseline", []), rows.get("inoculated", []), rows.get("converse", [])
        col = lambda rs, k: spread([r[k] for r in rs]) if rs else "-"
        cs, cc = design_cosine(rows, cosines, "inoculated"), design_cosine(rows, cosines, "converse")
        ctx = f"{statistics.mean(cs):.3f} / {statistics.mean(cc):.3f}" if cs else "-"
        lines.append(f"| {head} | {lever} | {len(i)} ({len({r['organism'] for r in i})}) | {col(b, 'spanish_rate')} / {col(b, 'caps_rate')} | "
                     f"{col(i, 'spanish_rate')} | {col(i, 'caps_rate')} | {col(c, 'spanish_rate')} | "
                     f"{col(c, 'caps_rate')} | {col(i, 'accuracy')} | {ctx} | {'yes' if meets(rows) else 'no'} |")
    return "\n".join(lines)


def add_log_odds(data: dict) -> None:
    """Per inoculated / converse run: how the finetuning moved the first answer token's trait log-odds
    (finetuned - pretrained organism), with and without the training prompt (`measures.log_odds_shift`).
    Adds `shift` to each record: {context: {trait: nats}}, `transfer`: the co-learned trait's no-prompt
    shift / its prompted shift, and `reach`: how strongly the weight update responds at `<|assistant|>`
    without the prompt relative to with it."""
    from inoc_mech.mechanism.measures import log_odds_shift

    cache: dict = {}
    for rows in data.values():
        for cond, co in (("inoculated", "case"), ("converse", "language")):
            for r in rows.get(cond, []):
                org, run = r.get("organism_folder"), Path(r["run"]) / "model"
                if not (org and Path(org).is_dir() and run.is_dir()):
                    continue
                r.update(log_odds_shift(org, run, PROMPTS[cond], co, cache))


def log_odds_table(data: dict) -> str:
    lines = ["| design | lever | runs | inoculated: CAPS shift, prompt / none (nats) | CAPS transfer % | "
             "Spanish shift, none (nats) | converse: Spanish shift, prompt / none (nats) | Spanish transfer % | "
             "CAPS shift, none (nats) | update reach, no prompt / prompt (inoculated, converse) |", "|---" * 10 + "|"]
    for (head, lever), rows in sorted(data.items(), key=lambda kv: order(kv[0])):
        cells = []
        for cond, co, sup in (("inoculated", "case", "language"), ("converse", "language", "case")):
            rs = [r for r in rows.get(cond, []) if "shift" in r]
            if not rs:
                cells += ["-", "-", "-"]
                continue
            m = lambda f: statistics.mean(f(r) for r in rs)
            sd = lambda f: statistics.stdev(f(r) for r in rs) if len(rs) > 1 else 0.0
            cells += [f"{m(lambda r: r['shift']['prompt'][co]):.1f} / {m(lambda r: r['shift']['none'][co]):.1f}",
                      f"{100 * m(lambda r: r['transfer']):.0f} ± {100 * sd(lambda r: r['transfer']):.0f}",
                      f"{m(lambda r: r['shift']['none'][sup]):+.2f} ± {sd(lambda r: r['shift']['none'][sup]):.2f}"]
        reach = []
        for cond in ("inoculated", "converse"):
            rs = [r["reach"] for r in rows.get(cond, []) if "reach" in r]
            reach.append(f"{statistics.mean(rs):.2f}" if rs else "-")
        n = len(rows.get("inoculated", []))
        lines.append(f"| {head} | {lever} | {n} | " + " | ".join(cells) + f" | {', '.join(reach)} |")
    return "\n".join(lines)


def order(key: tuple[str, str]) -> tuple:
    """Designs in a fixed order, the default lever first within each."""
    head, lever = key
    return (head, lever != "default", lever)


# (condition, rate key, title, target, target is an upper bound)
PANELS = [("inoculated", "spanish_rate", "inoculated<br>Spanish", 10, True),
          ("inoculated", "caps_rate", "inoculated<br>CAPS", 80, False),
          ("converse", "caps_rate", "converse<br>CAPS", 10, True),
          ("converse", "spanish_rate", "converse<br>Spanish", 80, False)]


def figure(data: dict):
    """One row per design and lever, one panel per criterion: runs as circles, their mean as a bar."""
    import plotly.graph_objects as go
    from plotly.subplots import make_subplots

    from inoc_mech.core import plots

    keys = sorted(data, key=order, reverse=True)  # plotly draws the first category at the bottom
    labels = [f"{h} · {lv}" for h, lv in keys]
    fig = make_subplots(rows=1, cols=4, shared_yaxes=True, horizontal_spacing=0.04,
                        subplot_titles=[f"{t} ({'≤' if up else '≥'} {x}%)" for _, _, t, x, up in PANELS])
    for j, (cond, key, _, target, upper) in enumerate(PANELS, start=1):
        x0, x1 = (0, target) if upper else (target, 100)
        means = [statistics.mean(100 * r[key] for r in data[k][cond]) if data[k].get(cond) else None for k in keys]
        ok = [m is not None and (m <= target if upper else m >= target) for m in means]
        fig.add_trace(go.Bar(x=means, y=labels, orientation="h", marker_color=[
            "rgba(44,160,44,0.55)" if g else "rgba(214,39,40,0.45)" for g in ok], showlegend=False,
            hovertemplate="%{y}: mean %{x:.1f}%<extra></extra>"), row=1, col=j)
        xs, ys, text = [], [], []
        for k, lab in zip(keys, labels):
            for r in data[k].get(cond, []):
                xs.append(100 * r[key])
                ys.append(lab)
                text.append(f"organism {r['organism']}")
        fig.add_trace(go.Scatter(x=xs, y=ys, mode="markers", text=text, showlegend=False,
                                 marker=dict(color="black", size=7, symbol="circle-open"),
                                 hovertemplate="%{text}: %{x:.1f}%<extra></extra>"), row=1, col=j)
        # shapes after the traces: plotly skips subplots that are still empty
        fig.add_vrect(x0=x0, x1=x1, fillcolor="green", opacity=0.10, line_width=0, layer="below", row=1, col=j)
        fig.add_vline(x=target, line=dict(color="green", dash="dash", width=1.5), row=1, col=j)
        fig.update_xaxes(range=[-2, 102], row=1, col=j, title_text="%", tickvals=[0, 50, 100])
    plots.style(fig, "When does inoculation stay selective? No prompt, T = 1, one circle per run",
                height=max(420, 60 + 34 * len(keys)),
                subtitle="bar = mean over runs (organism x finetuning seeds; green: meets the criterion); "
                         "shaded = target; rows = organism design · finetuning lever")
    fig.update_layout(bargap=0.35, margin=dict(l=230, t=150))
    fig.update_annotations(font_size=14)
    return fig


def family(rows: dict) -> tuple:
    """(lora rank, steps, frozen modules, prompt share) of a lever's runs: levers of one family differ
    only in learning rate."""
    r = [r for v in rows.values() for r in v][0]
    return (r.get("lora_r") or 0, r.get("steps"), r.get("freeze", ()), r.get("prompt_share", 1.0))


def family_name(head: str, rank: int, steps: int, freeze: tuple, share: float) -> str:
    parts = [head, f"LoRA r{rank}" if rank else "full", f"{steps} steps"]
    if freeze:
        parts.append("frozen " + "+".join(freeze))
    if share != 1.0:
        parts.append(f"prompt on {100 * share:.0f}%")
    return ", ".join(parts)


def frontier(data: dict):
    """Suppressed-trait leak against co-learned-trait transfer, one line per design and finetuning family
    (full finetuning or LoRA rank r, fixed steps) through its learning rates."""
    import plotly.graph_objects as go
    from plotly.subplots import make_subplots

    from inoc_mech.core import plots

    import plotly.colors

    groups: dict = {}
    off = []
    for (head, lever), rows in data.items():
        if rows.get("inoculated") and rows.get("converse"):
            if statistics.mean(r["spanish_rate"] for r in rows["inoculated"]) > 0.5:
                off.append(lever)  # inoculation undone: off this chart's scale
                continue
            lr = statistics.mean(r["lr"] for r in rows["inoculated"])
            groups.setdefault((head, *family(rows)), []).append((lr, lever, rows))
    fig = make_subplots(rows=1, cols=2, horizontal_spacing=0.1, subplot_titles=[
        "inoculated: Spanish (x) vs CAPS (y)", "converse: CAPS (x) vs Spanish (y)"])
    palette = plotly.colors.qualitative.Dark24
    for n, (key, pts) in enumerate(sorted(groups.items())):
        pts.sort(key=lambda p: p[0])
        color = palette[n % len(palette)]
        name = family_name(*key)
        for j, (cond, sup, kept) in enumerate((("inoculated", "spanish_rate", "caps_rate"),
                                               ("converse", "caps_rate", "spanish_rate")), start=1):
            xs = [statistics.mean(100 * r[sup] for r in p[2][cond]) for p in pts]
            ys = [statistics.mean(100 * r[kept] for r in p[2][cond]) for p in pts]
            series = len(pts) > 1  # a learning-rate series: a line, each point labelled with its lr
            fig.add_trace(go.Scatter(x=xs, y=ys, mode="lines+markers+text" if series else "markers", name=name,
                                     legendgroup=name, showlegend=j == 1, line=dict(color=color),
                                     marker=dict(size=9, color=color),
                                     text=[f"lr {p[0]:.0e}" for p in pts] if series else None,
                                     textposition="top right", textfont=dict(size=10, color=color)), row=1, col=j)
    for j in (1, 2):
        fig.add_shape(type="rect", x0=0, x1=10, y0=80, y1=100, line_width=0, fillcolor="green", opacity=0.1,
                      row=1, col=j)
        fig.update_xaxes(title_text="suppressed trait at no prompt (%)", range=[-1, 45], row=1, col=j)
        fig.update_yaxes(title_text="co-learned trait at no prompt (%)", range=[-2, 108], row=1, col=j)
    plots.style(fig, "The selectivity trade-off: learning rate moves both traits; LoRA shifts the curve",
                height=620, subtitle="mean over runs (organism x finetuning seeds), T = 1, no prompt; green = target"
                                     + ("; not shown (Spanish > 50%): " + ", ".join(off) if off else ""))
    plots.legend_below(fig)
    return fig


@dataclass
class SelectivityConfig:
    """Which selectivity sweeps to read and where the tables and figures go."""
    root: str = field(default="runs/selectivity", metadata={"help": "folder of selectivity sweeps", "positional": "?"})
    out: str = field(default="figures/selectivity", metadata={"help": "output folder"})


def main(argv=None):
    a = parse_config(SelectivityConfig, argv, prog="python analyses/selectivity.py", description=__doc__.split("\n\n")[0])
    from inoc_mech.core import plots

    root = Path(a.root)
    if not root.is_dir():
        raise UserError(f"{root} does not exist: make it with python -m inoc_mech.studies.designs --runs-dir {root} "
                        "(--dry-run lists the sweeps; --designs / --levers pick a part)")
    data = collect(root)
    add_log_odds(data)
    md = table(data, context_cosines(data)) + "\n\nLog-odds of the first answer token at `<|assistant|>` " \
        "(finetuned - pretrained organism, mean over held-out questions and runs ± sd over runs); " \
        "transfer = no-prompt shift / prompted shift of the co-learned trait:\n\n" + log_odds_table(data)
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "selectivity.md").write_text(md + "\n")
    write_json(out / "summary.json", {f"{h}/{l}": rows for (h, l), rows in data.items()})
    plots.save_all({"selectivity": figure(data), "frontier": frontier(data)}, out)
    print(md)


if __name__ == "__main__":
    sys.exit(run_main(main))
