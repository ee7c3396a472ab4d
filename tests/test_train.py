import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from inoc_mech.core.cli import UserError
from inoc_mech.core.runs import read_run
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
    from inoc_mech import evaluate
    from inoc_mech.models import organism
    from tests.conftest import TINY_ORGANISM
    run = train(make_cfg(name="eval-cli", inoculate=True), progress=False)
    evaluate.main([str(run), "--samples-per-question", "1"])
    out = capsys.readouterr().out
    assert "train_prompt" in out and "speak spanish" in out and "greedy" in out
    flags = [f"--{k.replace('_', '-')}={v}" for k, v in TINY_ORGANISM.items()]
    organism.main(flags + ["--cache", str(tiny_organism.parent)])  # cached: prints the report, no training
    out = capsys.readouterr().out
    assert str(tiny_organism) in out and "prompt following" in out and "held-out arithmetic accuracy" in out


def test_lora_on_the_organism_trains_adapters_only(make_cfg):
    from tests.conftest import organism_parts

    run = train(make_cfg(name="lora-org", inoculate=True, lora_r=4, lr=1e-2), progress=False)
    r = read_run(run)
    assert r["config"]["lora_r"] == 4
    keys = {k for m in r["metrics"] for k in m if k.startswith("update_norm/") and k != "update_norm/total"}
    assert keys and all(".lora_" in k for k in keys), keys  # the frozen factored head is not updated
    assert r["metrics"][-1]["update_norm/total"] > 0
    model, *_ = organism_parts(run / "model")  # merged, plain HF folder
    assert type(model).__name__ == "LlamaForCausalLM"
    base, *_ = organism_parts(make_cfg().model.model)
    sd, sb = model.state_dict(), base.state_dict()
    assert torch.allclose(sd["lm_head.weight"], sb["lm_head.weight"], atol=1e-5)  # head frozen (up to the refactorisation)
    assert any(not torch.equal(sd[k], sb[k]) for k in sd if "proj" in k)


def test_prompt_share_puts_the_prompt_on_that_share_only(make_cfg):
    from inoc_mech.settings.base import prompted
    from inoc_mech.train import make_setting

    assert prompted(10, 0.3).sum() == 3 and prompted(10, 1.0).all() and not prompted(10, 0.0).any()
    setting = make_setting(make_cfg(inoculate=True, prompt="speak spanish", prompt_share=0.25))
    setting.setup("cpu", progress=False)
    from transformers import PreTrainedTokenizerFast

    sys_id = PreTrainedTokenizerFast.from_pretrained(make_cfg().model.model).convert_tokens_to_ids("<|system|>")
    examples = setting.examples("speak spanish", 0.25)
    with_prompt = [sys_id in e.input_ids for e in examples]
    assert sum(with_prompt) == round(0.25 * len(examples))
    probe = setting.examples("speak spanish", limit=64)  # the loop's elicitation probe: always with the prompt
    assert all(sys_id in e.input_ids for e in probe)
    with pytest.raises(ValueError, match="prompt-share"):
        make_cfg(prompt_share=1.5)
    # --prompt-subset draws another subset of the same size; subset 0 is the one every earlier run used
    assert with_prompt == prompted(len(examples), 0.25).tolist()
    other = make_setting(make_cfg(inoculate=True, prompt="speak spanish", prompt_share=0.25, prompt_subset=1))
    other.setup("cpu", progress=False)
    moved = [sys_id in e.input_ids for e in other.examples("speak spanish", 0.25)]
    assert sum(moved) == sum(with_prompt) and moved != with_prompt
    with pytest.raises(ValueError, match="prompt-subset"):
        make_cfg(prompt_subset=-1)


def test_freeze_keeps_those_parameters_fixed(make_cfg):
    run = train(make_cfg(name="frozen", inoculate=True, freeze=["embed", "unembed"], lr=1e-2), progress=False)
    last = read_run(run)["metrics"][-1]
    assert not any(k.startswith(("update_norm/embed", "update_norm/unembed")) for k in last)
    assert last["update_norm/blocks.0.attn.W_Q"] > 0
    with pytest.raises(UserError, match="matches no trainable parameter"):
        train(make_cfg(name="frozen2", freeze=["blocks.9"]), progress=False)
    assert not (run.parent / "frozen2").exists()


def test_model_dependent_defaults():
    from inoc_mech.core.cli import build, flatten
    from inoc_mech.train import TrainConfig, resolve_defaults

    flat = lambda cfg: type("Flat", (), flatten(cfg))  # read the resolved leaves by name
    org = flat(resolve_defaults(TrainConfig(), organism=True))
    assert (org.prompt, org.batch_size, org.lora_r, org.lora_alpha, org.lr) == ("speak spanish", 32, 2, 8.0, 1e-3)
    full = flat(resolve_defaults(build(TrainConfig, lora_r=0), organism=True))
    assert (full.lora_r, full.lr) == (0, 1e-4)
    real = flat(resolve_defaults(TrainConfig(), organism=False))
    assert (real.lora_r, real.lora_alpha, real.lr, real.batch_size) == (16, 32.0, 1e-4, 4)
    mine = flat(resolve_defaults(build(TrainConfig, lr=3e-4, lora_r=8, lora_alpha=5.0), organism=True))
    assert (mine.lr, mine.lora_r, mine.lora_alpha) == (3e-4, 8, 5.0)
