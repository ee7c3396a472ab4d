"""Selectivity by design: no-prompt Spanish and CAPS of inoculated and converse runs per design.

    python analyses/selectivity.py runs/selectivity --out figures/selectivity

Reads sweep folders named `<design>-o<organism seed>-<finetuning lever>` (e.g.
`factored-o2-lr3e-4`, made by `python -m inoc_mech.sweep --runs-dir runs/selectivity --name
factored-o2-lr3e-4 --prompts --seeds 0 --model runs/_organism/factored-d128-l4-s2-<key> --lr 3e-4`;
`--model` points at the cached organism so it is not pretrained again), groups them by design and lever, and reports,
over organism seeds, the no-prompt temperature-1 rates of the baseline, inoculated ("speak spanish")
and converse ("use capitals") runs, with the issue's selectivity target: inoculated <= 10% Spanish
and >= 80% CAPS, converse symmetric. Writes `selectivity.md`, `summary.json` and a scatter figure
(HTML + PNG) into `--out`. Reads run folders only; never trains.
"""

from __future__ import annotations

import argparse
import re
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from inoc_mech.cli import UserError, run_main  # noqa: E402
from inoc_mech.runs import is_complete, read_run, write_json  # noqa: E402

CONDITIONS = ("baseline", "inoculated", "converse")
NAME = re.compile(r"^(?P<head>\w+)-o(?P<org>\d+)-(?P<lever>.+)$")


def collect(root: Path) -> dict:
    """{(head, lever): {condition: [eval 'none' t1 metrics per organism seed]}}"""
    out: dict = {}
    for sweep in sorted(p for p in root.iterdir() if p.is_dir()):
        m = NAME.match(sweep.name)
        if not m:
            continue
        for cond in CONDITIONS:
            for run in sorted(sweep.glob(f"{cond}-s*")):
                if not is_complete(run):
                    print(f"skipped incomplete run {run}", file=sys.stderr)
                    continue
                t1 = read_run(run)["eval"]["contexts"]["none"]["t1"]
                out.setdefault((m["head"], m["lever"]), {}).setdefault(cond, []).append(
                    {"organism": int(m["org"]), **{k: t1[k] for k in ("spanish_rate", "caps_rate", "accuracy")}})
    if not out:
        raise UserError(f"no complete selectivity sweeps under {root} (expected folders like factored-o0-default)")
    return out


def stat(xs: list[float]) -> str:
    xs = [100 * x for x in xs]
    if len(xs) == 1:
        return f"{xs[0]:.1f}"
    return f"{statistics.mean(xs):.1f} ± {statistics.stdev(xs):.1f} ({min(xs):.1f}-{max(xs):.1f})"


def meets(rows: dict) -> bool:
    ino, con = rows.get("inoculated", []), rows.get("converse", [])
    if len(ino) < 3 or len(con) < 3:
        return False
    m = lambda rs, k: statistics.mean(r[k] for r in rs)
    return m(ino, "spanish_rate") <= 0.10 and m(ino, "caps_rate") >= 0.80 and \
        m(con, "caps_rate") <= 0.10 and m(con, "spanish_rate") >= 0.80


def table(data: dict) -> str:
    lines = ["| design | lever | organisms | baseline Spanish / CAPS % | inoculated Spanish % | inoculated CAPS % | "
             "converse Spanish % | converse CAPS % | accuracy (inoculated) % | target met |",
             "|---" * 10 + "|"]
    for (head, lever), rows in sorted(data.items()):
        b, i, c = rows.get("baseline", []), rows.get("inoculated", []), rows.get("converse", [])
        col = lambda rs, k: stat([r[k] for r in rs]) if rs else "-"
        lines.append(f"| {head} | {lever} | {len(i)} | {col(b, 'spanish_rate')} / {col(b, 'caps_rate')} | "
                     f"{col(i, 'spanish_rate')} | {col(i, 'caps_rate')} | {col(c, 'spanish_rate')} | "
                     f"{col(c, 'caps_rate')} | {col(i, 'accuracy')} | {'yes' if meets(rows) else 'no'} |")
    return "\n".join(lines)


def figure(data: dict):
    import plotly.graph_objects as go
    from inoc_mech import plots

    fig = go.Figure()
    xmax = 0.0
    fig.add_shape(type="rect", x0=0, x1=10, y0=80, y1=100, line=dict(color="green", dash="dot"),
                  fillcolor="rgba(0,160,0,0.08)")
    for n, ((head, lever), rows) in enumerate(sorted(data.items())):
        for cond, sym in (("inoculated", "circle"), ("converse", "diamond")):
            rs = rows.get(cond, [])
            if not rs:
                continue
            # converse: the suppressed trait is CAPS and the kept one Spanish, plotted the same way
            sup, kept = ("spanish_rate", "caps_rate") if cond == "inoculated" else ("caps_rate", "spanish_rate")
            xmax = max([xmax] + [100 * r[sup] for r in rs])
            fig.add_trace(go.Scatter(
                x=[100 * r[sup] for r in rs], y=[100 * r[kept] for r in rs], mode="markers",
                marker=dict(symbol=sym, size=11, color=plots.COLORS[n % len(plots.COLORS)]),
                name=f"{head} {lever}: {cond}", text=[f"organism {r['organism']}" for r in rs]))
    fig.update_xaxes(title="suppressed trait at no prompt (%)", range=[-1, max(30.0, xmax + 5)])
    fig.update_yaxes(title="co-learned trait kept at no prompt (%)", range=[-2, 102])
    plots.style(fig, "Selectivity by design: one point per organism seed (finetuning seed 0)", height=620,
                subtitle="inoculated: x = Spanish, y = CAPS; converse: x = CAPS, y = Spanish; "
                         "T = 1, 207 answers per run; green box = target")
    plots.legend_below(fig)
    return fig


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("root", nargs="?", default="runs/selectivity", help="folder of selectivity sweeps")
    p.add_argument("--out", default="figures/selectivity")
    a = p.parse_args()
    from inoc_mech import plots

    root = Path(a.root)
    if not root.is_dir():
        raise UserError(f"{root} does not exist: make it with python -m inoc_mech.sweep --runs-dir {root} "
                        "--name factored-o0-default --prompts --seeds 0 --model <organism folder> "
                        "(see this script's docstring)")
    data = collect(root)
    md = table(data)
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "selectivity.md").write_text(md + "\n")
    write_json(out / "summary.json", {f"{h}/{l}": rows for (h, l), rows in data.items()})
    plots.save_all({"selectivity": figure(data)}, out)
    print(md)


if __name__ == "__main__":
    sys.exit(run_main(main))
