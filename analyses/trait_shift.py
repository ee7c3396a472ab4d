"""The trait's direction and its shift: did finetuning move the no-prompt representation toward the prompted one?

    python -m inoc_mech.studies.sweep --name sweep-tiny --steps 20 --seeds 0 --prompts && python analyses/trait_shift.py runs/sweep-tiny --out figures/trait_shift-tiny

For each sweep (any setting whose `answer_start` exists, organism or real model; it never trains), the
trait's direction is the displacement that the setting's eliciting prompt (`--prompt`, default the
setting's inoculation prompt) causes in the pretrained model's states at the answer start of the held-out
questions (`mechanism.context.prompt_direction_shift`, per layer); each run's shift is how far its states
*without* the prompt moved along that direction, as a fraction of the prompt's displacement (1: where the
prompted pretrained model sat; 0: not at all), and its total move in any direction in the same unit.
Runs of the setting's core conditions (or `--conditions`). Writes into `--out` (default
figures/trait_shift/) `trait_shift.html` / `.png` (the fraction per layer, one line per condition, mean
over seeds with each seed's line faint; one panel per sweep) and `trait_shift.md` (the last block's input,
i.e. the next-to-last block's output, and the final normed state, HF's last `hidden_states` entry: mean ±
sd over seeds).
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import plotly.graph_objects as go
from plotly.subplots import make_subplots

from inoc_mech.core import plots
from inoc_mech.core.cli import UserError, parse_config, run_main
from inoc_mech.core.stats import spread
from inoc_mech.studies.collect import condition, find_runs, group, one_setting, pretrained_of, read_runs


@dataclass
class TraitShiftConfig:
    """Which sweeps, which prompt, and where the figure goes."""
    sweeps: list = field(default_factory=lambda: ["runs/sweep"], metadata={"help": "sweep folders (or folders of runs)", "positional": "*"})
    prompt: str = field(default="", metadata={"help": "the prompt whose displacement is the direction (default: each setting's inoculation prompt)"})
    conditions: list = field(default_factory=list, metadata={"help": "conditions to show (none given: the setting's core conditions present)"})
    out: str = field(default="figures/trait_shift", metadata={"help": "output folder"})
    png: bool = field(default=True, metadata={"help": "also write PNGs (needs Chromium)"})


def measure(folder: str, prompt: str, conditions: list[str]) -> tuple[dict, dict[str, list[str]], object]:
    """prompt_direction_shift over one sweep's runs (grouped by condition) and its setting."""
    from inoc_mech.mechanism.context import prompt_direction_shift
    from inoc_mech.settings.load import load

    runs = read_runs(find_runs([Path(folder)]))
    setting = one_setting(runs)
    keep = conditions or [c for c in setting.conditions if any(condition(r) == c for r in runs)]
    groups = {c: rs for c, rs in group(runs).items() if c in keep}
    if not groups:
        raise UserError(f"{folder}: no runs of the conditions {', '.join(keep)}")
    starts = {pretrained_of(r) for rs in groups.values() for r in rs}
    if len(starts) != 1:
        raise UserError(f"{folder}: its runs start from different models ({', '.join(sorted(starts))}): one sweep at a time")
    first = next(iter(groups.values()))[0]
    pre = load(starts.pop(), like=first["config"])  # the runs' setting and evaluation flags
    names = {c: [r["folder"] for r in rs] for c, rs in groups.items()}
    res = prompt_direction_shift(pre, {f: f for fs in names.values() for f in fs}, prompt or setting.default_prompt)
    return res, names, setting


