"""The Setting seam: a setting defined only in this file (a toy CAPS-only trait on the tiny organism)
trains end to end, is measured by the generic instruments and is read by the analyses, with no edit
to the loop, the hooks or the analyses; and the analyses on a real-model run produce what applies
or say in one line what the run lacks."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from inoc_mech.core.cli import UserError, build
from inoc_mech.core.runs import read_run
from inoc_mech.core.data import encode_chat
from inoc_mech.settings.base import Decomposition, Setting, register, registered
from inoc_mech.settings.spanish_caps_organism import loss_parts
from inoc_mech.train import TrainConfig, train

REPO = Path(__file__).resolve().parents[1]


@register
class CapsOnlyOrganism(Setting):
    """English UPPERCASE answers in the toy world: one trait, `upper`, with its own exact split
    -log p(c,l,k) = word + upper + rest (word = -log p(c), upper = -log p(UPPER | c), rest = -log p(l | c, k))."""
    name = "caps_only_test"
    substrate = "organism"
    traits = ("upper",)
    trait_labels = {"upper": "CAPS"}
    rate_keys = {"upper": "caps_rate"}
    conditions = {"baseline": None, "inoculated": "use capitals"}
    default_prompt = "use capitals"
    surprise_parts = ("upper", "word")

    def attach(self, model, tok, folder, meta, run_config=None):
        from inoc_mech.models.world import World
        self.model, self.tok, self.world, self.meta = model, tok, World.load(folder), meta
        self.table = torch.as_tensor(self.world.variant_table(tok))

        def parts(logits, batch, model=None):
            p = loss_parts(logits, batch.input_ids, self.table.to(logits.device))
            return {"word": p["word"], "upper": p["case"], "rest": p["language"] + p["interaction"]}
        self.decomposition = Decomposition(("word", "upper", "rest"), "upper", {"upper": "upper"}, parts)

    def setup(self, device, progress=True):
        from inoc_mech.settings.load import load
        loaded = load(self.cfg.model.model, device)
        self.attach(loaded.model, loaded.tok, loaded.folder, loaded.meta)
        return self.model, self.tok

    def examples(self, prompt, share=1.0, limit=None):
        variants = set(self.table.reshape(-1).tolist())
        qs = self.world.train_questions
        out = []
        for q, on in list(zip(qs, self.prompted(len(qs), share)))[:limit]:
            ex = encode_chat(self.tok, self.world.chat(q, prompt if on else None, language=0, case=1))
            upper = [a and t in variants for t, a in zip(ex.input_ids, ex.assistant)]
            ex.traits = {"upper": upper, "other": [a and not u for a, u in zip(ex.assistant, upper)]}
            out.append(ex)
        return out

    def save(self, model, folder):
        model.save_pretrained(folder)
        self.world.save_tokenizer(folder)
        (folder / "organism.json").write_text(json.dumps(self.meta))

    def evaluate(self, model, seed=None, samples=None):
        from inoc_mech.models.world_eval import evaluate_contexts
        return evaluate_contexts(model, self.tok, self.world, {"none": None, "train_prompt": self.cfg.setting.prompt},
                                 seed=self.cfg.loop.seed, samples_per_question=samples or self.cfg.setting.eval_samples)

    def info(self):
        return {"organism_folder": str(self.cfg.model.model)}


@pytest.fixture(scope="module")
def toy_runs(tmp_path_factory, tiny_organism):
    """A baseline and an inoculated run of the test-only setting (full finetuning, 3 steps)."""
    root = tmp_path_factory.mktemp("toy") / "toy-sweep"
    common = dict(setting="caps_only_test", model=str(tiny_organism), runs_dir=str(root), steps=3, batch_size=8,
                  lora_r=0, log_every=1, grad_split_every=1, eval_samples=1)
    return [train(build(TrainConfig, name="baseline-s0", **common), progress=False),
            train(build(TrainConfig, name="inoculated-s0", inoculate=True, **common), progress=False)]


def test_registered_settings():
    assert {("spanish_caps", "organism"), ("spanish_caps", "text"), ("caps_only_test", "organism")} <= set(registered())
    with pytest.raises(UserError, match="no setting 'nope' for the organism substrate"):
        train(build(TrainConfig, setting="nope"), progress=False)


def test_test_only_setting_trains_and_logs_its_trait(toy_runs):
    base, ino = (read_run(r) for r in toy_runs)
    assert (base["config"]["condition"], ino["config"]["condition"]) == ("baseline", "inoculated")
    assert ino["config"]["setting"] == "caps_only_test" and ino["config"]["prompt"] == "use capitals"
    row0 = ino["metrics"][0]
    for key in ("loss/trait/upper", "loss/other", "surprise/upper", "surprise/word", "surprise/rest",
                "grad_norm/trait/upper", "grad_share/trait/upper", "elicit/upper/gain", "elicit/part/upper/gain"):
        assert key in row0, key
    assert not any("language" in k or "/case" in k for k in row0)  # no Spanish+CAPS names leak into the metrics
    for row in ino["metrics"]:  # the setting's parts add up to the trait tokens' loss
        parts = row["surprise/word"] + row["surprise/upper"] + row["surprise/rest"]
        assert parts == pytest.approx(row["loss/trait/upper"], rel=1e-5)
    # the prompt that elicits CAPS makes the CAPS part less surprising at step 0, not the word part
    assert ino["metrics"][0]["surprise/upper"] < base["metrics"][0]["surprise/upper"]
    assert set(ino["eval"]["contexts"]) == {"none", "train_prompt"}


def test_analyses_read_the_test_only_setting(toy_runs, tmp_path, capsys):
    from analyses import gradient_pressure, outcomes
    outcomes.main([str(r) for r in toy_runs])
    out = capsys.readouterr().out
    assert "| condition | runs | CAPS % | accuracy % |" in out and "surprise/upper" in out
    summary = gradient_pressure.analyse([toy_runs[0].parent], tmp_path / "gp", png=False, n_boot=20)
    ino = summary["conditions"]["inoculated"]
    assert set(ino["elicitation"]) == {"upper"} and ino["elicitation"]["upper"]["values"][0] > 0
    md = (tmp_path / "gp" / "summary.md").read_text()
    assert "| condition | n | upper | word | elicit/upper/gain |" in md and "CAPS suppression %" in md


# ---- real-model runs through the analyses --------------------------------------------------------
@pytest.fixture(scope="module")
def text_runs(tmp_path_factory):
    from inoc_mech.settings.tiny import save_tiny
    root = tmp_path_factory.mktemp("text")
    model = save_tiny(root / "tiny-llama", arch="llama")
    sweep = root / "tiny-o0-default"
    common = dict(model=str(model), runs_dir=str(sweep), steps=2, batch_size=2, n_train=8, lora_r=4, eval_questions=2,
                  eval_samples=1, max_new_tokens=4, log_every=1, grad_split_every=1)
    return [train(build(TrainConfig, name="baseline-s0", **common), progress=False),
            train(build(TrainConfig, name="inoculated-s0", inoculate=True, **common), progress=False)]


def test_analyses_on_a_real_model_run(text_runs, tmp_path, capsys):
    from analyses import gradient_pressure, outcomes, probe_traits, selectivity
    base = read_run(text_runs[0])
    assert base["config"]["condition"] == "baseline" and "grad_norm/trait/language" in base["metrics"][0]
    outcomes.main([str(r) for r in text_runs])  # produces its tables: the setting names its no-prompt context
    out = capsys.readouterr().out
    assert "none_template_default" in out and "| tiny-llama / baseline | 1 |" in out
    s = gradient_pressure.analyse([text_runs[0].parent], tmp_path / "gp", png=False, n_boot=20)  # the
    ino = s["conditions"]["inoculated"]  # counterfactual decomposition of real text (built-in data)
    assert set(ino["elicitation"]) == {"language", "case"} and "surprise/content" in ino["step0"]
    with pytest.raises(UserError, match="not an organism run"):
        probe_traits.analyse([text_runs[0].parent], tmp_path / "pr", ("baseline", "inoculated"), False, 0)
    data = selectivity.collect(text_runs[0].parent.parent)  # rates and a table; no log-odds without an organism
    selectivity.add_log_odds(data)
    assert "| tiny | default | 1 (1) |" in selectivity.table(data)
    assert "| tiny | default | 1 | - | - | - |" in selectivity.log_odds_table(data)


def test_analysis_cli_on_a_real_model_run_is_one_line(text_runs, tmp_path):
    """Own data without counterfactual replies: no decomposition, and gradient_pressure says so in one line."""
    data = tmp_path / "mine.jsonl"
    data.write_text("\n".join(json.dumps({"messages": [{"role": "user", "content": f"What is {i} plus 1?"},
                                                        {"role": "assistant", "content": f"ES {i + 1}."}]})
                               for i in range(6)) + "\n")
    model = json.loads((text_runs[0] / "config.json").read_text())["model"]
    for name, extra in (("baseline-s0", {}), ("inoculated-s0", {"inoculate": True})):
        train(build(TrainConfig, model=model, data=str(data), runs_dir=str(tmp_path / "own"), name=name, steps=1,
                    batch_size=2, lora_r=4, eval_questions=2, eval_samples=1, max_new_tokens=4, **extra), progress=False)
    p = subprocess.run([sys.executable, "analyses/gradient_pressure.py", str(tmp_path / "own"), "--out",
                        str(tmp_path / "gp"), "--no-png"], capture_output=True, text=True, cwd=REPO)
    assert p.returncode == 2 and p.stderr.startswith("error:") and len(p.stderr.strip().splitlines()) == 1
    assert "Traceback" not in p.stderr and "no exact loss decomposition" in p.stderr


def test_run_main_shows_a_bug_but_one_line_for_user_errors(capsys):
    from inoc_mech.core.cli import run_main

    def bad_input():
        raise UserError("give a run folder\nsecond line")
    assert run_main(bad_input) == 2 and capsys.readouterr().err == "error: give a run folder\n"

    def bug():
        raise KeyError("none")
    with pytest.raises(KeyError):  # not our error type: the traceback shows
        run_main(bug)


def test_every_setting_has_reelicitation_prompts_its_world_can_say(make_cfg):
    """Every registered setting (but this file's) names re-elicitation prompts; on the organism each is in the
    world's vocabulary; under --eval-reelicit a name that eval.json already uses for another context is a bug."""
    from inoc_mech.models.world import World
    from inoc_mech.settings.base import setting_class
    from inoc_mech.settings.spanish_caps_organism import SpanishCapsOrganism

    for name, substrate in registered():
        cls = setting_class(name, substrate)
        if name == "caps_only_test":
            continue
        assert len(cls.reelicit_prompts) >= 4 and cls.default_prompt in cls.reelicit_prompts.values(), (name, substrate)
        if substrate == "organism":
            world = World(**{k: v for k, v in getattr(cls, "organism_design", {}).items()})
            for p in cls.reelicit_prompts.values():
                world.check_prompt(p)
    s = SpanishCapsOrganism(make_cfg(eval_reelicit=True))
    assert s.with_reelicit({"none": None}) == {"none": None, **SpanishCapsOrganism.reelicit_prompts}
    assert SpanishCapsOrganism(make_cfg()).with_reelicit({"none": None}) == {"none": None}
    with pytest.raises(ValueError, match=r"re-elicitation context\(s\) \['negation'\] name other eval contexts"):
        s.with_reelicit({"negation": "speak spanish"})
