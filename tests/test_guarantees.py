"""Issue [2/6 reliability], one test per item: names and locks never lose or delete what is not ours,
no code runs from a data file, and wrong results are not reported as right."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from inoc_mech.core import checkpoint
from inoc_mech.core.cli import UserError, build
from inoc_mech.core.runs import RUN_FORMAT_VERSION, read_run
from inoc_mech.train import TrainConfig, train

REPO = Path(__file__).resolve().parents[1]


def cli(*args, cwd=REPO):
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.run([sys.executable, "-m", "inoc_mech.train", *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=300)


def tiny_args(tiny_organism, runs, name, *extra, steps=2):
    return ["--model", str(tiny_organism), "--runs-dir", str(runs), "--name", name, "--steps", str(steps),
            "--batch-size", "4", "--eval-samples", "1", "--lora-r", "0", *extra]


def one_line(p, *needles):
    assert p.returncode == 2, (p.returncode, p.stderr[-2000:])
    err = p.stderr.strip().splitlines()
    assert err and err[-1].startswith("error:") and "Traceback" not in p.stderr, p.stderr[-2000:]
    for n in needles:
        assert n in err[-1], err[-1]
    return err[-1]


def snapshot(folder: Path) -> dict:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


# ---- 1. names ------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", [".", "..", "../x", "/tmp/x", "a/b", "_organism", "", " x"])
def test_a_run_name_is_one_folder_name(make_cfg, name):
    if name == "":
        return  # empty means the default name
    with pytest.raises(UserError, match="is not a run name"):
        make_cfg(name=name)


def test_a_folder_the_toolkit_did_not_create_is_never_removed(make_cfg, tmp_path):
    mine = tmp_path / "runs" / "notes"
    mine.mkdir(parents=True)
    (mine / "thesis.txt").write_text("my work")
    before = snapshot(tmp_path)
    for overwrite in (False, True):
        with pytest.raises(UserError, match="is not a run folder written by inoc_mech: nothing was removed"):
            train(make_cfg(runs_dir=str(tmp_path / "runs"), name="notes", overwrite=overwrite), progress=False)
    assert snapshot(tmp_path) == before


def test_cli_names_outside_the_runs_dir_are_refused(tiny_organism, tmp_path):
    (tmp_path / "runs").mkdir()
    (tmp_path / "keep.txt").write_text("x")
    for name in (".", "..", "../x", str(tmp_path)):
        one_line(cli(*tiny_args(tiny_organism, tmp_path / "runs", name)), "is not a run name")
    assert (tmp_path / "keep.txt").read_text() == "x" and sorted(p.name for p in (tmp_path / "runs").iterdir()) == []


# ---- 2. one process per run ------------------------------------------------------------------------
def test_two_runs_with_the_same_name_at_once(tiny_organism, tmp_path):
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    args = tiny_args(tiny_organism, tmp_path, "race", steps=60)
    first = subprocess.Popen([sys.executable, "-m", "inoc_mech.train", *args], cwd=REPO, env=env,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    lock = tmp_path / ".race.lock"
    t = time.time()
    while not (lock.exists() and lock.read_text().strip()) and time.time() - t < 60:
        time.sleep(0.05)
    second = cli(*args)
    one_line(second, "is being written by another process", f"pid {first.pid}")
    assert first.wait(timeout=300) == 0, first.stderr.read()[-2000:]
    assert read_run(tmp_path / "race")["config"]["steps"] == 60


# ---- 3. --resume follows the folder ----------------------------------------------------------------
def test_resume_continues_the_folder_it_is_given(make_cfg, tmp_path, monkeypatch):
    original = tmp_path / "runs"
    _interrupted_run(make_cfg, monkeypatch, original, "orig", 3)
    copy = tmp_path / "elsewhere"
    shutil.copytree(original, copy)
    (copy / "orig").rename(copy / "renamed")
    before = snapshot(original)
    run = train(make_cfg(runs_dir=str(copy), name="renamed", resume=True), progress=False)
    assert run == copy / "renamed" and read_run(run)["metrics"][-1]["step"] == 5
    assert snapshot(original) == before  # the original was not touched


def test_resume_of_a_run_saved_before_a_field_keeps_the_value_it_had(make_cfg, tmp_path):
    from inoc_mech.core.cli import flatten
    from inoc_mech.train import resume_config

    run = tmp_path / "old"
    run.mkdir()
    saved = {**flatten(make_cfg(runs_dir=str(tmp_path), name="old", inoculate=True, prompt_share=0.5)),
             "run_format": RUN_FORMAT_VERSION}
    del saved["prompt_subset"]  # written before --prompt-subset existed: it trained on subset 0
    (run / "config.json").write_text(json.dumps(saved))
    cfg = resume_config(make_cfg(runs_dir=str(tmp_path), name="old", resume=True, prompt_subset=2))
    assert cfg.setting.prompt_subset == 0 and cfg.setting.prompt_share == 0.5


def _sigterm_at_step(monkeypatch, step):
    """Deliver SIGTERM to this process when the loop starts step `step` (through the batch stream)."""
    from inoc_mech.core import data
    real, calls = data.BatchStream.next_examples, {"n": 0}

    def next_(self):
        calls["n"] += 1
        if calls["n"] == step:
            os.kill(os.getpid(), signal.SIGTERM)
        return real(self)
    monkeypatch.setattr(data.BatchStream, "next_examples", next_)


def _interrupted_run(make_cfg, monkeypatch, runs_dir, name, step, **kw) -> Path:
    """A 6-step run (checkpoint every 3) stopped by a real SIGTERM when step `step` starts."""
    _sigterm_at_step(monkeypatch, step)
    with pytest.raises(UserError, match="SIGTERM"):
        train(make_cfg(runs_dir=str(runs_dir), name=name, steps=6, checkpoint_every=3, inoculate=True, **kw),
              progress=False)
    monkeypatch.undo()
    return Path(runs_dir) / name


# ---- 4. signals while saving or evaluating -----------------------------------------------------------
@pytest.mark.parametrize("phase", ["save", "evaluate"])
def test_sigterm_while_saving_or_evaluating_keeps_the_training(make_cfg, tmp_path, monkeypatch, phase):
    from inoc_mech.settings import spanish_caps_organism as org
    cfg = make_cfg(runs_dir=str(tmp_path), name=f"late-{phase}", steps=3, checkpoint_every=0, inoculate=True)
    ref = train(make_cfg(runs_dir=str(tmp_path), name=f"ref-{phase}", steps=3, inoculate=True), progress=False)
    real = getattr(org.SpanishCapsOrganism, phase)

    def late(self, *a, **k):
        os.kill(os.getpid(), signal.SIGTERM)  # arrives while the model is being saved / evaluated
        return real(self, *a, **k)
    monkeypatch.setattr(org.SpanishCapsOrganism, phase, late)
    with pytest.raises(UserError, match="SIGTERM while (saving|evaluating): the model is saved") as e:
        train(cfg, progress=False)
    assert e.value.exit_code == 143 and "--resume" in str(e.value)
    monkeypatch.undo()
    run = tmp_path / f"late-{phase}"
    assert (run / "model" / "COMPLETE").exists() and not (run / "COMPLETE").exists()
    train(make_cfg(runs_dir=str(tmp_path), name=f"late-{phase}", resume=True), progress=False)
    assert read_run(run)["eval"] == read_run(ref)["eval"]  # nothing trained was lost, nothing re-trained


# ---- 5. a real full disk -------------------------------------------------------------------------------
@pytest.fixture
def small_disk(tmp_path):
    mnt = tmp_path / "small"
    mnt.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=600k", "tmpfs", str(mnt)], capture_output=True).returncode:
        pytest.skip("cannot mount a tmpfs here (needs root)")
    yield mnt
    subprocess.run(["umount", "-l", str(mnt)])


def test_real_full_disk_is_one_line_and_leaves_no_temporary_file(tiny_organism, small_disk):
    p = cli(*tiny_args(tiny_organism, small_disk, "full", "--checkpoint-every", "1", steps=4))
    one_line(p, "disk full while")
    run = small_disk / "full"
    assert not list(run.glob("*.tmp")) and not (run / "COMPLETE").exists() and not (small_disk / "full" / "model.tmp").exists()


# ---- 6. a damaged metrics.jsonl before --resume -------------------------------------------------------
def test_emptied_metrics_is_refused_on_resume(make_cfg, tmp_path, monkeypatch):
    _interrupted_run(make_cfg, monkeypatch, tmp_path, "emptied", 5)
    (tmp_path / "emptied" / "metrics.jsonl").write_text("")
    with pytest.raises(UserError, match="shorter than at the checkpoint"):
        train(make_cfg(runs_dir=str(tmp_path), name="emptied", resume=True), progress=False)
    assert not (tmp_path / "emptied" / "COMPLETE").exists()
    assert b"\0" not in (tmp_path / "emptied" / "metrics.jsonl").read_bytes()


# ---- 7. no code from a checkpoint --------------------------------------------------------------------
class Payload:
    def __reduce__(self):
        return (os.system, ("touch PWNED",))


def test_a_crafted_checkpoint_runs_nothing(make_cfg, tmp_path, monkeypatch):
    _interrupted_run(make_cfg, monkeypatch, tmp_path, "crafted", 4)
    ckpt = tmp_path / "crafted" / checkpoint.NAME
    state = torch.load(ckpt, weights_only=True)  # ours loads without unpickling code
    state["evil"] = Payload()
    torch.save(state, ckpt)
    monkeypatch.chdir(tmp_path)
    with pytest.raises(UserError, match="unreadable"):
        train(make_cfg(runs_dir=str(tmp_path), name="crafted", resume=True), progress=False)
    assert not (tmp_path / "PWNED").exists()


# ---- 8. no code from a model folder -------------------------------------------------------------------
def test_a_model_folder_with_custom_code_is_refused(tmp_path):
    from inoc_mech.settings.load import load
    from inoc_mech.settings.tiny import save_tiny
    folder = save_tiny(tmp_path / "custom")
    cfg = json.loads((folder / "config.json").read_text())
    cfg["auto_map"] = {"AutoModelForCausalLM": "evil.EvilModel"}
    (folder / "config.json").write_text(json.dumps(cfg))
    (folder / "evil.py").write_text("open('PWNED', 'w').write('x')\n")
    with pytest.raises(UserError, match="auto_map.*--trust-remote-code"):
        load(folder)
    p = cli("--model", str(folder), "--runs-dir", str(tmp_path / "runs"), "--steps", "1", cwd=tmp_path)
    one_line(p, "--trust-remote-code")
    assert not (tmp_path / "PWNED").exists() and not (tmp_path / "runs" / "baseline-s0").exists()


# ---- 9. the first run after an in-process pretraining is the same run ----------------------------------
def test_first_run_after_pretraining_equals_the_second(tmp_path):
    from tests.conftest import TINY_ORGANISM
    flags = {f"organism_{k}": v for k, v in TINY_ORGANISM.items() if k in ("d_model", "n_layers", "steps")}
    common = dict(model="organism", runs_dir=str(tmp_path), steps=3, batch_size=8, eval_samples=1, **flags)
    first = train(build(TrainConfig, name="first", **common), progress=False)  # pretrains the organism in-process
    second = train(build(TrainConfig, name="second", **common), progress=False)  # organism cached
    strip = lambda rows: [{k: v for k, v in r.items() if k != "tokens_per_s"} for r in rows]
    a, b = read_run(first), read_run(second)
    assert strip(a["metrics"]) == strip(b["metrics"]) and a["eval"] == b["eval"]


# ---- 10. evaluation settings that cannot give a result, and strict JSON -------------------------------
def test_evaluation_settings_and_strict_json(make_cfg, tmp_path):
    with pytest.raises(ValueError, match="--eval-samples must be >= 1"):
        make_cfg(eval_samples=0)
    from inoc_mech.settings.tiny import save_tiny
    folder = save_tiny(tmp_path / "tiny")
    with pytest.raises(UserError, match="--max-new-tokens 100000 does not fit the model's context"):
        train(build(TrainConfig, model=str(folder), runs_dir=str(tmp_path), max_new_tokens=100000, steps=1),
              progress=False)
    assert not (tmp_path / "baseline-s0").exists()
    run = train(build(TrainConfig, model=str(folder), runs_dir=str(tmp_path), name="nan", steps=1, n_train=4,
                      batch_size=2, eval_questions=2, eval_samples=1, max_new_tokens=2), progress=False)
    text = (run / "eval.json").read_text()
    json.loads(text, parse_constant=lambda c: pytest.fail(f"eval.json holds {c}"))  # NaN is written as null


# ---- 11. flags that would be silently ignored -----------------------------------------------------------
def test_flags_the_run_would_ignore_are_refused(make_cfg, tmp_path):
    with pytest.raises(UserError, match="--data .* is for real models"):
        train(make_cfg(data=str(tmp_path / "missing.jsonl")), progress=False)
    with pytest.raises(ValueError, match="--replace-system only applies with --inoculate"):
        make_cfg(replace_system=True)
    with pytest.raises(ValueError, match="--prompt is blank"):
        make_cfg(inoculate=True, prompt="   ")


# ---- 12. damaged or incompatible run folders ---------------------------------------------------------
def test_damaged_run_folders_are_refused_in_one_line(make_cfg, tmp_path, capsys):
    from analyses import outcomes
    from inoc_mech import evaluate
    good = train(make_cfg(runs_dir=str(tmp_path), name="good"), progress=False)
    future, no_eval, cut = (tmp_path / n for n in ("future", "no-eval", "cut"))
    for d in (future, no_eval, cut):
        shutil.copytree(good, d)
    cfg = json.loads((future / "config.json").read_text())
    (future / "config.json").write_text(json.dumps({**cfg, "run_format": RUN_FORMAT_VERSION + 1}))
    (no_eval / "eval.json").unlink()
    weights = cut / "model" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    with pytest.raises(UserError, match="run format"):
        read_run(future)
    with pytest.raises(UserError, match="has no eval.json"):
        read_run(no_eval)
    with pytest.raises(UserError, match="holds no loadable causal LM"):
        evaluate.main([str(cut), "--samples-per-question", "1"])
    outcomes.main([str(good), str(future), str(no_eval)])  # the others are skipped with a note
    captured = capsys.readouterr()
    assert "| 1 |" in captured.out and captured.err.count("skipped:") == 2


# ---- 13. messages that name what to fix ---------------------------------------------------------------
def test_bad_data_and_values_name_what_to_fix(tmp_path):
    import gzip
    from inoc_mech.settings.textdata import read_jsonl
    from inoc_mech.settings.tiny import save_tiny
    bad = tmp_path / "latin1.jsonl"
    ok = b'{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]}\n'
    bad.write_bytes(ok + b'{"messages": [{"role": "user", "content": "caf\xe9"}]}\n')
    with pytest.raises(UserError, match="latin1.jsonl line 2 is not UTF-8"):
        read_jsonl(bad)
    packed = tmp_path / "data.jsonl.gz"
    packed.write_bytes(gzip.compress(b'{"messages": []}\n'))
    with pytest.raises(UserError, match="is a compressed file"):
        read_jsonl(packed)
    with pytest.raises(UserError, match="is a directory"):
        read_jsonl(tmp_path)
    folder = save_tiny(tmp_path / "tiny")
    p = cli("--model", str(folder), "--runs-dir", str(tmp_path / "runs"), "--seed", "-1")
    one_line(p, "--seed must be >= 0")
    assert not (tmp_path / "runs" / "baseline-s-1").exists()
    huge = tmp_path / "huge.jsonl"
    huge.write_text(json.dumps({"messages": [{"role": "user", "content": "x" * 5_000_000},
                                             {"role": "assistant", "content": "y"}]}) + "\n")
    t = time.time()
    p = cli("--model", str(folder), "--runs-dir", str(tmp_path / "runs"), "--data", str(huge), "--steps", "1")
    one_line(p, "characters, more than the model's context")
    assert time.time() - t < 60  # checked before tokenising


def test_sigterm_from_outside_during_evaluation_in_a_real_process(tiny_organism, tmp_path):
    """The same in a separate process, the signal sent by another process while the run evaluates."""
    script = tmp_path / "run.py"
    script.write_text(f'''
import sys, time
from inoc_mech.core.cli import run_main
from inoc_mech.settings import spanish_caps_organism as org
real = org.SpanishCapsOrganism.evaluate
def slow(self, *a, **k):
    print("EVALUATING", flush=True)
    time.sleep(3)
    return real(self, *a, **k)
org.SpanishCapsOrganism.evaluate = slow
from inoc_mech.train import main
sys.exit(run_main(lambda: main({tiny_args(tiny_organism, tmp_path, "outside", "--checkpoint-every", "0", steps=3)!r})))
''')
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    p = subprocess.Popen([sys.executable, str(script)], cwd=REPO, env=env, stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, text=True)
    assert p.stdout.readline().strip() == "EVALUATING"
    p.send_signal(signal.SIGTERM)
    assert p.wait(timeout=120) == 143
    err = p.stderr.read().strip().splitlines()[-1]
    assert err.startswith("error: SIGTERM while evaluating: the model is saved") and "--resume" in err
    run = tmp_path / "outside"
    assert (run / "model" / "COMPLETE").exists() and not (run / "COMPLETE").exists()
    q = cli("--name", "outside", "--runs-dir", str(tmp_path), "--resume")
    assert q.returncode == 0, q.stderr[-2000:]
    assert read_run(run)["eval"]["contexts"]["none"]["t1"]["n_answers"] > 0


# ---- found in review ----------------------------------------------------------------------------------
def test_sigterm_right_after_the_last_step_keeps_the_training(make_cfg, tmp_path, monkeypatch):
    from inoc_mech.mechanism import hooks
    ref = train(make_cfg(runs_dir=str(tmp_path), name="ref", steps=3, inoculate=True), progress=False)
    real = hooks.GradientPressure.__exit__

    def exit_(self, *exc):
        os.kill(os.getpid(), signal.SIGTERM)  # after the loop's own checks, before the save
        return real(self, *exc)
    monkeypatch.setattr(hooks.GradientPressure, "__exit__", exit_)
    with pytest.raises(UserError, match="after the last step: checkpoint saved"):
        train(make_cfg(runs_dir=str(tmp_path), name="late", steps=3, checkpoint_every=0, inoculate=True), progress=False)
    monkeypatch.undo()
    run = train(make_cfg(runs_dir=str(tmp_path), name="late", resume=True), progress=False)
    assert read_run(run)["eval"] == read_run(ref)["eval"]


def test_unfinished_runs_are_not_restarted_by_accident(make_cfg, tmp_path):
    run = train(make_cfg(runs_dir=str(tmp_path), name="r"), progress=False)
    (run / "COMPLETE").unlink()  # as if stopped while evaluating: the saved model awaits evaluation
    with pytest.raises(UserError, match="saved model that was not evaluated yet: pass --resume"):
        train(make_cfg(runs_dir=str(tmp_path), name="r", overwrite=False), progress=False)
    (run / "FAILED").write_text("non-finite loss at step 2\n")
    with pytest.raises(UserError, match="failed .*--overwrite"):
        train(make_cfg(runs_dir=str(tmp_path), name="r", resume=True), progress=False)
    (tmp_path / "elsewhere").mkdir()
    (tmp_path / "link").symlink_to(tmp_path / "elsewhere")
    with pytest.raises(UserError, match="symbolic link: nothing was removed"):
        train(make_cfg(runs_dir=str(tmp_path), name="link"), progress=False)
    half = tmp_path / "half"  # killed between creating the folder and writing its config
    half.mkdir()
    (half / "config.json.tmp").write_text("{")
    assert read_run(train(make_cfg(runs_dir=str(tmp_path), name="half"), progress=False))["config"]["name"] == "half"


def test_review_details():
    import numpy as np
    from inoc_mech.core.cli import to_args
    from inoc_mech.core.runs import format_table
    from inoc_mech.studies.sweep import SweepConfig, overrides
    assert to_args(TrainConfig, {"lr": np.float64(1e-4)}) == ["--lr", "0.0001"]
    ev = {"contexts": {"none": {"prompt": None, "t1": {"spanish_rate": None, "caps_rate": 0.5, "accuracy": None,
                                                        "n_answers": 2},
                                "greedy": {"spanish_rate": 0.0, "caps_rate": 1.0, "accuracy": 1.0, "n_answers": 1}}}}
    assert "       -    50.0%" in format_table(ev)
    full, lora = SweepConfig(), SweepConfig(lora_r=8)
    assert "lora_alpha" not in overrides(full, "x", None, 0, "org")  # as the sweep always did
    assert overrides(lora, "x", None, 0, "org")["lora_alpha"] == 32.0


def test_old_lora_sweep_runs_still_match(tmp_path):
    from inoc_mech.studies.sweep import SweepConfig, mismatch
    run = tmp_path / "inoculated-s0"
    run.mkdir()
    saved = {"inoculate": True, "prompt": "speak spanish", "seed": 0, "steps": 300, "lr": 1e-3, "batch_size": 32,
             "log_every": 10, "grad_split_every": 20, "grad_split_all": False, "eval_samples": 3, "threads": 1,
             "organism_folder": "org", "model": "org", "lora_r": 8, "lora_alpha": 32.0, "freeze": [],
             "prompt_share": 1.0, "run_format": RUN_FORMAT_VERSION}
    (run / "config.json").write_text(json.dumps(saved))
    assert mismatch(SweepConfig(lora_r=8, lr=1e-3), run, "speak spanish", 0, Path("org")) is None
    assert "lora_alpha" in mismatch(SweepConfig(lora_r=8, lr=1e-3, lora_alpha=16.0), run, "speak spanish", 0, Path("org"))
    (run / "config.json").write_text("{damaged")
    with pytest.raises(UserError, match="config.json is unreadable"):
        mismatch(SweepConfig(), run, "speak spanish", 0, Path("org"))