def figure(results: list[tuple[str, dict, dict, object]]) -> go.Figure:
    fig = make_subplots(rows=len(results), cols=1, vertical_spacing=0.25 / len(results),
                        subplot_titles=[f"{name} ({s.name} on {s.substrate}): direction of {r['prompt']!r}"
                                        for name, r, _, s in results])
    seen = set()
    colors = {}  # one colour per condition name across the panels
    for _, _, names, _ in results:
        for c in names:
            colors.setdefault(c, plots.COLORS[len(colors) % len(plots.COLORS)])
    for row, (_, res, names, _) in enumerate(results, 1):
        layers = list(range(len(res["direction_norm"])))
        for c, folders in names.items():
            color = colors[c]
            lines = np.array([res["runs"][f]["along"] for f in folders])
            for y in lines:  # each seed, faint
                fig.add_scatter(x=layers, y=y, mode="lines", line=dict(color=color, width=1), opacity=0.3,
                                legendgroup=c, showlegend=False, hoverinfo="skip", row=row, col=1)
            fig.add_scatter(x=layers, y=lines.mean(0), mode="lines+markers", name=c, legendgroup=c,
                            line=dict(color=color, width=2.5), showlegend=c not in seen, row=row, col=1)
            seen.add(c)
        fig.add_hline(y=0, line=dict(color="#888", width=1), row=row, col=1)
        fig.add_hline(y=1, line=dict(color="#888", width=1, dash="dot"), row=row, col=1)
        fig.update_xaxes(title_text="layer boundary (0: embeddings; last: after the final norm)", row=row, col=1,
                         dtick=1 if len(layers) <= 12 else 5)
        fig.update_yaxes(title_text="shift along the prompt's direction", row=row, col=1)
    plots.style(fig, "The trait's direction and its shift: no-prompt states of finetuned models vs the prompt's displacement",
                height=420 * len(results) + 120,
                subtitle="1 (dotted): as far as the prompt moved the pretrained model; lines: mean over seeds, faint: each seed")
    return plots.legend_below(fig)


def table(name: str, res: dict, names: dict[str, list[str]]) -> str:
    last = len(res["direction_norm"]) - 1
    lines = [f"### {name}: direction of {res['prompt']!r} ({res['n_questions']} held-out questions)", "",
             f"Prompt displacement |d|: {res['direction_norm'][last - 1]:.3g} (last block's input), {res['direction_norm'][last]:.3g} "
             f"(final norm); its consistency over questions (mean cosine to d): {res['prompt_cosine'][last - 1]:.2f} / "
             f"{res['prompt_cosine'][last]:.2f}.", "",
             "| condition | runs | along d, last block's input | along d, final norm | total move, last block's input | total move, final norm "
             "| largest mean along d (layer boundary) |",
             "|---|---|---|---|---|---|---|"]
    for c, folders in names.items():
        col = lambda key, i: spread([res["runs"][f][key][i] for f in folders], pct=False)
        mean = np.mean([res["runs"][f]["along"] for f in folders], 0)
        top = int(np.nanargmax(np.abs(mean)))  # (NaN: a layer without a direction)
        lines.append(f"| {c} | {len(folders)} | {col('along', last - 1)} | {col('along', last)} | "
                     f"{col('total', last - 1)} | {col('total', last)} | {mean[top]:.3g} ({top}) |")
    return "\n".join(lines)


def main(argv=None):
    a = parse_config(TraitShiftConfig, argv, prog="python analyses/trait_shift.py", description=__doc__.split("\n\n")[0])
    results = [(s, *measure(s, a.prompt, a.conditions)) for s in a.sweeps]
    md = ("Shift of each finetuned model's no-prompt answer-start state along the eliciting prompt's displacement "
          "in the pretrained model (1: as far as the prompt; 0: none), and its total move (same unit); "
          "mean ± sd [min-max] over seeds.\n\n" + "\n\n".join(table(s, r, n) for s, r, n, _ in results) + "\n")
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "trait_shift.md").write_text(md)
    plots.save_all({"trait_shift": figure(results)}, out, png=a.png)
    print(md)
    print(f"wrote {out}/trait_shift.html" + (" (+ .png)" if a.png else ""))


if __name__ == "__main__":
    sys.exit(run_main(main))
