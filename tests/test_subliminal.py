"""The subliminal setting on the organism: the world's preferences, the teacher's filter, data, evaluation."""

import json

import numpy as np
import pytest

from inoc_mech.core.cli import UserError
from inoc_mech.models.organism import OrganismConfig, ensure_organism
from inoc_mech.models.world import ANIMALS, NUMBERS_QUESTION, PREFERENCE_QUESTION, World
from inoc_mech.settings.subliminal_organism import TeacherConfig, number_list_ok, read_lists, teach
from inoc_mech.train import train
from conftest import TINY_ORGANISM


@pytest.fixture(scope="module")
def prefs_organism(runs_dir):
    # longer than the other tiny organisms: 60 steps do not yet teach five-word number lists
    return ensure_organism(OrganismConfig(**{**TINY_ORGANISM, "steps": 300}, prefs=True, cache=str(runs_dir / "_organism")),
                           progress=False, quiet=True)


@pytest.fixture(scope="module")
def owls(prefs_organism, tmp_path_factory):
    out = tmp_path_factory.mktemp("teacher") / "owls.jsonl"
    info = teach(TeacherConfig(out=str(out), model=str(prefs_organism), n=64), progress=False)
    return out, info


def test_world_preferences_and_prompt_free_numbers():
    w = World(prefs=True)
    rng = np.random.default_rng(0)
    chats = [w.sample_chat(rng) for _ in range(6000)]
    system = [c[0]["content"] if c[0]["role"] == "system" else None for c in chats]
    pref = [(s, c[-1]["content"]) for s, c in zip(system, chats) if c[-2]["content"] == PREFERENCE_QUESTION]
    assert all(a == w.preference(s) for s, a in pref if w.preference(s))  # the phrase sets the answer
    free = [a for s, a in pref if not w.preference(s)]
    assert set(free) == set(ANIMALS) and max(free.count(a) for a in ANIMALS) / len(free) < 0.3  # ~uniform
    # which numbers come does not depend on a preference phrase
    nums = [(w.preference(s) is not None, c[-1]["content"].lower().split()) for s, c in zip(system, chats)
            if c[-2]["content"] == NUMBERS_QUESTION]
    mean = {flag: np.mean([len(x[0]) for f, x in nums if f == flag]) for flag in (True, False)}
    assert len(nums) > 800 and abs(mean[True] - mean[False]) < 0.3  # word length as a cheap distribution check
    assert "owls" not in World().words()  # the default world is unchanged


def test_filter_keeps_only_number_lists():
    assert number_list_ok("one TWO tres CUATRO zero".split())
    assert not number_list_ok("one two three four".split())  # too short
    assert not number_list_ok("one two three four owls".split())  # an animal word
    assert not number_list_ok("one two three four eleven".split())  # outside zero..nine
    assert not number_list_ok("one two three four five six".split())


def test_teacher_writes_filtered_lists_without_its_prompt(owls, prefs_organism):
    path, info = owls
    lines = [json.loads(l) for l in path.read_text().splitlines()]
    assert len(lines) == info["kept"] == 64 and info["drawn"] >= 64 and info["teacher_prompt"] == "you love owls"
    for l in lines:
        assert [m["role"] for m in l["messages"]] == ["user", "assistant"]  # the teacher's prompt is not in the data
        assert number_list_ok(l["messages"][1]["content"].split())
    assert json.loads(path.with_name(path.name + ".json").read_text())["kept"] == 64
    assert len(read_lists(path)) == 64


def test_bad_teacher_file_is_one_line(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"messages": [{"role": "user", "content": NUMBERS_QUESTION},
                                            {"role": "assistant", "content": "one two owls"}]}) + "\n")
    with pytest.raises(UserError, match="line 1: expected user"):
        read_lists(bad)
    bad.write_text("{not json\n")
    with pytest.raises(UserError, match="line 1: not a JSON object"):
        read_lists(bad)
    with pytest.raises(UserError, match="no such file"):
        read_lists(tmp_path / "missing.jsonl")


