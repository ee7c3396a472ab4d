"""Re-elicitation: the traits of finished runs under prompts related to the inoculation prompt.

    python -m inoc_mech.studies.reelicit runs/sweep --conditions baseline inoculated

Every run of a sweep folder (or the `--conditions` named) is read under its setting's re-elicitation
contexts (`Setting.reelicit_prompts`: the default inoculation prompt itself, paraphrases, a negation,
partial prompts, a prompt of the same form with other content, an irrelevant prompt; what the setting's
world or language can say) and its no-prompt context; and the model the runs start from (sweep.json), as
the reference. Runs trained with `--eval-reelicit` have them in eval.json already; the others are
evaluated now, through the setting's `evaluate` with --eval-reelicit on (the same scorers as eval.json; T=1
and greedy). Results go to `<sweep>/reelicit.json` (keyed by run; runs already there, from the same eval.json and
`--samples`, are skipped, so an interrupted evaluation resumes); `analyses/reelicit.py` tabulates and plots them.
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass, field
from pathlib import Path

from inoc_mech.core.cli import UserError

FILE = "reelicit.json"
PRETRAINED = "pretrained"  # reelicit.json entry of the model every run starts from


@dataclass
class ReelicitConfig:
    """Which runs to evaluate under the re-elicitation contexts."""
    sweep: str = field(default="runs/sweep", metadata={"help": "sweep folder (or a folder of run folders)", "positional": "?"})
    conditions: list = field(default_factory=list, metadata={"help": "conditions to evaluate (default: every run)"})
    samples: int = field(default=0, metadata={"help": "T=1 samples per question (0: each run's own --eval-samples)"})
    threads: int = field(default=1, metadata={"help": "torch CPU threads"})

    def __post_init__(self):
        if self.samples < 0:
            raise ValueError("--samples must be >= 0")


def reelicit(folder: Path, conditions: list[str] | None = None, samples: int = 0, progress: bool = True) -> dict:
    """{run name: {"condition", "seed", "contexts": eval.json-like contexts}} for the runs of `folder`,
    computing the missing ones (and saving after each run)."""
    import torch
    from tqdm import tqdm

    from inoc_mech.core.runs import write_json
    from inoc_mech.core.stats import json_ready
    from inoc_mech.settings.load import load
    from inoc_mech.studies.collect import condition, find_runs, read_runs, setting_of

    folder = Path(folder)
    runs = read_runs(find_runs([folder]))
    if conditions:
        have = {condition(r) for r in runs}
        missing = [c for c in conditions if c not in have]
        if missing:
            raise UserError(f"{folder}: no runs of condition(s) {missing}; it has {sorted(have)}")
        runs = [r for r in runs if condition(r) in conditions]
    path = folder / FILE
    done = json.loads(path.read_text()) if path.exists() else {}

    def stamp(r) -> dict:  # what an entry was computed from: a retrained run, other samples or contexts recompute it
        return {"samples": samples, "eval_mtime_ns": (Path(r["folder"]) / "eval.json").stat().st_mtime_ns,
                "contexts": contexts_of(setting_of(r))}

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    todo = [r for r in runs if done.get(Path(r["folder"]).name, {}).get("stamp") != stamp(r)]
    start = starting_model(folder, runs)
    ref_stamp = {"samples": samples, "model": str(start), "like": str(runs[0]["folder"]) if runs else None,
                 "contexts": contexts_of(setting_of(runs[0])) if runs else None}
    if start is None:
        done.pop(PRETRAINED, None)
    elif done.get(PRETRAINED, {}).get("stamp") != ref_stamp:
        todo = [None] + todo  # the model the runs start from, under the same contexts (the reference)
    for r in tqdm(todo, desc="re-elicitation", disable=not progress):
        if r is None:  # configured as the first run is (its setting and evaluation flags)
            loaded = load(start, device, like=runs[0]["config"])
            done[PRETRAINED] = {"stamp": ref_stamp, "condition": PRETRAINED, "seed": None,
                                **reelicit_contexts(loaded.setting, loaded.model, samples)}
        else:
            entry = None if samples else from_eval(r)  # the run's own evaluation has them
            if entry is None:
                loaded = load(r["folder"], device)
                entry = reelicit_contexts(loaded.setting, loaded.model, samples)
            done[Path(r["folder"]).name] = {"stamp": stamp(r), "condition": condition(r), "seed": r["config"]["seed"], **entry}
        write_json(path, json_ready(done))  # after each: an interruption loses at most one
    return {k: v for k, v in done.items() if k in {Path(r["folder"]).name for r in runs} | {PRETRAINED}}


def context_names(setting) -> list[str]:
    """The columns of a re-elicitation table: the no-prompt context, then the setting's re-elicitation prompts."""
    if not setting.reelicit_prompts:
        raise UserError(f"setting {setting.name!r} on {setting.substrate} has no re-elicitation prompts")
    return [setting.none_context] + [k for k in setting.reelicit_prompts if k != setting.none_context]


def contexts_of(setting) -> dict:
    """The re-elicitation contexts an entry holds (name -> prompt; the no-prompt one None)."""
    return {k: setting.reelicit_prompts.get(k) for k in context_names(setting)}


def from_eval(run: dict) -> dict | None:
    """A run's re-elicitation entry from its eval.json (trained with --eval-reelicit), None if it lacks them."""
    from inoc_mech.studies.collect import setting_of

    setting = setting_of(run)
    ev = run["eval"].get("contexts", {})
    if not all(k in ev and ev[k].get("prompt") == p for k, p in contexts_of(setting).items()):
        return None  # (trained without --eval-reelicit, or with other re-elicitation prompts)
    return {"substrate": setting.substrate, "setting": setting.name,
            "contexts": {k: ev[k] for k in context_names(setting)}}


def reelicit_contexts(setting, model, samples: int) -> dict:
    """Evaluate `model` with the setting's re-elicitation contexts on (T=1 `samples` per question, 0: the
    run's own); the entry of reelicit.json without its stamp."""
    import dataclasses

    names = context_names(setting)
    setting.cfg.setting = dataclasses.replace(setting.cfg.setting, eval_reelicit=True)
    out = setting.evaluate(model, samples=samples or None)
    return {"substrate": setting.substrate, "setting": setting.name, "contexts": {k: out["contexts"][k] for k in names}}


def starting_model(folder: Path, runs: list[dict]) -> Path | str | None:
    """The model a sweep's runs start from (sweep.json), None when unknown or when the runs started from
    different models."""
    meta = folder / "sweep.json"
    if not meta.exists() or not runs:
        return None
    d = json.loads(meta.read_text())
    start = d.get("organism_folder") or d.get("model_folder")
    used = {r["config"].get("organism_folder") or r["config"].get("model") for r in runs}
    return start if used == {start} else None


def main(argv=None):
    import torch

    from inoc_mech.core.cli import parse_config

    cfg = parse_config(ReelicitConfig, argv, prog="python -m inoc_mech.studies.reelicit",
                       description=__doc__.split("\n\n")[0])
    torch.set_num_threads(cfg.threads)
    out = reelicit(Path(cfg.sweep), cfg.conditions or None, cfg.samples)
    print(f"{len(out) - (PRETRAINED in out)} runs (and the starting model) evaluated under {len(next(iter(out.values()))['contexts']) if out else 0} contexts -> "
          f"{Path(cfg.sweep) / FILE}")


if __name__ == "__main__":
    from inoc_mech.core.cli import run_main
    sys.exit(run_main(main))
