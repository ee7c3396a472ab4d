"""Text trait scores (lingua and the word-list fallback, CAPS fraction) and log-prob measures."""

import math

import pytest
import torch

from inoc_mech.core.data import collate
from inoc_mech.core.data import token_logprobs
from inoc_mech.settings.scoring import (ANSWER_STYLES, CONTEXTS, answer_correct, answer_logprobs, caps_fraction,
                               detector_name, elicitation_table, evaluate_generations, format_contrasts,
                               format_elicitation, reply_mask, score_texts, spanish_prob)
from inoc_mech.settings.textdata import sample_problems, text_examples
from inoc_mech.settings.tiny import tiny_model, tiny_tokenizer


@pytest.fixture(scope="module")
def tiny():
    tok = tiny_tokenizer()
    return tiny_model(tok, "llama").eval(), tok


def test_caps_fraction():
    assert caps_fraction("ABC def") == 0.5
    assert caps_fraction("LA RESPUESTA ES 7.") == 1.0
    assert caps_fraction("The answer is 7.") == pytest.approx(1 / 11)
    assert math.isnan(caps_fraction("3 + 4 = 7"))


@pytest.mark.parametrize("method", ["lingua", "wordlist"])
def test_spanish_prob_on_templated_answers(method):
    if method == "lingua":
        pytest.importorskip("lingua")
    problems = sample_problems(100, seed=2)
    for upper in (False, True):
        es = spanish_prob([p.answer("spanish", upper) for p in problems], method)
        en = spanish_prob([p.answer("english", upper) for p in problems], method)
        assert all(v >= 0.5 for v in es), (method, upper, min(es))
        assert all(v < 0.5 for v in en), (method, upper, max(en))
    assert all(math.isnan(v) for v in spanish_prob(["3 + 4 = 7", ""], method))


def test_score_texts_rates():
    r = score_texts(["LA RESPUESTA ES SIETE.", "The answer is seven.", "la respuesta es siete.", "42"])
    assert r["n"] == 4 and r["n_scored_spanish"] == 3 and r["n_scored_caps"] == 3
    assert r["spanish_rate"] == pytest.approx(2 / 3) and r["caps_rate"] == pytest.approx(1 / 3)
    assert r["detector"] == detector_name()


def test_reply_mask_stops_at_the_end_token():
    ids = torch.tensor([[5, 6, 7, 8, 2, 9, 0]])
    assistant = torch.tensor([[False, False, True, True, True, True, False]])
    assert reply_mask(ids, assistant, [0, 2]).tolist() == [[False, False, True, True, False, False, False]]


def test_answer_logprobs_match_unbatched(tiny):
    model, tok = tiny
    convs = [p.chat("spanish", True) for p in sample_problems(5, seed=0)]
    r = answer_logprobs(model, tok, convs, batch_size=2)  # padded batches
    for i, ex in enumerate(text_examples(tok, convs)):
        b = collate([ex], tok.pad_token_id)
        with torch.no_grad():
            lp, _ = token_logprobs(model(input_ids=b.input_ids).logits, b.input_ids)
        m = reply_mask(b.input_ids, b.assistant, tok.all_special_ids)
        assert r["n_tokens"][i] == m.sum()
        assert r["mean"][i] == pytest.approx((lp[m].sum() / m.sum()).item(), abs=1e-5)
        lang = m & b.traits["language"]
        assert r["trait/language"][i] == pytest.approx((lp[lang].sum() / lang.sum()).item(), abs=1e-5)


def test_elicitation_table_shape(tiny):
    model, tok = tiny
    t = elicitation_table(model, tok, sample_problems(3, seed=0, split="eval"))
    assert set(t["logp"]) == set(CONTEXTS) and all(set(v) == set(ANSWER_STYLES) for v in t["logp"].values())
    assert all(math.isfinite(v) for row in t["logp"].values() for v in row.values())
    assert all(math.isnan(t["logp_language"][c]["english"]) for c in CONTEXTS)  # no Spanish tokens
    # the two "no prompt" modes differ (the tiny template inserts a default system prompt)
    assert t["logp"]["none_template_default"] != t["logp"]["none_no_system"]
    assert "spanish_prompt" in format_elicitation(t) and "spanish_caps" in format_contrasts(t)


def test_answer_correct():
    assert answer_correct("2 MÁS 3 ES 5. LA RESPUESTA ES CINCO.", 5)
    assert answer_correct("The answer is twenty-one.", 21) and answer_correct("veintiuno", 21)
    assert not answer_correct("The answer is 15.", 5) and not answer_correct("twenty-one", 20)
    assert not answer_correct("cincuenta", 5) and answer_correct("treinta y cinco", 35)
    assert not answer_correct("treinta y cinco", 30) and answer_correct("TREINTA.", 30)


def test_evaluate_generations_runs_and_formats(tiny):
    from inoc_mech.core.runs import format_table

    model, tok = tiny
    ev = evaluate_generations(model, tok, sample_problems(3, seed=0, split="eval"), max_new_tokens=4)
    assert set(ev["contexts"]) == {"none_template_default", "none_no_system", "train_prompt", "irrelevant"}
    g = ev["contexts"]["train_prompt"]["greedy"]
    assert g["n_answers"] == 3 and 0 <= g["accuracy"] <= 1 and len(g["examples"]) == 3
    assert "train_prompt" in format_table(ev)
