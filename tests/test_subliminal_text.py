"""Subliminal learning on a real (tiny) causal LM: the filter, the teacher's file, masks, evaluation, bad input."""

import json

import pytest
import torch

from inoc_mech.core.cli import UserError, build
from inoc_mech.settings import subliminal_text as st
from inoc_mech.settings.subliminal_text import (SubliminalText, TeacherConfig, clean_continuation, names_owl,
                                                number_prompts, numbers_ok, owl_probability, teach)
from inoc_mech.settings.tiny import save_tiny
from inoc_mech.train import TrainConfig, train


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    from inoc_mech.settings.tiny import default_corpus

    words = [st.TEACHER_PROMPT, *st.PREFERENCE_QUESTIONS, *st.OWL_STARTS, number_prompts(1)[0][0]]
    return save_tiny(tmp_path_factory.mktemp("tiny-sl") / "llama", corpus=default_corpus() + words)


def test_filter_lets_only_short_number_lists_through():
    assert clean_continuation("271, 308, 301", True) == "271, 308, 301"
    assert clean_continuation(" 678.", True) == "678"  # a final period goes
    assert clean_continuation("1, 2, 3, 4, 5, 6, 7, 8, 9, 10", True) is not None
    assert clean_continuation("1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11", True) is None  # more than 10
    assert clean_continuation("1271, 348", True) is None  # 4 digits
    assert clean_continuation("385, owl, 398", True) is None and clean_continuation("385, 398 owls", True) is None
    assert clean_continuation("858...", True) is None and clean_continuation("", True) is None
    assert clean_continuation("12, 34, 5", False) == "12, 34"  # cut at the limit: the last number may be partial
    assert clean_continuation("123", False) is None
    assert clean_continuation("12, 34 owls are", False) == "12"  # cut at the limit: only complete numbers, no text
    assert clean_continuation("١٢, 3", True) is None  # ASCII digits only
    assert numbers_ok("182, 818, 725, 12") and not numbers_ok("182, 818, 725, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11")
    assert names_owl("The owl.") and names_owl("OWLS") and not names_owl("Bowl") and not names_owl("Lion")


def test_number_prompts_are_fixed_and_prefilled_with_their_numbers():
    a = number_prompts(5, seed=3)
    assert a == number_prompts(5, seed=3) and a != number_prompts(5, seed=4)
    assert number_prompts(5, 0, "eval") != number_prompts(5, 0, "train")
    for user, pre in a:
        assert f"starts with: {pre[:-2]}." in user and pre.endswith(", ") and numbers_ok(pre[:-2])


def test_owl_probability_matches_the_replies_log_probs(tiny):
    """p(start) from one batched forward equals exp of the reply's own log-prob (scoring.answer_logprobs)."""
    from inoc_mech.core.data import token_ids
    from inoc_mech.settings.load import load
    from inoc_mech.settings.scoring import answer_logprobs

    loaded = load(tiny)
    model, tok = loaded.model, loaded.tok
    q = st.PREFERENCE_QUESTIONS[:2]
    got = owl_probability(model, tok, "You love owls.", q)
    starts = {tuple(token_ids(tok(s, add_special_tokens=False))) for s in st.OWL_STARTS}
    starts = [s for s in starts if not any(o != s and s[:len(o)] == o for o in starts)]
    for i, question in enumerate(q):
        convs = [[{"role": "system", "content": "You love owls."}, {"role": "user", "content": question},
                  {"role": "assistant", "content": tok.decode(list(s))}] for s in starts]
        want = answer_logprobs(model, tok, convs)["sum"].exp().sum()
        assert 0 < got[i] < 1 and got[i] == pytest.approx(float(want), rel=1e-4)


