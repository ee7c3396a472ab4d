"""Trait rates in every evaluation context, per condition, with spread over seeds (any setting).

    python -m inoc_mech.studies.sweep --setting backdoor --name backdoor-tiny --steps 20 --seeds 0 --prompts && python analyses/contexts.py runs/backdoor-tiny --out figures/backdoor-tiny

Reads run folders (a sweep folder, a folder of run folders, or run folders; it never trains) of one
setting and writes into `--out` (default figures/<setting>/) `contexts.html` / `.png`: for each trait
of the setting, and each of its side rates (`Setting.side_rates`, e.g. the persona's other behaviours), its
temperature-1 rate (the setting's scorer) in each context of the runs' eval.json
(the backdoor's `trigger`, `none`, `other_trigger`, ...), one bar per condition (mean over seeds, 95%
t-interval, each seed a dot); and `contexts.md`, the same numbers as a table (mean, sd, min-max) with
the primary task's accuracy, plus the pretrained model's rates when the sweep evaluated it.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field
from pathlib import Path

import plotly.graph_objects as go
from plotly.subplots import make_subplots

from inoc_mech.core import plots
from inoc_mech.core.cli import parse_config, run_main
from inoc_mech.core.stats import mean_ci, spread
from inoc_mech.studies.collect import find_runs, group, one_setting, pretrained_eval, read_runs


@dataclass
class ContextsConfig:
    """Which runs, and where the figure goes."""
    runs: list = field(default_factory=lambda: ["runs/backdoor"], metadata={"help": "sweep folder, folder of runs, or run folders", "positional": "*"})
    out: str = field(default="", metadata={"help": "output folder (default figures/<setting>/)"})
    png: bool = field(default=True, metadata={"help": "also write PNGs (needs Chromium)"})


def rates(runs: list[dict], context: str, key: str) -> list[float]:
    return [r["eval"]["contexts"][context]["t1"][key] for r in runs if context in r["eval"]["contexts"]]


def shown(setting) -> list[tuple[str, str]]:
    """(eval metric, label) of every rate shown: the traits', then the setting's side rates."""
    return [(setting.rate_keys[t], setting.trait_labels[t]) for t in setting.traits] + list(setting.side_rates.items())


def figure(groups: dict[str, list[dict]], setting, contexts: list[str], title: str = "") -> go.Figure:
    metrics = shown(setting)
    fig = make_subplots(rows=len(metrics), cols=1, vertical_spacing=0.3 / len(metrics),
                        subplot_titles=[f"{label} rate (T=1)" for _, label in metrics])
    for row, (key, _) in enumerate(metrics, 1):
        for i, (name, runs) in enumerate(groups.items()):
            stats = [mean_ci(rates(runs, c, key)) for c in contexts]
            color = plots.COLORS[i % len(plots.COLORS)]
            fig.add_bar(x=contexts, y=[100 * s.mean for s in stats], name=name, legendgroup=name, showlegend=row == 1,
                        marker_color=color, offsetgroup=name,
                        error_y=plots.error_array([100 * s.mean for s in stats],  # clipped to 0-100 (NaN: no bar)
                                                  [100 * s.lo if s.lo != s.lo else max(0, 100 * s.lo) for s in stats],
                                                  [100 * s.hi if s.hi != s.hi else min(100, 100 * s.hi) for s in stats]))
            for c in contexts:  # each seed
                ys = [100 * v for v in rates(runs, c, key)]
                fig.add_scatter(x=[c] * len(ys), y=ys, mode="markers", marker=dict(color="#222", size=4),
                                offsetgroup=name, legendgroup=name, showlegend=False, hoverinfo="y")
        fig.update_yaxes(title_text="%", range=[0, 105], row=row, col=1)
    fig.update_layout(barmode="group", scattermode="group")
    ns = sorted({len(r) for r in groups.values()})
    n = str(ns[0]) if len(ns) == 1 else f"{ns[0]}-{ns[-1]}"
    plots.style(fig, title or f"Trait rates by evaluation context: setting {setting.name!r}", height=380 * len(metrics) + 120,
                subtitle=f"held-out questions, T=1; bars: mean over seeds (95% t-interval), dots: seeds (n = {n} per condition)")
    return plots.legend_below(fig)


def table(groups: dict[str, list[dict]], setting, contexts: list[str], pre: dict | None) -> str:
    metrics = shown(setting)
    heads = [f"{label} % in {c}" for c in contexts for _, label in metrics] + [f"accuracy % in {contexts[0]}"]
    lines = ["| condition | runs | " + " | ".join(heads) + " |", "|---" * (len(heads) + 2) + "|"]
    if pre is not None:
        cells = [f"{100 * pre['contexts'][c]['t1'][key]:.1f}" if c in pre["contexts"] else "-"
                 for c in contexts for key, _ in metrics]
        lines.append("| pretrained | 1 | " + " | ".join(cells) + f" | {100 * pre['contexts'][contexts[0]]['t1']['accuracy']:.1f} |")
    for name, runs in groups.items():
        cell = lambda v: spread(v) if v else "-"  # a context some runs lack (older runs)
        cells = [cell(rates(runs, c, key)) for c in contexts for key, _ in metrics]
        acc = cell(rates(runs, contexts[0], "accuracy"))
        lines.append(f"| {name} | {len(runs)} | " + " | ".join(cells) + f" | {acc} |")
    return "\n".join(lines)


def main(argv=None):
    a = parse_config(ContextsConfig, argv, prog="python analyses/contexts.py", description=__doc__.split("\n\n")[0])
    runs = read_runs(find_runs(a.runs), skip_bad=True)
    setting = one_setting(runs)
    contexts = list(runs[0]["eval"]["contexts"])
    contexts.remove(setting.none_context)
    contexts.insert(0, setting.none_context)  # the setting's headline context first
    groups = group(runs)
    out = Path(a.out or Path("figures") / setting.name)
    md = (f"Trait rates (%, T=1, held-out questions) per evaluation context, mean ± sd [min-max] over seeds; "
          f"setting {setting.name!r}.\n\n" + table(groups, setting, contexts, pretrained_eval(runs)) + "\n")
    out.mkdir(parents=True, exist_ok=True)
    (out / "contexts.md").write_text(md)
    plots.save_all({"contexts": figure(groups, setting, contexts)}, out, png=a.png)
    print(md)
    print(f"wrote {out}/contexts.html" + (" (+ .png)" if a.png else ""))


if __name__ == "__main__":
    sys.exit(run_main(main))
