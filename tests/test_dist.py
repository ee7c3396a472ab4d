"""Micro-batches, processes (torchrun, gloo) and the loop's schedule options give the run they promise."""

import json
import math
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from inoc_mech.core.cli import build
from inoc_mech.core.config import LoopConfig
from inoc_mech.core.dist import share, torchrun_command
from inoc_mech.core.runs import read_run
from inoc_mech.settings.tiny import save_tiny
from inoc_mech.train import TrainConfig, train

REPO = Path(__file__).resolve().parents[1]
# Runs that differ only in how the batch is cut (micro-batches, processes) must be the same run: in float64
# the only differences left are summation order, so the tolerance is tight (float32, where Adam amplifies
# rounding in near-zero gradient entries, reached ~3e-6 at step 0 and ~1.5e-5 after 4 steps)
TOL = 1e-10


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return save_tiny(tmp_path_factory.mktemp("tiny") / "llama", arch="llama")


@pytest.fixture(scope="module")
def tiny64(tmp_path_factory):
    """The tiny Llama in float64 (the loop, LoRA and the instruments keep a float64 model's dtype)."""
    from transformers import AutoModelForCausalLM
    folder = save_tiny(tmp_path_factory.mktemp("tiny64") / "llama", arch="llama")
    AutoModelForCausalLM.from_pretrained(folder).double().save_pretrained(folder)
    return folder


def args(model, runs, name, **kw):
    # padded rows, no shared prefix: a prefix shared by 4 rows, by 2 or by 1, or rows packed otherwise, round in the
    # model's float32 RMSNorm differently (test_forward_layouts_give_the_same_run measures that on its own)
    base = dict(model=str(model), runs_dir=str(runs), name=name, steps=4, batch_size=4, n_train=16, lora_r=4,
                eval_questions=2, eval_samples=1, max_new_tokens=4, log_every=1, grad_split_every=1,
                grad_split_all=True, overwrite=True, device="cpu", share_prefix=False, pack=False)
    base.update(kw)
    return base


def worst_difference(run_a: Path, run_b: Path) -> tuple[float, str]:
    """The largest relative difference over metrics (timing aside) and final weights, and where."""
    ra, rb = read_run(run_a)["metrics"], read_run(run_b)["metrics"]
    assert [r["step"] for r in ra] == [r["step"] for r in rb]
    worst = (0.0, "")
    for x, y in zip(ra, rb):
        assert set(x) == set(y), set(x) ^ set(y)
        # the parts of an exact split are compared on the scale of what they split (the interaction is a
        # remainder of float32 terms ~100x larger: its precision is theirs, not its own)
        whole = sum(abs(v) for k, v in x.items() if k.startswith("surprise/"))
        for k in x:
            if k != "tokens_per_s":
                d = abs(x[k] - y[k]) / max(abs(x[k]), abs(y[k]), whole if k.startswith("surprise/") else 0, 1e-6)
                worst = max(worst, (d, f"step {x['step']} {k}: {x[k]} vs {y[k]}"))
    wa, wb = load_file(run_a / "model/model.safetensors"), load_file(run_b / "model/model.safetensors")
    for k in wa:
        d = ((wa[k] - wb[k]).norm() / wa[k].norm().clamp(min=1e-12)).item()
        worst = max(worst, (d, f"weight {k}"))
    return worst


def test_share_partitions_the_batch():
    for n, w in ((4, 2), (5, 2), (7, 3), (3, 3)):
        parts = [share(n, r, w) for r in range(w)]
        assert [i for p in parts for i in p] == list(range(n))
        assert max(map(len, parts)) - min(map(len, parts)) <= 1
    with pytest.raises(ValueError, match="smaller than the 3 processes"):
        share(2, 0, 3)


def test_micro_batches_equal_one_batch(tmp_path, tiny64):
    """4 examples as one forward, as 4 micro-batches, and as 3 + 1 (a trailing partial one): the same run,
    instruments included (token-weighted: micro-batches of different token counts still add up)."""
    one = train(build(TrainConfig, **args(tiny64, tmp_path, "one")), progress=False)
    for micro in (1, 3):
        run = train(build(TrainConfig, **args(tiny64, tmp_path, f"m{micro}", micro_batch_size=micro)), progress=False)
        worst, where = worst_difference(one, run)
        assert worst <= TOL, where
    rows = read_run(one)["metrics"]
    assert "grad_share/trait/language" in rows[0] and "surprise/language" in rows[0]


