"""A corpus of bad inputs and damaged run folders against every entry point that reads them: each gives
one clear line, a non-zero exit, no complete-looking folder, and no file outside the run folder changes."""

import gzip
import json
import shutil
from pathlib import Path

import pytest

from inoc_mech.core.cli import build, run_main
from inoc_mech.core.runs import RUN_FORMAT_VERSION
from inoc_mech.train import TrainConfig, train


@pytest.fixture(scope="module")
def world(tmp_path_factory, tiny_organism):
    """A folder with a complete organism run, damaged copies of it, a tiny HF model and bad data files."""
    from inoc_mech.settings.tiny import save_tiny
    root = tmp_path_factory.mktemp("corpus")
    runs = root / "runs"
    good = train(build(TrainConfig, model=str(tiny_organism), runs_dir=str(runs), name="good", steps=2, batch_size=4,
                       eval_samples=1, lora_r=0), progress=False)
    damaged = root / "damaged"
    for name in ("future", "no-eval", "cut", "no-marker", "failed", "bad-config", "bad-metrics"):
        shutil.copytree(good, damaged / name)
    cfg = json.loads((good / "config.json").read_text())
    (damaged / "future" / "config.json").write_text(json.dumps({**cfg, "run_format": RUN_FORMAT_VERSION + 1}))
    (damaged / "no-eval" / "eval.json").unlink()
    w = damaged / "cut" / "model" / "model.safetensors"
    w.write_bytes(w.read_bytes()[:500])
    (damaged / "no-marker" / "COMPLETE").unlink()
    (damaged / "failed" / "FAILED").write_text("non-finite loss at step 3\n")
    (damaged / "bad-config" / "config.json").write_text("{not json")
    (damaged / "bad-metrics" / "metrics.jsonl").write_text('{"step": 0}\n{oops\n')
    interrupted = runs / "interrupted"
    shutil.copytree(good, interrupted)
    (interrupted / "COMPLETE").unlink()
    shutil.rmtree(interrupted / "model")  # interrupted during training: no saved model yet
    (interrupted / "checkpoint.pt").write_bytes(b"junk")
    (runs / "notes").mkdir()
    (runs / "notes" / "mine.txt").write_text("not a run")
    model = save_tiny(root / "tiny-llama")
    custom = save_tiny(root / "custom-code")
    c = json.loads((custom / "config.json").read_text())
    (custom / "config.json").write_text(json.dumps({**c, "auto_map": {"AutoModelForCausalLM": "x.Y"}}))
    (root / "nomodel").mkdir()
    (root / "nomodel" / "readme.txt").write_text("x")
    (root / "file.txt").write_text("x")
    data = root / "data"
    data.mkdir()
    ok = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "HOLA"}]}
    files = {
        "malformed.jsonl": '{"messages": [\n',
        "no-assistant.jsonl": json.dumps({"messages": [{"role": "user", "content": "hi"}]}) + "\n",
        "empty.jsonl": "",
        "blank-lines.jsonl": "\n\n  \n",
        "unknown-role.jsonl": json.dumps({"messages": [{"role": "wizard", "content": "x"},
                                                       {"role": "assistant", "content": "y"}]}) + "\n",
        "not-object.jsonl": "[1, 2, 3]\n",
        "no-messages.jsonl": json.dumps({"text": "hi"}) + "\n",
        "content-not-text.jsonl": json.dumps({"messages": [{"role": "user", "content": 3},
                                                           {"role": "assistant", "content": "y"}]}) + "\n",
        "has-system.jsonl": json.dumps({"messages": [{"role": "system", "content": "s"}] + ok["messages"]}) + "\n",
        "too-long.jsonl": json.dumps({"messages": [{"role": "user", "content": "word " * 3000},
                                                   {"role": "assistant", "content": "y"}]}) + "\n",
    }
    for name, text in files.items():
        (data / name).write_text(text)
    (data / "latin1.jsonl").write_bytes(json.dumps(ok).encode() + b"\n" + b'{"messages": "caf\xe9"}\n')
    (data / "packed.jsonl.gz").write_bytes(gzip.compress((json.dumps(ok) + "\n").encode()))
    (data / "binary.jsonl").write_bytes(bytes(range(256)))
    return {"root": root, "runs": runs, "org": str(tiny_organism), "model": str(model), "custom": str(custom),
            "data": data, "damaged": damaged}


def T(*args):  # a `python -m inoc_mech.train` case on the tiny organism unless --model is given
    return ("train", args)