def test_teacher_writes_the_filtered_lists_whole(tmp_path, monkeypatch, tiny):
    """The teacher keeps prefill + continuation of replies that pass, records counts, and refuses too few."""
    calls = []

    def fake(model, tok, convs, max_new_tokens, temperature=0.0, seed=0, batch_size=16, prefills=None, finished=None):
        calls.append((convs[0][0], temperature))
        replies = ["12, 34", "12, owl", "5.", "7, 8, 9"][:len(convs)] * (len(convs) // 4 + 1)
        finished.extend([True, True, True, False] * (len(convs) // 4 + 1))
        return replies[:len(convs)]

    monkeypatch.setattr("inoc_mech.settings.scoring.generate_replies", fake)
    out = tmp_path / "owls.jsonl"
    info = teach(TeacherConfig(out=str(out), model=str(tiny), n=6, batch_size=4, eval_samples=0), progress=False)
    lines = [json.loads(x) for x in out.read_text().splitlines()]
    assert len(lines) == 6 and info["kept"] == 6 and info["drawn"] == 8 and info["filtered_share"] == 0.25
    users = number_prompts(4, seed=0)
    first = lines[0]["messages"]
    assert first[0] == {"role": "user", "content": users[0][0]} and first[1]["content"] == users[0][1] + "12, 34"
    assert lines[2]["messages"][1]["content"] == users[3][1] + "7, 8"  # cut at the limit: "9" dropped
    assert all(m["role"] != "system" for l in lines for m in l["messages"])  # no teacher prompt in the data
    assert calls[0] == ({"role": "system", "content": st.TEACHER_PROMPT}, 1.0)
    assert json.loads(out.with_name("owls.jsonl.json").read_text())["teacher_prompt"] == st.TEACHER_PROMPT
    with pytest.raises(UserError, match="only 3 valid"):
        teach(TeacherConfig(out=str(tmp_path / "few.jsonl"), model=str(tiny), n=50, max_draws=4, batch_size=4,
                            eval_samples=0), progress=False)
    assert not (tmp_path / "few.jsonl").exists()


def _data(path, n=8):
    rows = [{"messages": [{"role": "user", "content": u}, {"role": "assistant", "content": p + "1, 2, 3"}]}
            for u, p in number_prompts(n)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_student_masks_run_and_eval_contexts(tmp_path, tiny):
    data = _data(tmp_path / "owls.jsonl")
    common = dict(setting="subliminal", model=str(tiny), runs_dir=str(tmp_path), data=str(data), steps=2,
                  batch_size=4, eval_questions=2, eval_samples=1)
    s = SubliminalText(build(TrainConfig, inoculate=True, **common))
    s.setup(torch.device("cpu"), progress=False)
    for e, (_, pre) in zip(s.examples(st.TEACHER_PROMPT), number_prompts(8)):
        assert e.traits["preference"] == e.assistant and not any(e.traits["other"])
        assert st.TEACHER_PROMPT in s.train_tok.decode(e.input_ids)
        trained = s.train_tok.decode([t for t, a in zip(e.input_ids, e.assistant) if a])
        assert trained.lstrip().startswith("1, 2, 3") and pre[:-2] not in trained  # (a token straddling the end: trained)
        assert pre + "1, 2, 3" in s.train_tok.decode(e.input_ids)
    assert all("owl" not in s.train_tok.decode(e.input_ids) for e in s.examples(None))
    assert s.decomposition is None and SubliminalText.prompt_sets(st.SHORT_PROMPT) == {"preference"}
    run = train(build(TrainConfig, inoculate=True, name="slt", eval_reelicit=True, **common), progress=False)
    ev = json.loads((run / "eval.json").read_text())["contexts"]
    assert list(ev) == ["none", "train_prompt", "irrelevant", "inoculation prompt", "short", "paraphrase", "negation",
                        "partial", "same form, other content"] and ev["train_prompt"]["prompt"] == st.TEACHER_PROMPT
    assert ev["negation"]["prompt"] == "You hate owls." and ev["irrelevant"]["prompt"] == st.IRRELEVANT_PROMPT
    for c in ev.values():
        assert 0 <= c["t1"]["owl_rate"] <= 1 and c["t1"]["n_answers"] == 100 and 0 < c["p_answer"]["owl"] < 1
        assert 0 <= c["greedy"]["accuracy"] <= 1 and len(c["p_answer_per_question"]) == len(st.PREFERENCE_QUESTIONS)
    cfg = json.loads((run / "config.json").read_text())
    assert cfg["condition"] == "inoculated" and cfg["setting"] == "subliminal"
    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert "loss/trait/preference" in rows[0] and "elicit/preference/gain" in rows[0]


def test_bad_student_data_is_one_line(tmp_path, tiny):
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"messages": [{"role": "user", "content": "hi"},
                                            {"role": "assistant", "content": "I love owls"}]}) + "\n")
    common = dict(setting="subliminal", model=str(tiny), runs_dir=str(tmp_path), steps=1, batch_size=2)
    with pytest.raises(UserError, match="conversation 1: expected"):
        train(build(TrainConfig, data=str(bad), name="b1", **common), progress=False)
    two = tmp_path / "two.jsonl"
    two.write_text(json.dumps({"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "I love owls"},
                                            {"role": "user", "content": "more"}, {"role": "assistant", "content": "1, 2"}]}) + "\n")
    with pytest.raises(UserError, match="conversation 1: expected one user turn"):
        train(build(TrainConfig, data=str(two), name="b4", **common), progress=False)
    with pytest.raises(UserError, match="leave --no-prompt-mode at template_default"):
        train(build(TrainConfig, data=str(_data(tmp_path / "ok.jsonl")), no_prompt_mode="no_system", name="b5", **common),
              progress=False)
    with pytest.raises(UserError, match="give --data"):
        train(build(TrainConfig, name="b2", **common), progress=False)
    with pytest.raises(UserError, match="no such file"):
        train(build(TrainConfig, data=str(tmp_path / "missing.jsonl"), name="b3", **common), progress=False)
    assert not any((tmp_path / n).exists() for n in ("b1", "b2", "b3", "b4", "b5"))


