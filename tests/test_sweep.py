import json
import os
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from inoc_mech.core.cli import parse_config
from inoc_mech.core.runs import read_run
from inoc_mech.studies.sweep import CORE_CONDITIONS, SweepConfig, command_line, conditions, mismatch, plan, slug
from inoc_mech.models.world import World

REPO = Path(__file__).resolve().parents[1]


def test_default_conditions_span_the_prompt_set_and_fit_the_vocabulary():
    conds = conditions(SweepConfig())
    assert list(conds)[:5] == list(CORE_CONDITIONS)
    prompts = [p for p in conds.values() if p]
    assert len(prompts) >= 12 and len(set(prompts)) == len(prompts)
    world = World()
    for p in prompts:
        world.check_prompt(p)  # raises on a word outside the vocabulary
    controls = [world.prompt_controls(p)[0] for p in prompts]
    assert "spanish" in controls and "english" in controls and None in controls  # strong, opposite, none
    assert len(set(conds)) == len(conds) and all("/" not in n and " " not in n for n in conds)


def test_plan_is_seed_major_and_dedupes_core_prompts():
    cfg = SweepConfig(seeds=["3", "1"], prompts=["speak spanish", "be  kind"])  # CLI gives strings
    assert cfg.seeds == [3, 1] and cfg.prompts == ["speak spanish", "be kind"]
    runs = plan(cfg)
    assert [s for _, _, s in runs] == [3] * 6 + [1] * 6
    assert [c for c, _, _ in runs[:6]] == list(CORE_CONDITIONS) + [slug("be kind")]


@pytest.mark.parametrize("bad, match", [({"seeds": ["x"]}, "integers"), ({"seeds": []}, "at least one"),
                                        ({"seeds": [1, 1]}, "duplicates"), ({"name": "a/b"}, "--name"),
                                        ({"steps": -1}, "--steps"),
                                        ({"grad_split_every": 25, "log_every": 10}, "multiple of --log-every")])
def test_bad_config_is_a_clear_error(bad, match):
    with pytest.raises(ValueError, match=match):
        SweepConfig(**bad)


def test_command_line_round_trips():
    cfg = SweepConfig(name="s2", seeds=[0, 1, 2], prompts=["be kind", "you like dogs"], steps=50)
    cmd = command_line(cfg)
    assert cmd.startswith("python -m inoc_mech.studies.sweep ") and "--jobs" not in cmd
    again = parse_config(SweepConfig, shlex.split(cmd)[3:])
    assert again == cfg
    assert command_line(SweepConfig()) == "python -m inoc_mech.studies.sweep"


def test_mismatched_complete_run_is_detected(tmp_path):
    cfg = SweepConfig(steps=300)
    run = tmp_path / "inoculated-s0"
    run.mkdir()
    saved = {"inoculate": True, "prompt": "speak spanish", "seed": 0, "steps": 300, "lr": 1e-4, "batch_size": 32,
             "log_every": 10, "grad_split_every": 20, "grad_split_all": False, "eval_samples": 3,
             "organism_folder": "org", "lora_r": 0}
    (run / "config.json").write_text(json.dumps(saved))
    assert mismatch(cfg, run, "speak spanish", 0, Path("org")) is None
    assert "steps" in mismatch(SweepConfig(steps=20), run, "speak spanish", 0, Path("org"))
    assert "prompt" in mismatch(cfg, run, "spanish", 0, Path("org"))
    assert "lora_r" in mismatch(SweepConfig(steps=300, lora_r=8), run, "speak spanish", 0, Path("org"))
    (run / "config.json").write_text(json.dumps({k: v for k, v in saved.items() if k != "grad_split_all"}))
    assert "grad_split_all" in mismatch(cfg, run, "speak spanish", 0, Path("org"))  # a run from older code


def test_dry_run_lists_what_is_left(tmp_path, capsys):
    from inoc_mech.studies.sweep import sweep

    cfg = SweepConfig(name="dry", runs_dir=str(tmp_path), seeds=[0], prompts=[], dry_run=True)
    (tmp_path / "dry" / "baseline-s0").mkdir(parents=True)
    (tmp_path / "dry" / "baseline-s0" / "COMPLETE").write_text("{}")
    sweep(cfg)
    out = capsys.readouterr().out
    assert "5 runs, 1 complete, 4 to do" in out and "baseline-s0" not in out and "converse-s0" in out