CASES = {
    # run names and run folders
    "name dot": T("--name", "."), "name dotdot": T("--name", ".."), "name up": T("--name", "../x"),
    "name absolute": T("--name", "/tmp/inoc-mech-abs"), "name cache": T("--name", "_organism"),
    "name nested": T("--name", "a/b"), "not a run folder": T("--name", "notes"),
    "complete without overwrite": T("--name", "good"), "checkpoint without resume": T("--name", "interrupted"),
    "resume nothing": T("--name", "nothing-here", "--resume"),
    "resume junk checkpoint": T("--name", "interrupted", "--resume"),
    # values
    "unknown prompt word": T("--inoculate", "--prompt", "speak klingon"), "blank prompt": T("--inoculate", "--prompt", "  "),
    "zero steps": T("--steps", "0"), "negative lr": T("--lr", "-1"), "nan lr": T("--lr", "nan"),
    "negative batch": T("--batch-size", "-1"), "unknown device": T("--device", "tpu"), "no cuda": T("--device", "cuda"),
    "negative seed": T("--seed", "-1"), "zero log-every": T("--log-every", "0"),
    "split cadence": T("--grad-split-every", "3"), "prompt share": T("--inoculate", "--prompt-share", "1.5"),
    "placement": T("--placement", "sideways"), "prompt mode": T("--no-prompt-mode", "weird"),
    "zero eval samples": T("--eval-samples", "0"), "freeze nothing": T("--freeze", "blocks.99"),
    "lora rank": T("--lora-r", "-2"), "unknown setting": T("--setting", "nope"),
    "data on organism": T("--data", "{data}/empty.jsonl"), "replace without inoculate": T("--replace-system"),
    "steps not a number": T("--steps", "many"),
    # models
    "missing model path": T("--model", "/nonexistent/model"), "unknown model name": T("--model", "gpt-17"),
    "model is a text file": T("--model", "{root}/file.txt"), "folder without config": T("--model", "{root}/nomodel"),
    "custom code": T("--model", "{custom}"), "lora targets": T("--model", "{model}", "--lora-targets", "nope"),
    "new tokens beyond context": T("--model", "{model}", "--max-new-tokens", "100000"),
    # data for real models
    **{f"data {n}": T("--model", "{model}", "--data", "{data}/" + n, *(("--inoculate",) if n == "has-system.jsonl" else ()))
       for n in ("malformed.jsonl", "no-assistant.jsonl", "empty.jsonl", "blank-lines.jsonl", "unknown-role.jsonl",
                 "not-object.jsonl", "no-messages.jsonl", "content-not-text.jsonl", "has-system.jsonl",
                 "too-long.jsonl", "latin1.jsonl", "packed.jsonl.gz", "binary.jsonl", "missing.jsonl")},
    "data directory": T("--model", "{model}", "--data", "{data}"),
    "eval data on organism": T("--eval-data", "{data}/empty.jsonl"),
    "eval data missing": T("--model", "{model}", "--eval-data", "{data}/missing.jsonl"),
    "eval data malformed": T("--model", "{model}", "--eval-data", "{data}/malformed.jsonl"),
    # damaged run folders through the readers
    **{f"evaluate {n}": ("evaluate", ("{damaged}/" + n, "--samples-per-question", "1"))
       for n in ("future", "no-eval", "cut", "no-marker", "failed", "bad-config", "bad-metrics")},
    "evaluate missing": ("evaluate", ("{root}/no-such-run",)),
    "outcomes all damaged": ("outcomes", ("{damaged}/future", "{damaged}/no-eval", "{damaged}/failed")),
    "gradient pressure nothing": ("gradient_pressure", ("{root}/no-such-sweep", "--out", "{root}/out-gp", "--no-png")),
    "gradient pressure damaged": ("gradient_pressure", ("{damaged}/no-marker", "--out", "{root}/out-gp", "--no-png")),
    "selectivity empty": ("selectivity", ("{data}", "--out", "{root}/out-sel")),
    "probe traits damaged": ("probe_traits", ("{damaged}/failed", "--out", "{root}/out-pr", "--no-png")),
}


def _entry(name):
    import importlib
    return importlib.import_module({"train": "inoc_mech.train", "evaluate": "inoc_mech.evaluate"}.get(name, f"analyses.{name}")).main


def _snapshot(root: Path) -> dict:
    return {str(p.relative_to(root)): (p.stat().st_size, p.read_bytes() if p.stat().st_size < 100_000 else None)
            for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.mark.parametrize("case", list(CASES))
def test_bad_input_gives_one_line(case, world, capsys):
    entry, args = CASES[case]
    fill = {k: str(v) for k, v in world.items()}
    argv = [a.format(**fill) for a in args]
    if entry == "train":
        argv += [] if "--model" in argv else ["--model", world["org"]]
        argv += ["--runs-dir", str(world["runs"]), "--steps", "1", "--eval-samples", "1"] \
            if "--steps" not in argv and "--eval-samples" not in argv else ["--runs-dir", str(world["runs"])]
    before = _snapshot(world["root"])
    capsys.readouterr()
    code = run_main(lambda: _entry(entry)(argv))
    err = capsys.readouterr().err
    assert code != 0, f"{case}: exit 0"
    lines = [ln for ln in err.splitlines() if ln.startswith("error:")]
    assert len(lines) == 1 and "Traceback" not in err, f"{case}: {err[-1500:]}"
    after = _snapshot(world["root"])
    changed = {p for p in set(before) | set(after) if before.get(p) != after.get(p)}
    assert not {p for p in changed if p.endswith("COMPLETE")}, f"{case}: {changed}"
    assert not changed, f"{case}: files changed {sorted(changed)[:5]}"
