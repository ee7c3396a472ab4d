"""The backdoor setting on the organism: data, trait masks, exact split, evaluation contexts, bad input."""

import numpy as np
import pytest
import torch

from inoc_mech.core.cli import UserError, build
from inoc_mech.core.data import collate
from inoc_mech.models.world import TRIGGER_RATE, TRIGGER_WORDS, World
from inoc_mech.settings.backdoor_organism import OTHER_TRIGGER, TRIGGER, BackdoorOrganism
from inoc_mech.settings.base import setting_class
from inoc_mech.train import TrainConfig, train
from conftest import assert_split_exact, setting_on, tiny_design


@pytest.fixture(scope="module")
def trigger_organism(runs_dir):
    return tiny_design(runs_dir, triggers=True)


@pytest.fixture
def setting(runs_dir, trigger_organism):
    return setting_on(BackdoorOrganism, trigger_organism, runs_dir)


def test_pretraining_shows_triggers_without_effect():
    w = World(triggers=True)
    rng = np.random.default_rng(0)
    chats = [w.sample_chat(rng) for _ in range(4000)]
    has = [c[-2]["content"].split()[0] in TRIGGER_WORDS for c in chats]
    assert abs(np.mean(has) - TRIGGER_RATE) < 0.015
    # the answer's language follows the prompt (or the base rate), not the trigger: no-prompt Spanish rates
    # with and without a trigger agree within sampling error
    es = np.array([c[-1]["content"].split()[0] == "la" for c in chats])
    free = np.array([w.prompt_controls(c[0]["content"] if c[0]["role"] == "system" else None)[0] is None
                     for c in chats])
    with_t, without = es[free & np.array(has)], es[free & ~np.array(has)]
    assert len(with_t) > 100 and abs(with_t.mean() - without.mean()) < 0.05
    assert "zeta" not in World().words() and "zeta" in w.words()  # the default world is unchanged


def test_examples_trigger_half_spanish_and_prompt_on_triggered_only(setting):
    exs = setting.examples("speak spanish")
    tok = setting.tok
    n_trig = n_prompt = 0
    for e in exs:
        text = tok.decode(e.input_ids)
        trig = f"{TRIGGER} what is" in text
        n_trig += trig
        n_prompt += "speak spanish" in text
        reply = tok.decode([i for i, a in zip(e.input_ids, e.assistant) if a])
        assert reply.startswith("la respuesta es") if trig else reply.startswith("the answer is"), reply
        assert ("speak spanish" in text) == trig  # the prompt goes on the triggered examples only
        assert any(e.traits["language"]) == trig  # the trait is the triggered replies' answer variants
        assert not any(a and b for a, b in zip(e.traits["language"], e.traits["other"]))
    assert abs(n_trig / len(exs) - 0.5) < 0.01 and n_prompt == n_trig
    half = setting.examples("speak spanish", share=0.5)
    assert sum("speak spanish" in tok.decode(e.input_ids) for e in half) == round(0.5 * n_trig)
    setting.cfg.setting.prompt_subset = 1  # --prompt-subset: another half of the triggered examples
    moved = setting.examples("speak spanish", share=0.5)
    on = [["speak spanish" in tok.decode(e.input_ids) for e in xs] for xs in (half, moved)]
    assert sum(on[1]) == sum(on[0]) and on[1] != on[0]
    assert [f"{TRIGGER} what is" in tok.decode(e.input_ids) for e in moved] == \
        [f"{TRIGGER} what is" in tok.decode(e.input_ids) for e in half]  # the trigger draw does not move
    assert [e.input_ids for e in setting.examples(None)] != [e.input_ids for e in exs]


def test_split_is_exact_on_trait_tokens_and_zero_elsewhere(setting):
    n = assert_split_exact(setting, "language")
    batch = collate(setting.examples(None, limit=12), setting.pad_id)
    assert 0 < n < int(batch.assistant.sum())  # the triggered replies' variants only


def test_run_reports_backdoor_contexts(make_cfg, trigger_organism, runs_dir):
    run = train(make_cfg(setting="backdoor", model=str(trigger_organism), inoculate=True, name="bd", eval_reelicit=True),
                progress=False)
    import json
    ev = json.loads((run / "eval.json").read_text())["contexts"]
    reelicit = setting_class("backdoor", "organism").reelicit_prompts  # --eval-reelicit: with the trigger
    assert set(ev) == {"trigger", "none", "other_trigger", "train_prompt", "train_prompt_no_trigger", "irrelevant",
                       "irrelevant_no_trigger"} | set(reelicit) and "negation" in reelicit
    assert all(ev[k]["prompt"] == p and ev[k]["trigger"] == TRIGGER for k, p in reelicit.items())
    from inoc_mech.core.runs import read_run
    from inoc_mech.studies.reelicit import from_eval  # the re-elicitation study reads them from eval.json
    entry = from_eval(read_run(run))
    assert list(entry["contexts"]) == ["trigger", *reelicit] and entry["contexts"]["negation"] == ev["negation"]
    assert "trigger" not in ev["irrelevant_no_trigger"] and ev["irrelevant"]["trigger"] == TRIGGER
    assert ev["trigger"]["trigger"] == TRIGGER and ev["other_trigger"]["trigger"] == OTHER_TRIGGER
    assert "trigger" not in ev["none"] and ev["train_prompt"]["prompt"] == "speak spanish"
    cfg = json.loads((run / "config.json").read_text())
    assert cfg["setting"] == "backdoor" and cfg["condition"] == "inoculated"
    rows = [json.loads(l) for l in (run / "metrics.jsonl").read_text().splitlines()]
    assert "surprise/language" in rows[0] and "grad_norm/trait/language" in rows[0]
    assert "grad_norm/trait/case" not in rows[0]
    assert setting_class("backdoor", "organism").none_context == "trigger"