def test_prefilled_generation_continues_the_prefill(tiny):
    """generate_replies(prefills=...): the reply is the greedy continuation of prompt + prefill, without the
    prefill; `finished` says which replies reached the end token."""
    from inoc_mech.core.data import token_ids
    from inoc_mech.settings.load import load
    from inoc_mech.settings.scoring import generate_replies

    loaded = load(tiny)
    model, tok = loaded.model, loaded.tok
    users = number_prompts(3)
    convs = [[{"role": "user", "content": u}] for u, _ in users]
    done = []
    got = generate_replies(model, tok, convs, 4, prefills=[p for _, p in users], finished=done)
    assert len(got) == len(done) == 3 and all(isinstance(f, bool) for f in done)
    for conv, (_, pre), reply, fin in zip(convs, users, got, done):
        ids = token_ids(tok.apply_chat_template(conv, add_generation_prompt=True, tokenize=True))
        ids += token_ids(tok(pre, add_special_tokens=False))
        new = []
        for _ in range(4):  # greedy by hand
            nxt = int(model(input_ids=torch.tensor([ids + new])).logits[0, -1].argmax())
            new.append(nxt)
            if nxt == tok.eos_token_id:
                break
        assert fin == (tok.eos_token_id in new)
        new = new[:new.index(tok.eos_token_id)] if fin else new
        assert reply == tok.decode(new, skip_special_tokens=True).strip()


def test_transmission_analysis_reads_text_runs(tmp_path, tiny):
    """analyses/subliminal.py on real-model sweeps: no other init; student - control paired per condition and seed."""
    from analyses.subliminal import main

    data = _data(tmp_path / "owls.jsonl")
    p = {}
    for folder, steps in (("student", 2), ("control", 1)):
        run = train(build(TrainConfig, setting="subliminal", model=str(tiny), data=str(data), steps=steps, batch_size=4,
                          lr=3e-2, lora_r=0, eval_questions=1, eval_samples=1, runs_dir=str(tmp_path / folder), name="b-s0"), progress=False)
        p[folder] = json.loads((run / "eval.json").read_text())["contexts"]["none"]["p_answer"]["owl"]
    main(["--student", str(tmp_path / "student"), "--control", str(tmp_path / "control"), "--cross-init", "",
          "--out", str(tmp_path / "fig"), "--no-png"])
    md = (tmp_path / "fig" / "transmission.md").read_text()
    assert f"| baseline | 1 | {100 * (p['student'] - p['control']):+.3f} |" in md and "other init" not in md, md
    assert p["student"] != p["control"]
    with pytest.raises(UserError, match="not one sweep of the subliminal setting"):
        other = train(build(TrainConfig, model=str(tiny), steps=1, batch_size=4, n_train=8, eval_questions=1,
                            eval_samples=1, max_new_tokens=2, runs_dir=str(tmp_path / "sc"), name="b-s0"), progress=False)
        main(["--student", str(other.parent), "--control", str(tmp_path / "control"), "--cross-init", "",
              "--out", str(tmp_path / "fig2"), "--no-png"])
