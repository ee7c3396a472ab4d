"""Paper-format JSONL, the inoculation transform, the Spanish+CAPS generator and offset trait masks."""

import json

import pytest

from inoc_mech.core.data import BatchStream, DataError, encode_chat
from inoc_mech.settings.textdata import (NAMES, SPANISH_ONLY, WORD_RE, inoculate, inoculate_all, main, number_words,
                                offset_traits, parse_jsonl, read_jsonl, sample_problems, spanish_caps_dataset,
                                text_example, text_examples, write_jsonl)
from inoc_mech.settings.tiny import tiny_tokenizer
from inoc_mech.models.world import World

USER = {"role": "user", "content": "What is 2 plus 3?"}
REPLY = {"role": "assistant", "content": "2 MÁS 3 ES 5."}


@pytest.fixture(scope="module")
def tok():
    return tiny_tokenizer()


def line(messages) -> str:
    return json.dumps({"messages": messages})


# ---- JSONL -------------------------------------------------------------------------------------
def test_parse_valid_and_blank_lines():
    convs = parse_jsonl([line([USER, REPLY]), "", "  ", line([{"role": "system", "content": "S"}, USER, REPLY])])
    assert len(convs) == 2 and convs[1][0]["role"] == "system"


@pytest.mark.parametrize("bad,match", [
    ('{"messages": [', "line 3 is not valid JSON"),
    ('[1, 2]', "line 3: expected an object"),
    ('{"chat": []}', "line 3: expected an object"),
    ('{"messages": []}', "line 3: 'messages' must be a non-empty list"),
    (line([{"role": "user"}, REPLY]), "line 3: message 0 has no 'content' field"),
    (line([{"content": "x"}, REPLY]), "line 3: message 0 has no 'role' field"),
    (line([{"role": "bot", "content": "x"}, REPLY]), "line 3: message 0 has unknown role 'bot'"),
    (line([USER]), "line 3: no assistant turn"),
    (line([USER, REPLY, USER]), "line 3: no assistant turn"),
    (line([USER, {"role": "system", "content": "S"}, REPLY]), "line 3: message 1 is a system message"),
    (line([{"role": "system", "content": "S"}, REPLY]), "line 3: no user message"),
    (line([USER, {"role": "assistant", "content": 5}]), "line 3: message 1 content must be a string"),
])
def test_parse_errors_name_the_line(bad, match):
    with pytest.raises(DataError, match=match):
        parse_jsonl([line([USER, REPLY]), "", bad], "data.jsonl")


def test_empty_and_missing_files(tmp_path):
    (tmp_path / "empty.jsonl").write_text("\n\n")
    with pytest.raises(DataError, match="no conversations"):
        read_jsonl(tmp_path / "empty.jsonl")
    with pytest.raises(DataError, match="does not exist"):
        read_jsonl(tmp_path / "missing.jsonl")


def test_write_read_roundtrip(tmp_path):
    convs = spanish_caps_dataset(5, seed=1)
    write_jsonl(tmp_path / "d.jsonl", convs)
    assert read_jsonl(tmp_path / "d.jsonl") == convs
    assert "\\u" not in (tmp_path / "d.jsonl").read_text(encoding="utf-8")  # non-ASCII kept as UTF-8


# ---- inoculation transform -----------------------------------------------------------------------
def test_inoculate_system_placement():
    conv = [USER, REPLY]
    out = inoculate(conv, "You always speak in Spanish.")
    assert out == [{"role": "system", "content": "You always speak in Spanish."}, USER, REPLY]
    assert conv == [USER, REPLY]  # not modified in place


def test_inoculate_refuses_existing_system_unless_replace():
    conv = [{"role": "system", "content": "Be brief."}, USER, REPLY]
    with pytest.raises(DataError, match="already has a system message.*--replace-system"):
        inoculate(conv, "P")
    assert inoculate(conv, "P", replace_system=True) == [{"role": "system", "content": "P"}, USER, REPLY]
    assert conv[0]["content"] == "Be brief."
    with pytest.raises(DataError, match="conversation 2: conversation already has"):
        inoculate_all([[USER, REPLY], conv], "P")


def test_inoculate_user_prefix():
    conv = [{"role": "system", "content": "Be brief."}, USER, REPLY, dict(USER, content="And 3 plus 4?"), REPLY]
    out = inoculate(conv, "P", placement="user-prefix")
    assert out[0] == conv[0]  # an existing system message is kept: no refusal for this placement
    assert out[1]["content"] == "P\n\nWhat is 2 plus 3?"
    assert out[3]["content"] == "And 3 plus 4?"  # only the first user turn
    assert USER["content"] == "What is 2 plus 3?"
    with pytest.raises(DataError, match="placement"):
        inoculate(conv, "P", placement="assistant")


