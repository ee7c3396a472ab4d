"""Finding runs and grouping them by the condition recorded at train time: what every analysis reads.

    python -c "from inoc_mech.studies.collect import find_runs, read_runs, group; print(list(group(read_runs(find_runs(['runs/sweep'])))))"

`find_runs(paths)` turns sweep folders (with sweep.json), folders of run folders and run folders
into the complete run folders they stand for; a missing or incomplete run stops it with one line
naming the command that makes it (`skip_missing` analyses the others, `train_missing` runs the
sweep's own command first). `read_runs` reads them (`core.runs.read_run`), `group` groups them by
condition: `config.json`'s `condition` (written since the Setting seam), for older runs the
condition its setting gives the run's prompt (`Setting.condition`). `setting_of(run)` is the
setting class of a run (`config.json` "setting" on the run's substrate).
"""

from __future__ import annotations

import json
import math
import shlex
import subprocess
import sys
from pathlib import Path

from inoc_mech.core.cli import UserError
from inoc_mech.core.runs import is_complete, read_run
from inoc_mech.settings.base import setting_class


def sweep_command(folder: Path) -> str:
    """The command that (re)makes a sweep folder: from its sweep.json, else the sweep defaults."""
    meta = folder / "sweep.json"
    if meta.exists():
        return json.loads(meta.read_text())["command"]
    return (f"python -m inoc_mech.studies.sweep --name {shlex.quote(folder.name)} "
            f"--runs-dir {shlex.quote(str(folder.parent))}")


def expected_runs(paths: list[Path]) -> tuple[list[Path], dict[Path, str]]:
    """Run folders the paths stand for, and the sweep command of each sweep folder among them."""
    runs, commands = [], {}
    for p in map(Path, paths):
        if (p / "sweep.json").exists():
            runs += [p / r for r in json.loads((p / "sweep.json").read_text())["runs"]]
            commands[p] = sweep_command(p)
        elif (p / "config.json").exists() and not (p / "organism.json").exists():
            runs.append(p)
        elif p.is_dir() and any((c / "config.json").exists() for c in p.iterdir()):
            runs += sorted(c for c in p.iterdir() if (c / "config.json").exists())
        else:
            runs.append(p)  # a sweep that was never started
            commands[p] = sweep_command(p)
    return runs, commands


def find_runs(paths: list, skip_missing: bool = False, train_missing: bool = False) -> list[Path]:
    """Complete run folders; missing ones are made (`train_missing`), skipped, or stop with the command."""
    paths = [Path(p) for p in paths]
    runs, commands = expected_runs(paths)
    missing = [r for r in runs if r not in commands and not is_complete(r)]
    unmade = [p for p in commands if not (p / "sweep.json").exists()]
    if (missing or unmade) and train_missing:
        for sweep_folder, cmd in commands.items():
            argv = shlex.split(cmd)
            if argv[:3] == ["python", "-m", "inoc_mech.sweep"]:  # sweep.json written before the package layout
                argv[2] = "inoc_mech.studies.sweep"
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


def read_runs(folders: list[Path], skip_bad: bool = False) -> list[dict]:
    """`read_run` of every folder; `skip_bad` skips unreadable ones with a note instead of stopping."""
    out = []
    for f in folders:
        try:
            out.append(read_run(f))
        except UserError as e:
            if not skip_bad:
                raise
            print(f"skipped: {e}", file=sys.stderr)
    if not out:
        raise UserError("no complete runs among the given folders")
    return out


def substrate_of(config: dict) -> str:
    return "organism" if config.get("organism_folder") else "text"


def setting_of(run: dict):
    """The setting class a run was trained with."""
    c = run["config"]
    return setting_class(c.get("setting", "spanish_caps"), substrate_of(c))


def condition(run: dict) -> str:
    """The run's condition: as recorded at train time, or (older runs) as its setting names its prompt."""
    c = run["config"]
    if "condition" in c:
        return c["condition"]
    return setting_of(run).condition(c["prompt"] if c["inoculate"] else None)


def pretrained_of(run: dict) -> str:
    """The folder of the model a run started from (its organism, or its `--model`)."""
    c = run["config"]
    return c.get("organism_folder") or str(c["model"])


def train_prompt(run: dict) -> str | None:
    c = run["config"]
    return c["prompt"] if c["inoculate"] else None


def group(runs: list[dict], key=condition) -> dict[str, list[dict]]:
    """Runs grouped by `key` (default: condition), groups in order of first appearance."""
    out: dict[str, list[dict]] = {}
    for r in runs:
        out.setdefault(key(r), []).append(r)
    return out


def one_setting(runs: list[dict]):
    """The setting class shared by all runs; one line if they differ."""
    kinds = {(r["config"].get("setting", "spanish_caps"), substrate_of(r["config"])) for r in runs}
    if len(kinds) > 1:
        raise UserError(f"the runs come from different settings ({', '.join(f'{s} on {b}' for s, b in sorted(kinds))}): "
                        "analyse each setting's runs separately")
    return setting_of(runs[0])


def needs(runs: list[dict], what: str, check, why: str) -> None:
    """One line naming the first run that lacks what an analysis needs (`check(run)` is False)."""
    for r in runs:
        if not check(r):
            raise UserError(f"run {r['folder']} has no {what}: {why}")


ACQUIRED_SHARE = 0.5  # a baseline acquired a trait if it closed at least this share of the pretrained model's gap to 100%


def pretrained_eval(runs: list[dict]) -> dict | None:
    """The sweep's evaluation of the model its runs start from (`<sweep>/pretrained/eval.json`, written by
    `studies.sweep`), or None when the runs' folders have none (or disagree)."""
    found = {str(Path(r["folder"]).parent / "pretrained" / "eval.json") for r in runs}
    evs = [json.loads(Path(f).read_text()) for f in sorted(found) if Path(f).exists()]
    return evs[0] if len(evs) == 1 and len(found) == 1 else None


def acquired(baseline_rate: float, pretrained_rate: float | None, share: float = ACQUIRED_SHARE) -> bool | None:
    """Whether finetuning without a prompt taught the trait: the baseline's no-prompt rate rose by at least
    `share` of the pretrained model's distance to 100% (None: the pretrained rate is unknown)."""
    if pretrained_rate is None or not math.isfinite(baseline_rate):
        return None
    return baseline_rate - pretrained_rate >= share * (1 - pretrained_rate)


def figures_folder(runs: list[dict], analysis: str) -> Path:
    """Where an analysis writes by default: figures/<analysis>/ for organism runs, and a folder per
    model for real-model runs, figures/<model folder name>/<analysis>/."""
    import re

    if not runs or substrate_of(runs[0]["config"]) == "organism":
        return Path("figures") / analysis
    name = re.sub(r"[^A-Za-z0-9_.-]", "-", Path(pretrained_of(runs[0])).name or "model")
    return Path("figures") / name / analysis