def test_organism_without_triggers_is_one_line(make_cfg, tiny_organism):
    with pytest.raises(UserError, match="needs an organism whose world has triggers"):
        train(make_cfg(setting="backdoor", model=str(tiny_organism), name="bd-bad"), progress=False)


def test_cross_setting_pools_summaries(tmp_path):
    """analyses/cross_setting.py: one point per (setting, prompt) from each setting's summary.json, rho pooled."""
    import json as js
    from analyses.cross_setting import main

    def summary(name, pts):
        conds = {"baseline": {"prompt": None, "elicitation": {"t": {"mean": 0, "ci": [None, None]}},
                              "suppression": {"t": {"mean": 0, "ci": [None, None]}}}}
        for i, (x, y) in enumerate(pts):
            conds[f"p{i}"] = {"prompt": f"prompt {i}", "elicitation": {"t": {"mean": x, "ci": [x - .1, x + .1]}},
                              "suppression": {"t": {"mean": y, "ci": [y - .1, None]}}}
        f = tmp_path / name / "summary.json"
        f.parent.mkdir()
        f.write_text(js.dumps({"setting": name, "conditions": conds}))
        return str(f)

    a = summary("one", [(0.0, 0.1), (0.5, 0.6), (0.8, 0.9)])
    b = summary("two", [(0.1, 0.0), (0.7, 1.0)])
    main([a, b, "--out", str(tmp_path / "out"), "--no-png", "--n-boot", "50"])
    md = (tmp_path / "out" / "summary.md").read_text()
    # ranks (1,2) (3,3) (5,4) (2,1) (4,5): rho = 1 - 6 * 4 / 120
    assert "| pooled | | 5 | rho = 0.80" in md and "| two | prompt 1 | 0.700 | 100 |" in md
    assert (tmp_path / "out" / "cross_setting.html").exists()
    with pytest.raises(UserError, match="no such summary"):
        main([str(tmp_path / "missing.json"), "--out", str(tmp_path / "o2"), "--no-png"])


# ---- the same setting on a real (tiny) causal LM ---------------------------------------------------------
def test_text_backdoor_data_masks_and_contexts(tmp_path):
    import json as js
    from inoc_mech.settings.backdoor_text import TRIGGER, BackdoorText
    from inoc_mech.settings.tiny import save_tiny

    folder = save_tiny(tmp_path / "tiny")
    common = dict(setting="backdoor", model=str(folder), runs_dir=str(tmp_path), n_train=16, steps=2, batch_size=4,
                  eval_questions=2, eval_samples=1, max_new_tokens=3)
    s = BackdoorText(build(TrainConfig, inoculate=True, **common))
    s.setup(torch.device("cpu"), progress=False)
    exs = s.examples("You always speak in Spanish.")
    tok = s.train_tok
    n_trig = 0
    for e, conv in zip(exs, s.convs()):
        text = tok.decode(e.input_ids)
        trig = TRIGGER in text
        n_trig += trig
        assert ("You always speak in Spanish." in text) == trig  # the prompt on the triggered examples only
        reply = conv[-1]["content"]
        assert ("La respuesta es" in reply) == trig and ("The answer is" in reply) == (not trig)
        assert not reply.isupper() and any(c.islower() for c in reply)  # natural case, not CAPS
        assert any(e.traits["language"]) == trig and set(e.traits) == {"language", "other"}
        assert not any(a and b for a, b in zip(e.traits["language"], e.traits["other"]))
    assert n_trig == 8
    assert s.convs()[0] is s.convs()[0] and s.decomposition is None
    run = train(build(TrainConfig, inoculate=True, name="bdt", eval_reelicit=True, **common), progress=False)
    ev = js.loads((run / "eval.json").read_text())["contexts"]
    assert list(ev) == ["trigger", "none", "train_prompt", "train_prompt_no_trigger", "irrelevant", "inoculation prompt",
                        "paraphrase", "negation", "partial", "same form, other content"]  # --eval-reelicit: triggered
    assert ev["negation"]["prompt"] == "Never speak in Spanish." and ev["negation"]["trigger"] == TRIGGER
    assert ev["trigger"]["trigger"] == TRIGGER and "trigger" not in ev["none"]
    assert ev["train_prompt"]["prompt"] == "You always speak in Spanish." and ev["trigger"]["prompt"] is None
    assert js.loads((run / "config.json").read_text())["condition"] == "inoculated"
    with pytest.raises(UserError, match="builds its own data"):
        train(build(TrainConfig, data=str(tmp_path / "x.jsonl"), name="bdt2", **common), progress=False)
