import os
import subprocess
import sys
from pathlib import Path

import pytest

from inoc_mech.cli import UserError
from inoc_mech.runs import read_run
from inoc_mech.train import train

REPO = Path(__file__).resolve().parents[1]

# Golden losses of the first 3 steps on the tiny organism (torch 2.13.0 CPU, 1 thread).
GOLDEN = {"baseline": [3.856909990310669, 3.748844861984253, 3.7003159523010254],
          "inoculated": [3.5495810508728027, 3.476353406906128, 3.431758165359497]}


@pytest.mark.parametrize("inoculate", [False, True])
def test_golden_losses(make_cfg, inoculate):
    run = train(make_cfg(inoculate=inoculate, name=f"golden-{inoculate}"), progress=False)
    losses = [r["loss"] for r in read_run(run)["metrics"]]
    golden = GOLDEN["inoculated" if inoculate else "baseline"]
    assert losses == pytest.approx(golden, rel=1e-4)


def test_inoculated_loss_is_lower_at_step0(make_cfg):
    base = read_run(train(make_cfg(name="b0"), progress=False))["metrics"][0]
    ino = read_run(train(make_cfg(name="i0", inoculate=True), progress=False))["metrics"][0]
    assert ino["surprise/language"] < base["surprise/language"]
    assert base["elicit/language/gain"] == pytest.approx(0, abs=1e-6)  # same context: no gain
    assert ino["elicit/language/gain"] > 0


def test_run_folder_contents_and_refusal(make_cfg):
    cfg = make_cfg(name="folder", inoculate=True)
    run = train(cfg, progress=False)
    for f in ("config.json", "metrics.jsonl", "eval.json", "COMPLETE", "model/model.safetensors",
              "model/tokenizer.json", "model/world.json", "model/organism.json"):
        assert (run / f).exists(), f
    r = read_run(run)
    assert r["config"]["inoculate"] is True and r["config"]["git_commit"] is not None
    assert [m["step"] for m in r["metrics"]] == [0, 1, 2]
    for m in r["metrics"]:
        assert {"loss", "lr", "tokens_per_s"} <= set(m)
    ev = r["eval"]
    assert set(ev["contexts"]) == {"none", "train_prompt", "irrelevant"}
    assert ev["contexts"]["train_prompt"]["prompt"] == "speak spanish"
    assert ev["contexts"]["none"]["greedy"]["n_answers"] == ev["n_questions"]
    cfg.overwrite = False
    with pytest.raises(UserError, match="already complete"):
        train(cfg, progress=False)


def test_unknown_prompt_word_is_a_clear_error(make_cfg, runs_dir):
    with pytest.raises(ValueError, match="outside the organism's vocabulary"):
        train(make_cfg(name="bad", inoculate=True, prompt="speak klingon"), progress=False)
    assert not (runs_dir / "bad").exists()


def cli(*args, cwd=REPO):
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.run([sys.executable, "-m", "inoc_mech.train", *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=300)


def test_cli_end_to_end(tiny_organism, tmp_path):
    p = cli("--inoculate", "--steps", "4", "--batch-size", "8", "--log-every", "2", "--eval-samples", "1",
            "--model", str(tiny_organism), "--runs-dir", str(tmp_path), "--name", "cli")
    assert p.returncode == 0, p.stderr
    assert "spanish" in p.stdout and "train_prompt" in p.stdout  # the evaluation table
    assert read_run(tmp_path / "cli")["config"]["steps"] == 4


def test_cli_bad_input_is_one_line(tiny_organism, tmp_path):
    p = cli("--inoculate", "--prompt", "speak klingon", "--model", str(tiny_organism), "--runs-dir", str(tmp_path))
    assert p.returncode == 2
    assert p.stderr.strip().startswith("error:") and len(p.stderr.strip().splitlines()) == 1
    assert "Traceback" not in p.stderr
    p = cli("--model", str(tmp_path / "nope"), "--runs-dir", str(tmp_path))
    assert p.returncode == 2 and "does not exist" in p.stderr and "Traceback" not in p.stderr


def test_evaluate_and_organism_clis(make_cfg, tiny_organism, capsys):
    from inoc_mech import evaluate, organism
    from tests.conftest import TINY_ORGANISM
    run = train(make_cfg(name="eval-cli", inoculate=True), progress=False)
    evaluate.main([str(run), "--samples-per-question", "1"])
    out = capsys.readouterr().out
    assert "train_prompt" in out and "speak spanish" in out and "greedy" in out
    flags = [f"--{k.replace('_', '-')}={v}" for k, v in TINY_ORGANISM.items()]
    organism.main(flags + ["--cache", str(tiny_organism.parent)])  # cached: prints the report, no training
    out = capsys.readouterr().out
    assert str(tiny_organism) in out and "prompt following" in out and "held-out arithmetic accuracy" in out
