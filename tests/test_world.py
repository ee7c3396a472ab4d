import numpy as np
import pytest

from inoc_mech.models.world import CASE_PHRASES, LANGUAGE_PHRASES, World


@pytest.fixture(scope="module")
def world():
    return World()


@pytest.fixture(scope="module")
def tok(world):
    return world.build_tokenizer()


def test_four_distinct_variant_tokens_per_word(world, tok):
    table = world.variant_table(tok)
    assert table.shape == (len(world.content_words), 2, 2)
    assert len(set(table.ravel().tolist())) == table.size  # every variant is its own token
    assert tok.unk_token_id not in table


def test_variant_labels(world, tok):
    v = world.variants
    assert (v["seven"].language, v["seven"].case) == (0, 0)
    assert (v["SIETE"].language, v["SIETE"].case) == (1, 1)
    assert (v["RESPUESTA"].language, v["RESPUESTA"].case) == (1, 1)
    assert v["seven"].word == v["SIETE"].word == v["siete"].word == v["SEVEN"].word
    assert world.answer_words(7, 1, 1) == ["LA", "RESPUESTA", "ES", "SIETE"]
    assert world.answer_words(7, 0, 0) == ["the", "answer", "is", "seven"]


def test_held_out_split_is_disjoint_and_correct(world):
    train, held = set(world.train_questions), set(world.held_out_questions)
    assert not train & held
    assert len(held) > 40 and len(train) > 300
    for a, op, b, r in train | held:
        assert r == (a + b if op == "plus" else a - b) and 0 <= r <= world.max_number


def test_chat_template_round_trip(world, tok):
    rng = np.random.default_rng(0)
    for _ in range(20):
        chat = world.sample_chat(rng)
        ids = tok.apply_chat_template(chat, tokenize=True)["input_ids"]
        assert tok.unk_token_id not in ids
        toks = tok.convert_ids_to_tokens(ids)
        text = tok.apply_chat_template(chat, tokenize=False)
        assert toks == text.split()
        assert toks[-1] == "<|end|>" and "<|assistant|>" in toks
        assert " ".join(toks[toks.index("<|assistant|>") + 1:-1]) == chat[-1]["content"]


def test_sampled_chats_follow_prompts(world):
    rng = np.random.default_rng(1)
    n_free = n_free_es = 0
    for _ in range(3000):
        chat = world.sample_chat(rng)
        prompt = chat[0]["content"] if chat[0]["role"] == "system" else None
        language, case = world.prompt_controls(prompt)
        words = chat[-1]["content"].split()
        es = {world.variants[w].language for w in words}
        up = {world.variants[w].case for w in words}
        assert len(es) == len(up) == 1  # one surface form per answer
        if language is not None:
            assert es == {int(language == "spanish")}
        else:
            n_free += 1
            n_free_es += es == {1}
        if case is not None:
            assert up == {int(case == "upper")}
    assert 0.02 < n_free_es / n_free < 0.09  # base rate 5%


def test_prompt_controls_and_vocabulary(world):
    assert world.prompt_controls("you like cats . speak spanish . use capitals") == ("spanish", "upper")
    assert world.prompt_controls(None) == (None, None)
    for p in list(LANGUAGE_PHRASES) + list(CASE_PHRASES):
        world.check_prompt(p)
    with pytest.raises(ValueError, match="outside the organism's vocabulary.*'speak spanish'"):
        world.check_prompt("speak klingon")


def test_format_property_is_off_by_default_and_follows_its_phrases():
    import numpy as np

    from inoc_mech.models.world import FORMAT_PHRASES

    plain, fmt = World(), World(formats=True)
    assert "formats" not in plain.to_dict() and not set(FORMAT_PHRASES) & set(plain.phrases)
    assert set(FORMAT_PHRASES) <= set(fmt.phrases) and World(**fmt.to_dict()).formats
    # the default world's samples do not change when the switch exists
    a, b = np.random.default_rng(3), np.random.default_rng(3)
    assert [plain.sample_chat(a) for _ in range(20)] == [World().sample_chat(b) for _ in range(20)]
    rng = np.random.default_rng(0)
    chats = [fmt.sample_chat(rng) for _ in range(400)]
    for c in chats:
        prompt = c[0]["content"] if c[0]["role"] == "system" else ""
        n = len(c[-1]["content"].split())
        if "concise" in prompt:
            assert n == 1
        elif "full sentences" in prompt:
            assert n == 4
    assert {len(c[-1]["content"].split()) for c in chats} == {1, 4}


# Digests of the first 300 pretraining chats (seed 7) and of the vocabulary, recorded from the worlds as they
# were before the persona and graded switches existed: a new switch must leave every older world's data alone
# (cached organisms and every result built on them depend on it).
PINNED = [({}, "ae5d47d624775978", "86d644ee89ef7a97"),
          ({"formats": True}, "a35a19b51a1f1e39", "30ddb5cb55f2da5d"),
          ({"triggers": True}, "eaa5d2ae513c0914", "5eb37d48677dae0d"),
          ({"prefs": True}, "113b024d225bb2da", "b4ca7d7a59914f76"),
          ({"formats": True, "triggers": True}, "ed3abc5f2c415cdf", "eb61f22fb13d337a"),
          # recorded 2026-12-03 (session 9), when the backdoor and EM sweeps were re-run on fresh organisms
          ({"persona": True}, "4cf3321b220c0a35", "fc359eca615b5d43"),
          ({"persona": True, "narrow_base": False}, "3084c15464b645da", "fc359eca615b5d43"),
          ({"graded": True}, "a15a708dace6c71d", "e502a5650d2ce052")]


@pytest.mark.parametrize("design,chats,words", PINNED)
def test_older_worlds_sample_the_same_chats(design, chats, words):
    import hashlib
    import json

    w = World(**design)
    rng = np.random.default_rng(7)
    got = [w.sample_chat(rng) for _ in range(300)]
    assert hashlib.sha1(json.dumps(got).encode()).hexdigest()[:16] == chats
    assert hashlib.sha1(" ".join(w.words()).encode()).hexdigest()[:16] == words