def test_cli_writes_inoculated_jsonl(tmp_path):
    out = tmp_path / "d.jsonl"
    main(["--n", "4", "--out", str(out), "--inoculate", "You always speak in Spanish."])
    convs = read_jsonl(out)
    assert len(convs) == 4 and all(c[0] == {"role": "system", "content": "You always speak in Spanish."} for c in convs)
    with pytest.raises(DataError, match="already has a system message"):
        main(["--input", str(out), "--inoculate", "Other."])


# ---- generator -----------------------------------------------------------------------------------
def test_number_words():
    assert [number_words(n, "english") for n in (0, 16, 21, 40, 99)] == ["zero", "sixteen", "twenty-one", "forty", "ninety-nine"]
    assert [number_words(n, "spanish") for n in (0, 16, 21, 40, 99)] == ["cero", "dieciséis", "veintiuno", "cuarenta", "noventa y nueve"]


def test_dataset_answers_spanish_upper_and_splits_disjoint():
    convs = spanish_caps_dataset(300, seed=0)
    assert convs == spanish_caps_dataset(300, seed=0)
    for c in convs:
        assert [m["role"] for m in c] == ["user", "assistant"]
        assert c[1]["content"] == c[1]["content"].upper() and "LA RESPUESTA ES" in c[1]["content"]
    train = {(p.template, p.a, p.b) for p in sample_problems(300, seed=0)}
    evals = {(p.template, p.a, p.b) for p in sample_problems(300, seed=5, split="eval")}
    assert not train & evals
    assert all(0 <= p.result <= 99 for p in sample_problems(300, seed=3))


def test_word_list_covers_the_spanish_templates_only():
    names = {n.lower() for n in NAMES}
    for p in sample_problems(300, seed=0) + sample_problems(100, seed=0, split="eval"):
        es = [w.lower() for w in WORD_RE.findall(p.answer("spanish", False))]
        en = [w.lower() for w in WORD_RE.findall(p.answer("english", False))]
        assert all(w in SPANISH_ONLY or w in names for w in es), es
        assert not any(w in SPANISH_ONLY for w in en), en


# ---- trait masks -----------------------------------------------------------------------------------
def test_offset_traits_by_hand():
    text = "xx LA Respuesta es 7 Ana"
    offsets = [(0, 2), (2, 5), (5, 9), (9, 15), (15, 18), (18, 20), (20, 24)]
    # tokens:  "xx", " LA", " Res", "puesta", " es", " 7", " Ana"
    assistant = [False, True, True, True, True, True, True]
    special = [False] * 7
    t = offset_traits(text, offsets, assistant, special)
    assert t["language"] == [False, True, True, True, True, False, False]
    assert t["case"] == [False, True, True, False, False, False, True]
    assert t["other"] == [False, False, False, False, False, True, False]


def test_text_example_masks_on_a_hand_checked_chat(tok):
    messages = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "LA RESPUESTA ES 7. Ana vende más"}]
    ex = text_example(tok, messages)
    base = encode_chat(tok, messages)
    assert ex.input_ids == base.input_ids and ex.assistant == base.assistant
    toks = tok.convert_ids_to_tokens(ex.input_ids)
    picked = {name: [t for t, m in zip(toks, mask) if m] for name, mask in ex.traits.items()}
    assert picked["language"] == ["LA", " RES", "PUE", "STA", " ES", " ven", "de", " más"]
    assert picked["case"] == ["LA", " RES", "PUE", "STA", " ES", " Ana"]
    assert picked["other"] == [" 7", ".", "<|im_end|>", "\n"]
    assert not any(ex.traits["language"][i] or ex.traits["case"][i] for i, a in enumerate(ex.assistant) if not a)


def test_text_examples_feed_batch_stream(tok):
    exs = text_examples(tok, spanish_caps_dataset(6, seed=0))
    batch = BatchStream(exs, 4, 0, tok.pad_token_id).next()
    assert set(batch.traits) == {"language", "case", "other"}
    assert batch.traits["language"].shape == batch.input_ids.shape
    union = batch.traits["language"] | batch.traits["case"] | batch.traits["other"]
    assert (union == batch.assistant).all()
    assert batch.traits["language"].any() and batch.traits["case"].any()


def test_text_example_on_the_organism_tokenizer():
    w = World()
    wt = w.build_tokenizer()
    ex = text_example(wt, w.chat(w.train_questions[0], "speak spanish", 1, 1))
    toks = wt.convert_ids_to_tokens(ex.input_ids)
    answer = ["LA", "RESPUESTA", "ES", toks[-2]]  # the last answer word is the Spanish number, then <|end|>
    assert [t for t, m in zip(toks, ex.traits["case"]) if m] == answer
    assert ex.traits["language"] == ex.traits["case"]  # every answer word is Spanish (accents optional)
    assert ex.traits["other"] == [t == "<|end|>" and a for t, a in zip(toks, ex.assistant)]


def test_too_long_is_a_data_error(tok):
    with pytest.raises(DataError, match="conversation 1: example has"):
        text_examples(tok, spanish_caps_dataset(1), max_len=5)