def test_schedule_and_clipping(tmp_path, tiny):
    lp = LoopConfig(steps=10, lr=1e-3, warmup_steps=2, schedule="cosine")
    lrs = [lp.lr_at(s) for s in range(10)]
    assert lrs[0] == pytest.approx(5e-4) and lrs[1] == pytest.approx(1e-3) and lrs[-1] == pytest.approx(0, abs=1e-12)
    assert all(a >= b for a, b in zip(lrs[1:], lrs[2:]))  # decays after warmup
    assert LoopConfig(steps=5, lr=1e-3).lr_at(4) == 1e-3  # constant stays the default
    with pytest.raises(ValueError, match="--schedule"):
        LoopConfig(schedule="linear")
    plain = train(build(TrainConfig, **args(tiny, tmp_path, "plain", steps=2)), progress=False)
    clip = train(build(TrainConfig, **args(tiny, tmp_path, "clip", steps=2, max_grad_norm=1e-3)), progress=False)
    a, b = read_run(plain)["metrics"], read_run(clip)["metrics"]
    assert a[0]["grad_norm/total"] == pytest.approx(b[0]["grad_norm/total"], rel=1e-6)  # measured before clipping
    assert a[0]["grad_norm/total"] > 1e-3
    assert b[0]["step_update_norm/total"] < a[0]["step_update_norm/total"]  # ... and the update is clipped
    # Adam's eps reaches the optimizer: at eps 1, far above the gradient's entries, a step is about lr * g (tiny)
    # instead of about lr * sign(g)
    eps = train(build(TrainConfig, **args(tiny, tmp_path, "eps", steps=2, adam_eps=1.0)), progress=False)
    assert read_run(eps)["metrics"][0]["step_update_norm/total"] < 0.1 * a[0]["step_update_norm/total"]
    assert read_run(eps)["config"]["adam_eps"] == 1.0
    config = json.loads((plain / "config.json").read_text())
    del config["adam_eps"]  # a run written before the field existed reads with the value it had then
    (plain / "config.json").write_text(json.dumps(config))
    assert read_run(plain)["config"]["adam_eps"] == 1e-8
    with pytest.raises(ValueError, match="--adam-eps"):
        LoopConfig(adam_eps=0.0)
    sched = train(build(TrainConfig, **args(tiny, tmp_path, "sched", steps=3, warmup_steps=2)), progress=False)
    assert [r["lr"] for r in read_run(sched)["metrics"]] == pytest.approx([5e-5, 1e-4, 1e-4])


def test_gradient_checkpointing_gives_the_same_run(tmp_path, tiny64):
    a = train(build(TrainConfig, **args(tiny64, tmp_path, "a", steps=2)), progress=False)
    b = train(build(TrainConfig, **args(tiny64, tmp_path, "b", steps=2, grad_checkpointing=True)), progress=False)
    worst, where = worst_difference(a, b)
    assert worst <= TOL, where


def torchrun(n: int, kw: dict, **popen):
    cmd = torchrun_command(n, kw)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **popen)


def test_two_processes_equal_one(tmp_path, tiny64):
    """torchrun, 2 processes (gloo), the same global batch: metrics.jsonl and final weights as 1 process,
    the instruments (trait gradient splits of every trait, surprise parts, elicitation) included;
    rank 0 alone writes the run folder."""
    one = train(build(TrainConfig, **args(tiny64, tmp_path, "one")), progress=False)
    p = torchrun(2, args(tiny64, tmp_path, "two"))
    out, err = p.communicate(timeout=600)
    assert p.returncode == 0, err[-3000:]
    two = tmp_path / "two"
    worst, where = worst_difference(one, two)
    assert worst <= TOL, where
    assert json.loads((two / "config.json").read_text())["processes"] == 2
    assert (two / "COMPLETE").exists() and (two / "eval.json").exists()
    assert out.count("run: ") == 1  # one summary, from rank 0


# The tiny Llama normalises in float32 (HF's RMSNorm casts): a shared prefix's gradient, summed over the rows before
# the norm's backward, or a token computed in another layout is rounded there: differences below float32 precision
SHARED_TOL = 1.2e-7  # float32 epsilon: one rounding


