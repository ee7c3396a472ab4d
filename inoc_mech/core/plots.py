"""Plotly helpers: one look for every figure, and HTML + PNG files written side by side.

    python -c "from inoc_mech.core.plots import demo; demo('figures/demo')"

PNG export goes through kaleido, which drives a Chrome or Chromium browser. Without one the HTML
files are still written and `save_all` prints one line saying how to get the PNGs.
"""

from __future__ import annotations

import math
import sys
from pathlib import Path

import plotly.graph_objects as go
import plotly.io as pio

WIDTH = 800  # px: README width
COLORS = ["#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#8c564b", "#e377c2", "#7f7f7f",
          "#bcbd22", "#17becf"]
NO_BROWSER_HINT = ("PNG export needs Chrome or Chromium for kaleido: install one (Debian/Ubuntu: "
                   "`apt-get install chromium`, or `plotly_get_chrome`), then rerun; HTML files were written")


def style(fig: go.Figure, title: str, height: int = 500, subtitle: str | None = None) -> go.Figure:
    """Common layout: white template, readable fonts at 800 px, title with an optional second line."""
    text = f"{title}<br><span style='font-size:12px;color:#555'>{subtitle}</span>" if subtitle else title
    fig.update_layout(template="plotly_white", width=WIDTH, height=height, font=dict(size=13),
                      title=dict(text=text, x=0.01, xanchor="left", font=dict(size=16)),
                      legend=dict(font=dict(size=12)), margin=dict(l=70, r=30, t=85 + 20 * subtitle.count("<br>") + 20 if subtitle else 70, b=60))
    return fig


def caption(fig: go.Figure, text: str, y: float = -0.12) -> go.Figure:
    """A note under the plot area (e.g. a caveat); leaves room for it in the bottom margin."""
    fig.add_annotation(text=text, xref="paper", yref="paper", x=0, y=y, xanchor="left", yanchor="top",
                       showarrow=False, align="left", font=dict(size=11, color="#444"))
    n_lines = text.count("<br>") + 1
    fig.update_layout(margin=dict(b=max(fig.layout.margin.b or 60, 60 + 16 * n_lines)))
    return fig


def legend_below(fig: go.Figure, gap_px: int = 55) -> go.Figure:
    """A horizontal legend under the x-axis title, `gap_px` below the plot area."""
    fig.update_layout(margin=dict(b=(fig.layout.margin.b or 60) + 40))
    m = fig.layout.margin
    plot_h = (fig.layout.height or 500) - (m.t or 0) - (m.b or 0)
    fig.update_layout(legend=dict(orientation="h", x=0, xanchor="left", yanchor="top", y=-gap_px / max(plot_h, 1)))
    return fig


def error_array(centres, los, his) -> dict:
    """Plotly asymmetric error bars from interval bounds (missing bounds draw no bar)."""
    plus = [h - c if _finite(h, c) else 0.0 for c, h in zip(centres, his)]
    minus = [c - lo if _finite(lo, c) else 0.0 for c, lo in zip(centres, los)]
    return dict(type="data", symmetric=False, array=plus, arrayminus=minus, thickness=1.2, width=3)


def _finite(*xs) -> bool:
    return all(x is not None and math.isfinite(x) for x in xs)


def browser_available() -> bool:
    """Whether kaleido can find a Chrome/Chromium to render PNGs."""
    try:
        import choreographer.browsers.chromium as chromium

        return chromium.Chromium.find_browser(skip_local=False) is not None
    except Exception:  # noqa: BLE001 - any failure here means "cannot tell": try the export
        import shutil

        return any(shutil.which(b) for b in ("chromium", "chromium-browser", "google-chrome", "chrome"))


def save_all(figs: dict[str, go.Figure], folder: str | Path, png: bool = True, scale: float = 2.0) -> list[Path]:
    """Write `<name>.html` for every figure and, when a browser exists, `<name>.png`; returns the files."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    written = []
    for name, fig in figs.items():
        path = folder / f"{name}.html"
        fig.write_html(path, include_plotlyjs="cdn")
        written.append(path)
    if not png:
        return written
    paths = [folder / f"{name}.png" for name in figs]
    widths = [f.layout.width or WIDTH for f in figs.values()]
    heights = [f.layout.height or 500 for f in figs.values()]
    try:
        if hasattr(pio, "write_images"):  # one browser for all figures
            pio.write_images(list(figs.values()), paths, scale=scale, width=widths, height=heights)
        else:
            for fig, path, w, h in zip(figs.values(), paths, widths, heights):
                fig.write_image(path, scale=scale, width=w, height=h)
        written += paths
    except Exception as e:  # noqa: BLE001 - kaleido raises several types when no browser exists
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        print(f"note: no PNGs ({first[:120]}). {NO_BROWSER_HINT}", file=sys.stderr)
    return written


def demo(folder: str = "figures/demo"):
    fig = go.Figure(go.Bar(x=["a", "b"], y=[1, 2], error_y=error_array([1, 2], [0.5, 1.5], [1.5, 2.5])))
    style(fig, "Demo", 400, "subtitle").update_yaxes(title="value (units)")
    print(save_all({"demo": fig}, folder))