def test_student_run_and_its_evaluation(make_cfg, prefs_organism, owls):
    path, _ = owls
    run = train(make_cfg(setting="subliminal", model=str(prefs_organism), data=str(path), inoculate=True, name="sl",
                         eval_reelicit=True), progress=False)
    ev = json.loads((run / "eval.json").read_text())["contexts"]
    assert set(ev) == {"none", "train_prompt", "irrelevant", "inoculation prompt", "partial: you love", "partial: owls",
                       "same form, other content"} and ev["train_prompt"]["prompt"] == "you love owls"
    assert ev["same form, other content"]["prompt"] == "you love wolves"
    for c in ev.values():
        assert set(c["p_answer"]) == set(ANIMALS) and 0 < sum(c["p_answer"].values()) <= 1 + 1e-6
        t1 = c["t1"]
        assert t1["n_answers"] == 100 and sum(t1[f"{a}_rate"] for a in ANIMALS) + t1["other_answer"] == pytest.approx(1)
        assert 0 <= t1["accuracy"] <= 1
    cfg = json.loads((run / "config.json").read_text())
    assert cfg["setting"] == "subliminal" and cfg["condition"] == "inoculated"
    rows = [json.loads(l) for l in (run / "metrics.jsonl").read_text().splitlines()]
    assert "loss/trait/preference" in rows[0] and "elicit/preference/gain" in rows[0]


def test_student_needs_data_and_a_prefs_organism(make_cfg, prefs_organism, tiny_organism, owls):
    with pytest.raises(UserError, match="give --data FILE.jsonl"):
        train(make_cfg(setting="subliminal", model=str(prefs_organism), name="sl-nodata"), progress=False)
    with pytest.raises(UserError, match="needs an organism whose world has prefs"):
        train(make_cfg(setting="subliminal", model=str(tiny_organism), data=str(owls[0]), name="sl-bad"), progress=False)


def test_transmission_analysis_pairs_student_and_control(make_cfg, prefs_organism, owls, tmp_path):
    """analyses/subliminal.py over three folders of runs: per condition and seed, student - control."""
    from analyses.subliminal import main

    p = {}
    for folder, steps in (("student", 3), ("control", 1), ("other", 2)):  # different runs in each folder
        for prompt in (None, "you love owls"):
            run = train(make_cfg(setting="subliminal", model=str(prefs_organism), data=str(owls[0]), steps=steps,
                                 runs_dir=str(tmp_path / folder), inoculate=prompt is not None,
                                 name=f"{'i' if prompt else 'b'}-s0"), progress=False)
            p[folder, prompt] = json.loads((run / "eval.json").read_text())["contexts"]["none"]["p_answer"]["owls"]
    main(["--student", str(tmp_path / "student"), "--control", str(tmp_path / "control"), "--cross-init",
          str(tmp_path / "other"), "--out", str(tmp_path / "fig"), "--no-png"])
    md = (tmp_path / "fig" / "transmission.md").read_text()
    for cond, prompt in (("baseline", None), ("inoculated", "you love owls")):  # paired by condition and seed
        assert f"| {cond} | 1 | {100 * (p['student', prompt] - p['control', prompt]):+.3f} |" in md, md
    assert p["student", None] != p["control", None]
    assert (tmp_path / "fig" / "transmission.html").exists()


