"""Kill/resume, signals, determinism, non-finite losses and bad input."""

import errno
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from inoc_mech.core import checkpoint
from inoc_mech.core.cli import UserError
from inoc_mech.core.runs import RUN_FORMAT_VERSION, read_run
from inoc_mech.train import train

REPO = Path(__file__).resolve().parents[1]
TIMING = {"tokens_per_s"}


def args_for(tiny_organism, runs, name, steps=200, extra=()):
    return ["--model", str(tiny_organism), "--runs-dir", str(runs), "--name", name, "--steps", str(steps),
            "--batch-size", "8", "--log-every", "1", "--grad-split-every", "5", "--checkpoint-every", "3",
            "--eval-samples", "1", "--inoculate", *extra]


def start(args):
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.Popen([sys.executable, "-m", "inoc_mech.train", *args], cwd=REPO, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def wait_rows(path: Path, n: int, proc, timeout=120):
    t = time.time()
    while time.time() - t < timeout:
        if path.exists() and path.read_text().count("\n") >= n:
            return
        assert proc.poll() is None, proc.stderr.read()
        time.sleep(0.002)
    raise TimeoutError


def same_run(a: Path, b: Path):
    wa, wb = load_file(a / "model/model.safetensors"), load_file(b / "model/model.safetensors")
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)
    ma, mb = read_run(a)["metrics"], read_run(b)["metrics"]
    assert [r["step"] for r in ma] == [r["step"] for r in mb] == list(range(len(ma)))
    strip = lambda rows: [{k: v for k, v in r.items() if k not in TIMING} for r in rows]
    assert strip(ma) == strip(mb)


@pytest.fixture(scope="module")
def reference(tiny_organism, tmp_path_factory):
    runs = tmp_path_factory.mktemp("ref")
    p = start(args_for(tiny_organism, runs, "ref"))
    assert p.wait(timeout=300) == 0, p.stderr.read()
    return runs / "ref"


def test_sigkill_then_resume_is_bitwise_identical(tiny_organism, tmp_path, reference):
    k = int(np.random.default_rng().integers(5, 40))  # a random step
    p = start(args_for(tiny_organism, tmp_path, "killed"))
    wait_rows(tmp_path / "killed/metrics.jsonl", k, p)
    p.send_signal(signal.SIGKILL)
    p.wait()
    run = tmp_path / "killed"
    assert not (run / "COMPLETE").exists()
    assert checkpoint.load(run)["step"] >= 3  # killed mid-run, after a checkpoint
    with pytest.raises(UserError, match="incomplete"):
        read_run(run)
    r = start(args_for(tiny_organism, tmp_path, "killed", extra=["--resume"]))
    assert r.wait(timeout=300) == 0, r.stderr.read()
    same_run(run, reference)
    assert not (run / checkpoint.NAME).exists()


def test_sigterm_checkpoints_and_says_how_to_resume(tiny_organism, tmp_path, reference):
    p = start(args_for(tiny_organism, tmp_path, "term"))
    wait_rows(tmp_path / "term/metrics.jsonl", 10, p)
    p.send_signal(signal.SIGTERM)
    assert p.wait(timeout=60) == 128 + signal.SIGTERM
    err = p.stderr.read().strip().splitlines()
    assert err[-1].startswith("error: SIGTERM after step") and "--resume --name term" in err[-1]
    run = tmp_path / "term"
    assert (run / checkpoint.NAME).exists() and not (run / "COMPLETE").exists()
    # a plain rerun refuses to clobber the checkpoint
    q = start(args_for(tiny_organism, tmp_path, "term"))
    assert q.wait(timeout=60) == 2 and "--resume" in q.stderr.read()
    r = start(args_for(tiny_organism, tmp_path, "term", extra=["--resume"]))
    assert r.wait(timeout=300) == 0, r.stderr.read()
    same_run(run, reference)


def test_same_seed_same_run(make_cfg):
    a = train(make_cfg(name="det-a", steps=6, inoculate=True), progress=False)
    b = train(make_cfg(name="det-b", steps=6, inoculate=True), progress=False)
    same_run(a, b)


def test_absurd_learning_rate_stops_on_non_finite(make_cfg):
    cfg = make_cfg(name="nan", steps=50, lr=1e35, checkpoint_every=2)
    with pytest.raises(UserError, match=r"non-finite .* at step \d+"):
        train(cfg, progress=False)
    run = Path(cfg.runs_dir) / "nan"
    assert (run / "FAILED").exists() and not (run / "COMPLETE").exists()
    with pytest.raises(UserError, match="failed"):
        read_run(run)


def test_full_disk_while_checkpointing(make_cfg, monkeypatch):
    cfg = make_cfg(name="full", steps=8, checkpoint_every=2)
    real_save = torch.save
    calls = {"n": 0}

    def fake_save(obj, f, *a, **k):
        calls["n"] += 1
        if calls["n"] >= 2:  # the second checkpoint hits a full disk
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_save(obj, f, *a, **k)

    monkeypatch.setattr(torch, "save", fake_save)
    with pytest.raises(UserError, match="disk full while writing the checkpoint for step 4"):
        train(cfg, progress=False)
    run = Path(cfg.runs_dir) / "full"
    assert not (run / "COMPLETE").exists() and not (run / "checkpoint.pt.tmp").exists()
    assert torch.load(run / "checkpoint.pt", weights_only=False)["step"] == 2  # previous one intact
    monkeypatch.setattr(torch, "save", real_save)
    train(make_cfg(name="full", resume=True), progress=False)
    assert read_run(run)["config"]["steps"] == 8


def test_unwritable_output_folder(make_cfg, tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(UserError, match="cannot create run folder"):
        train(make_cfg(runs_dir=str(blocker)), progress=False)


def test_analysis_refuses_bad_run_folders(make_cfg):
    run = train(make_cfg(name="fmt", steps=2), progress=False)
    marker = json.loads((run / "COMPLETE").read_text())
    (run / "COMPLETE").write_text(json.dumps({**marker, "version": RUN_FORMAT_VERSION + 99}))
    with pytest.raises(UserError, match="run format"):
        read_run(run)
    (run / "COMPLETE").unlink()
    with pytest.raises(UserError, match="incomplete"):
        read_run(run)
    p = subprocess.run([sys.executable, "analyses/outcomes.py", str(run)], cwd=REPO, capture_output=True, text=True)
    assert p.returncode == 2 and "skipped" in p.stderr and "no complete runs" in p.stderr


def test_resume_without_run_is_clear(make_cfg):
    with pytest.raises(UserError, match="no run to resume"):
        train(make_cfg(name="never-ran", resume=True), progress=False)
