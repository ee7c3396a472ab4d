"""Across settings: does a prompt's step-0 elicitation of the trait predict how much of it training suppresses?

    python analyses/cross_setting.py figures/gradient_pressure/summary.json figures/backdoor/summary.json --out figures/cross_setting

Reads the `summary.json` that `analyses/gradient_pressure.py` writes for each setting's sweep (it
never trains) and puts every (setting, prompt) in one scatter: x = the prompt's step-0 elicitation
of the setting's first trait (nats: baseline's step-0 surprise of the trait minus the condition's,
same seed; mean over seeds), y = its suppression at the setting's no-prompt context (1 - rate /
baseline rate; mean over seeds), with the seeds' 95% intervals. Spearman rho with a bootstrap 95%
CI over the pooled points, and per setting. Writes `cross_setting.html` / `.png` and `summary.md`.
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass, field
from pathlib import Path

import plotly.graph_objects as go

from inoc_mech.core import plots
from inoc_mech.core.cli import UserError, parse_config, run_main
from inoc_mech.core.stats import spearman


@dataclass
class CrossSettingConfig:
    """Which per-setting summaries to pool."""
    summaries: list = field(default_factory=lambda: ["figures/gradient_pressure/summary.json", "figures/backdoor/summary.json",
                                                     "figures/subliminal/summary.json", "figures/em/summary.json"],
                            metadata={"help": "gradient_pressure summary.json files, one per setting", "positional": "*"})
    out: str = field(default="figures/cross_setting", metadata={"help": "output folder"})
    png: bool = field(default=True, metadata={"help": "also write PNGs (needs Chromium)"})
    n_boot: int = field(default=2000, metadata={"help": "bootstrap resamples"})


def points(path: Path) -> tuple[str, str, list[dict]]:
    """(setting, trait, [{prompt, x, x_lo, x_hi, y, y_lo, y_hi}]) of one summary: its first trait, prompted conditions."""
    if not path.exists():
        raise UserError(f"{path}: no such summary; make it with python analyses/gradient_pressure.py <sweep> --out {path.parent}")
    s = json.loads(path.read_text())
    rows = [r for r in s["conditions"].values() if r["prompt"] is not None]
    if not rows:
        raise UserError(f"{path}: no prompted conditions")
    trait = next(iter(rows[0]["elicitation"]))
    setting = s.get("setting") or path.parent.name
    out = []
    for r in rows:
        e, u = r["elicitation"][trait], r["suppression"][trait]
        if e["mean"] is None or u["mean"] is None:
            continue
        (xl, xh), (yl, yh) = e["ci"], u["ci"]  # null where one seed gives no interval
        out.append({"prompt": r["prompt"], "x": e["mean"], "x_lo": xl, "x_hi": xh, "y": u["mean"], "y_lo": yl, "y_hi": yh})
    return setting, trait, out


def figure(groups: list[tuple[str, str, list[dict]]], pooled) -> go.Figure:
    fig = go.Figure()
    for i, (setting, trait, pts) in enumerate(groups):
        c = plots.COLORS[i % len(plots.COLORS)]
        fig.add_scatter(x=[p["x"] for p in pts], y=[100 * p["y"] for p in pts], mode="markers", name=f"{setting} ({trait})",
                        marker=dict(color=c, size=9), text=[p["prompt"] for p in pts],
                        hovertemplate="%{text}<br>elicitation %{x:.3f} nats<br>suppression %{y:.0f}%<extra></extra>",
                        error_x=plots.error_array([p["x"] for p in pts], [p["x_lo"] for p in pts], [p["x_hi"] for p in pts]),
                        error_y=plots.error_array([100 * p["y"] for p in pts], [None if p["y_lo"] is None else 100 * p["y_lo"] for p in pts],
                                                  [None if p["y_hi"] is None else 100 * p["y_hi"] for p in pts]))
    empty = [s for s, _, pts in groups if not pts]
    if empty:  # suppression is undefined where the baseline acquired nothing (gradient_pressure's `acquired`)
        plots.caption(fig, f"No points: {', '.join(empty)} (its baseline acquired no trait to suppress).", y=-0.2)
    fig.update_xaxes(title_text="step-0 elicitation of the trait by the prompt (nats per trait token)")
    fig.update_yaxes(title_text="suppression of the trait at no prompt (%)")
    plots.style(fig, "Elicitation vs suppression across settings", height=560,
                subtitle=f"one point per (setting, prompt), mean over seeds with 95% intervals; pooled {pooled.text()}")
    return plots.legend_below(fig)


def main(argv=None):
    a = parse_config(CrossSettingConfig, argv, prog="python analyses/cross_setting.py", description=__doc__.split("\n\n")[0])
    groups = [points(Path(p)) for p in a.summaries]
    xs = [p["x"] for _, _, pts in groups for p in pts]
    ys = [p["y"] for _, _, pts in groups for p in pts]
    pooled = spearman(xs, ys, n_boot=a.n_boot)
    lines = ["Step-0 elicitation vs suppression, one point per (setting, prompt) (means over seeds).", "",
             "| setting | trait | prompts | Spearman |", "|---|---|---|---|"]
    for setting, trait, pts in groups:
        r = spearman([p["x"] for p in pts], [p["y"] for p in pts], n_boot=a.n_boot)
        lines.append(f"| {setting} | {trait} | {len(pts)} | {r.text()} |")
    lines.append(f"| pooled | | {len(xs)} | {pooled.text()} |")
    lines += ["", "| setting | prompt | elicitation (nats) | suppression % |", "|---|---|---|---|"]
    for setting, trait, pts in groups:
        for p in sorted(pts, key=lambda p: -p["x"]):
            lines.append(f"| {setting} | {p['prompt']} | {p['x']:.3f} | {100 * p['y']:.0f} |")
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "summary.md").write_text("\n".join(lines) + "\n")
    plots.save_all({"cross_setting": figure(groups, pooled)}, out, png=a.png)
    print("\n".join(lines))


if __name__ == "__main__":
    sys.exit(run_main(main))