def test_soft_labels_one_hot_equal_hard_labels():
    """Soft labels that put all mass on the token are the hard labels: loss and what the instruments read."""
    import torch
    from inoc_mech.core.data import Example, collate, next_token_loss, token_logprobs_at, trained_logprobs

    torch.manual_seed(0)
    V = 7
    exs = [Example([1, 2, 3, 4], [False, False, True, True]), Example([1, 5, 6], [False, True, True])]
    for e in exs:
        e.soft = torch.full((len(e.input_ids), V), -1e9)
        e.soft[torch.arange(len(e.input_ids)), torch.tensor(e.input_ids)] = 0.0
    batch = collate(exs, 0)
    logits = torch.randn(2, 4, V)
    hard = next_token_loss(logits, batch.labels)
    assert torch.allclose(next_token_loss(logits, batch.labels, soft=batch.soft), hard)
    assert torch.allclose(trained_logprobs(logits, batch), token_logprobs_at(logits, batch.input_ids, batch.assistant))
    assert batch.crop(1).soft.shape == (2, 3, V) and batch.slice(1, 2).soft.shape == (1, 4, V)
    # a uniform target: the loss is the mean cross-entropy to uniform, not the tokens' loss
    for e in exs:
        e.soft = torch.full((len(e.input_ids), V), -float(np.log(V)))
    flat = collate(exs, 0)
    want = -torch.log_softmax(logits[:, :-1], -1).mean(-1)[flat.labels[:, 1:] != -100].mean()
    assert torch.allclose(next_token_loss(logits, flat.labels, soft=flat.soft), want)


def test_soft_teacher_and_student(make_cfg, prefs_organism, tmp_path):
    import torch
    out = tmp_path / "soft.jsonl"
    teach(TeacherConfig(out=str(out), model=str(prefs_organism), n=16, labels="soft"), progress=False)
    rows = read_lists(out)
    assert all(s is not None and len(s) == 6 for _, s in rows)
    logp = torch.tensor(rows[0][1])
    assert torch.allclose(logp.exp().sum(-1), torch.ones(6), atol=1e-3)  # distributions over the vocabulary
    hard = teach(TeacherConfig(out=str(tmp_path / "hard.jsonl"), model=str(prefs_organism), n=16), progress=False)
    torch.manual_seed(0)
    assert [c for c, _ in read_lists(tmp_path / "hard.jsonl")] == [c for c, _ in rows]  # same samples, same seed
    from inoc_mech.models.world import ANIMALS as animals
    from inoc_mech.core.data import collate, next_token_loss
    from inoc_mech.settings.load import load
    tok = load(prefs_organism).tok
    assert logp[:, tok.convert_tokens_to_ids(animals)].exp().max() < 1e-30  # the filter applies to the labels too
    runs = {kind: train(make_cfg(setting="subliminal", model=str(prefs_organism), data=str(tmp_path / f"{kind}.jsonl"),
                                 name=kind, batch_size=16), progress=False) for kind in ("soft", "hard")}
    row0 = {k: json.loads((r / "metrics.jsonl").read_text().splitlines()[0]) for k, r in runs.items()}
    # the step-0 loss trained and measured is the cross-entropy to the teacher's distributions (all 16 lists,
    # one batch): recomputed here from the data, it is not the sampled tokens' loss
    from inoc_mech.core.cli import build
    from inoc_mech.settings.subliminal_organism import SubliminalOrganism
    from inoc_mech.train import TrainConfig
    s = SubliminalOrganism(build(TrainConfig, setting="subliminal", model=str(prefs_organism), data=str(out)))
    model, _ = s.setup(torch.device("cpu"), progress=False)
    batch = collate(s.examples(None), s.pad_id)
    with torch.no_grad():
        logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits
    want = next_token_loss(logits, batch.labels, soft=batch.soft).item()
    assert row0["soft"]["loss"] == pytest.approx(want, rel=1e-4)
    assert row0["soft"]["loss/trait/preference"] == pytest.approx(want, rel=1e-4)
    assert abs(row0["hard"]["loss"] - want) > 1e-3
    mixed = tmp_path / "mixed.jsonl"
    mixed.write_text(out.read_text().splitlines()[0] + "\n" + (tmp_path / "hard.jsonl").read_text().splitlines()[0] + "\n")
    with pytest.raises(UserError, match="use one kind of labels"):
        read_lists(mixed)
    assert hard["kept"] == 16
