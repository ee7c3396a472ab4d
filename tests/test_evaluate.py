import pytest

from inoc_mech.models.world_eval import score_answers
from inoc_mech.models.world import World


@pytest.fixture(scope="module")
def setup():
    w = World()
    return w, w.build_tokenizer()


def ids(tok, text):
    return tok.convert_tokens_to_ids(text.split())


def test_scores_on_hand_made_answers(setup):
    w, tok = setup
    answers = [ids(tok, "the answer is seven"),      # English lower, correct
               ids(tok, "LA RESPUESTA ES SIETE"),    # Spanish upper, correct
               ids(tok, "la respuesta es ocho"),     # Spanish lower, wrong
               ids(tok, "THE answer is plus")]       # malformed ('plus' is no answer word)
    m = score_answers(w, tok, answers, [7, 7, 7, 7])
    assert m["n_answers"] == 4
    assert m["accuracy"] == pytest.approx(2 / 4)
    assert m["spanish_rate"] == pytest.approx(8 / 15)  # 15 variant tokens, 8 Spanish
    assert m["caps_rate"] == pytest.approx(5 / 15)
    assert m["spanish_answers"] == pytest.approx(2 / 4)
    assert m["caps_answers"] == pytest.approx(1 / 4)
    assert m["malformed"] == pytest.approx(1 / 4)


def test_empty_answer_is_malformed_and_wrong(setup):
    w, tok = setup
    m = score_answers(w, tok, [[]], [3])
    assert m["malformed"] == 1 and m["accuracy"] == 0