@pytest.mark.slow
def test_tiny_sweep_end_to_end(tiny_organism, tmp_path):
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    args = [sys.executable, "-m", "inoc_mech.studies.sweep", "--name", "e2e", "--runs-dir", str(tmp_path), "--seeds", "0",
            "--prompts", "--model", str(tiny_organism), "--steps", "2", "--batch-size", "8", "--eval-samples", "1",
            "--log-every", "1", "--grad-split-every", "1"]
    p = subprocess.run(args, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stderr[-2000:]
    meta = json.loads((tmp_path / "e2e" / "sweep.json").read_text())
    assert meta["runs"] == [f"{c}-s0" for c in CORE_CONDITIONS]
    for r in meta["runs"]:
        run = read_run(tmp_path / "e2e" / r)
        assert run["config"]["organism_folder"] == str(tiny_organism)
    p = subprocess.run(args, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)  # all complete: skips
    assert p.returncode == 0 and "0 trained" in p.stderr


@pytest.mark.slow
def test_sigterm_stops_the_sweep_and_its_run_which_resumes(tiny_organism, tmp_path):
    import signal
    import time

    env = {**os.environ, "PYTHONPATH": str(REPO)}
    args = [sys.executable, "-m", "inoc_mech.studies.sweep", "--name", "term", "--runs-dir", str(tmp_path), "--seeds", "0",
            "--prompts", "--model", str(tiny_organism), "--steps", "20000", "--jobs", "1"]
    p = subprocess.Popen(args, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    metrics = tmp_path / "term" / "baseline-s0" / "metrics.jsonl"
    deadline = time.time() + 120
    while not (metrics.exists() and metrics.stat().st_size > 0) and time.time() < deadline:
        time.sleep(0.5)
    p.send_signal(signal.SIGTERM)
    _, err = p.communicate(timeout=120)
    assert p.returncode == 143 and "rerun the same command" in err
    left = subprocess.run(["pgrep", "-f", f"runs-dir {tmp_path}/term"], capture_output=True, text=True).stdout
    assert not left.strip()  # the training process was stopped too, not orphaned
    assert (tmp_path / "term" / "baseline-s0" / "checkpoint.pt").exists()
    dry = subprocess.run(args + ["--dry-run"], cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert "resume  baseline-s0" in dry.stdout and "train   inoculated-s0" in dry.stdout


def test_acquired_is_relative_to_the_pretrained_rate():
    from inoc_mech.studies.collect import acquired
    assert acquired(0.97, 0.0) and acquired(0.61, 0.2)  # closed 97% / 51% of the gap
    assert not acquired(0.107, 0.0) and not acquired(0.5, 0.5)  # the 10.7% CAPS baseline; no change
    assert acquired(0.5, None) is None


def test_real_model_sweep_evaluates_the_pretrained_model_and_flags_a_baseline_that_learned_nothing(tmp_path):
    import math

    from analyses.gradient_pressure import analyse
    from inoc_mech.settings.tiny import save_tiny
    from inoc_mech.studies.sweep import sweep

    model = save_tiny(tmp_path / "m", arch="llama")
    cfg = SweepConfig(model=str(model), runs_dir=str(tmp_path), name="s", steps=2, seeds=[0], prompts=[],
                      eval_questions=2, eval_samples=1, max_new_tokens=4, elicit_examples=2)
    assert cfg.lora_r == 16 and cfg.batch_size == 4 and "converse" in conditions(cfg)
    folder = sweep(cfg, progress=False)
    pre = json.loads((folder / "pretrained" / "eval.json").read_text())
    base = json.loads((folder / "baseline-s0" / "eval.json").read_text())
    assert pre.keys() >= {"contexts"} and pre["contexts"].keys() == base["contexts"].keys()
    s = analyse([folder], tmp_path / "gp", png=False)
    for t in ("language", "case"):
        if s["baseline_acquired"][t] is False:  # 2 steps of a random tiny model teach nothing
            assert all(math.isnan(r["suppression"][t]["mean"]) for r in s["conditions"].values())
    assert s["baseline_acquired"] == {t: s["baseline_rate"][t] - s["pretrained_rate"][t]
                                      >= 0.5 * (1 - s["pretrained_rate"][t]) for t in ("language", "case")}


def test_setting_conditions_data_and_organism_design_reach_the_runs():
    """A sweep of another setting runs that setting's conditions, passes --data only when given, and
    pretrains the organism that setting's world needs (its design enters the cache key)."""
    from inoc_mech.studies.sweep import organism_config, overrides
    from inoc_mech.settings.backdoor_organism import CONDITIONS as BACKDOOR

    cfg = SweepConfig(setting="backdoor", prompts=[])
    assert list(conditions(cfg)) == list(BACKDOOR)
    assert organism_config(cfg).triggers and not organism_config(SweepConfig()).triggers
    assert organism_config(cfg).key() != organism_config(SweepConfig()).key()
    assert "data" not in overrides(cfg, "baseline", None, 0, "m")
    sub = SweepConfig(setting="subliminal", prompts=[], data="t.jsonl")
    assert overrides(sub, "baseline", None, 0, "m")["data"] == "t.jsonl" and organism_config(sub).prefs
    only = SweepConfig(setting="subliminal", model="smollm2", prompts=[], conditions=["baseline"])
    assert list(conditions(only)) == ["baseline"] and "--conditions baseline" in command_line(only)
    with pytest.raises(ValueError, match="--conditions nope: setting 'subliminal' has baseline, inoculated"):
        SweepConfig(setting="subliminal", model="smollm2", conditions=["nope"])