def test_forward_layouts_give_the_same_run(tmp_path, tiny64, monkeypatch):
    """A prefix every row of a forward starts with (template header + system prompt) computed once, and the rows
    packed without padding (the defaults): the run of padded rows, every instrument included; and under torchrun
    with 2 processes (DDP) as with 1."""
    import inoc_mech.core.forward as fwd

    calls = []
    real = fwd.prefix_cache
    monkeypatch.setattr(fwd, "prefix_cache", lambda m, ids, rows: calls.append((ids.shape[1], rows)) or real(m, ids, rows))
    whole = train(build(TrainConfig, **args(tiny64, tmp_path, "whole")), progress=False)
    assert not calls
    shared = train(build(TrainConfig, **args(tiny64, tmp_path, "shared", share_prefix=True)), progress=False)
    assert len(calls) == 4 and all(n > 5 and rows == 4 for n, rows in calls)  # every step, the whole batch
    calls.clear()
    monkeypatch.setattr(fwd, "choose_bins", lambda lengths, *a: [list(range(len(lengths)))])  # pack the tiny rows
    packs, real_packed = [], fwd._packed
    monkeypatch.setattr(fwd, "_packed", lambda *a: packs.append(a[-2]) or real_packed(*a))  # its shared prefix
    packed = train(build(TrainConfig, **args(tiny64, tmp_path, "packed", share_prefix=True, pack=True)), progress=False)
    assert not calls and len(packs) == 4 and all(n > 5 for n in packs)  # one sequence per step, led by the prefix
    for run in (shared, packed):
        worst, where = worst_difference(whole, run)
        assert worst <= SHARED_TOL, where
    monkeypatch.undo()  # a torchrun process chooses by cost: the 2 rows of each process padded (or packed)
    p = torchrun(2, args(tiny64, tmp_path, "two", share_prefix=True, pack=True))
    out, err = p.communicate(timeout=600)
    assert p.returncode == 0, err[-3000:]
    worst, where = worst_difference(packed, tmp_path / "two")
    assert worst <= SHARED_TOL, where


def test_fsdp_equals_ddp_and_one_process(tmp_path, tiny64):
    """--fsdp (FSDP2, parameters sharded over 2 processes), full finetuning, 2 micro-batches per process:
    the same metrics (norms over shards, trait splits through the deferred counterfactual gradients) and
    final weights as DDP and as 1 process."""
    kw = dict(lora_r=0, micro_batch_size=1)
    one = train(build(TrainConfig, **args(tiny64, tmp_path, "one", **kw)), progress=False)
    procs = {name: torchrun(2, args(tiny64, tmp_path, name, **kw, **extra))
             for name, extra in (("ddp", {}), ("fsdp", {"fsdp": True}))}
    for name, p in procs.items():
        out, err = p.communicate(timeout=600)
        assert p.returncode == 0, err[-3000:]
    for ref in (one, tmp_path / "ddp"):
        worst, where = worst_difference(ref, tmp_path / "fsdp")
        assert worst <= TOL, where
    assert "grad_norm/trait/language/blocks.0.attn" in read_run(tmp_path / "fsdp")["metrics"][0]


def test_fsdp_needs_processes_and_full_finetuning(tmp_path, tiny):
    from inoc_mech.core.cli import UserError
    with pytest.raises(UserError, match="--fsdp shards the model over torchrun"):
        train(build(TrainConfig, **args(tiny, tmp_path, "x", lora_r=0, fsdp=True)), progress=False)
    assert not (tmp_path / "x").exists()
    p = torchrun(2, args(tiny, tmp_path, "y", lora_r=4, fsdp=True))
    out, err = p.communicate(timeout=300)
    # each process exits 2 with the one line; torchrun itself then reports the failed child and exits 1
    assert p.returncode != 0 and "(exitcode: 2)" in err, err[-2000:]
    assert "--fsdp is for full finetuning: give --lora-r 0" in err, err[-2000:]
    assert not (tmp_path / "y").exists()


@pytest.mark.parametrize("fsdp", [False, True], ids=["ddp", "fsdp"])
def test_sigterm_and_resume_under_torchrun(tmp_path, tiny64, fsdp):
    """SIGTERM to torchrun mid-run: every process stops after the same step, rank 0 checkpoints (sharded:
    the gathered full state), exit non-zero; `--resume` under torchrun finishes the run as an uninterrupted
    one does."""
    kw = args(tiny64, tmp_path, "int", steps=300, hooks=False, checkpoint_every=0, grad_split_every=0,
              **({"fsdp": True, "lora_r": 0} if fsdp else {}))
    ref_kw = {**kw, "name": "ref"}
    ref_kw.pop("fsdp", None)
    ref = train(build(TrainConfig, **ref_kw), progress=False)
    p = torchrun(2, kw, start_new_session=True)
    metrics = tmp_path / "int" / "metrics.jsonl"
    deadline = time.time() + 300
    while time.time() < deadline and (not metrics.exists() or metrics.read_text().count("\n") < 3):
        time.sleep(0.05)
    assert p.poll() is None, "the run ended before it could be interrupted"
    p.send_signal(signal.SIGTERM)
    out, err = p.communicate(timeout=300)
    assert p.returncode != 0
    assert (tmp_path / "int" / "checkpoint.pt").exists() and not (tmp_path / "int" / "COMPLETE").exists()
    assert "SIGTERM after step" in err, err[-3000:]
    q = torchrun(2, {"name": "int", "runs_dir": str(tmp_path), "resume": True, "device": "cpu"})
    out, err = q.communicate(timeout=600)
    assert q.returncode == 0, err[-3000:]
    worst, where = worst_difference(ref, tmp_path / "int")
    assert worst <= TOL, where
