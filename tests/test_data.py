import numpy as np
import pytest
import torch

from inoc_mech.core.data import BatchStream, DataError, collate, encode_chat
from inoc_mech.models.world import organism_traits
from inoc_mech.models.world import World


@pytest.fixture(scope="module")
def setup():
    w = World()
    tok = w.build_tokenizer()
    return w, tok, set(w.variant_table(tok).ravel().tolist())


def test_assistant_and_trait_masks(setup):
    w, tok, var = setup
    chat = w.chat(w.train_questions[0], "speak spanish", 1, 1)
    ex = organism_traits(encode_chat(tok, chat), var)
    toks = tok.convert_ids_to_tokens(ex.input_ids)
    trained = [t for t, a in zip(toks, ex.assistant) if a]
    assert trained[:4] == chat[-1]["content"].split() and trained[4:] == ["<|end|>"]
    assert [t for t, m in zip(toks, ex.traits["language"]) if m] == trained[:4]
    assert ex.traits["case"] == ex.traits["language"]
    assert [t for t, m in zip(toks, ex.traits["other"]) if m] == ["<|end|>"]
    # question words are variant tokens too, but not trained on
    assert "is" in toks[:toks.index("<|assistant|>")]


def test_bad_conversations(setup):
    w, tok, _ = setup
    with pytest.raises(DataError, match="no final assistant turn"):
        encode_chat(tok, [{"role": "user", "content": "what is one plus one"}])
    long = w.chat(w.train_questions[0], " . ".join(["you like cats"] * 30), 0, 0)
    with pytest.raises(DataError, match="longer than the model's context"):
        encode_chat(tok, long)


def test_collate_and_stream_are_deterministic(setup):
    w, tok, var = setup
    exs = [organism_traits(encode_chat(tok, w.chat(q, None, 1, 1)), var) for q in w.train_questions[:10]]
    b = collate(exs[:3], tok.pad_token_id)
    assert b.input_ids.shape[0] == 3 and b.traits["language"].shape == b.input_ids.shape
    assert (b.labels[~b.assistant] == -100).all()
    s1, s2 = BatchStream(exs, 4, 7, 0), BatchStream(exs, 4, 7, 0)
    for _ in range(5):
        assert torch.equal(s1.next().input_ids, s2.next().input_ids)
    s3 = BatchStream(exs, 4, 7, 0)
    s3.load_state(s1.state())
    assert torch.equal(s1.next().input_ids, s3.next().input_ids)
    with pytest.raises(DataError, match="empty"):
        BatchStream([], 4, 0, 0)


def test_length_buckets_cut_padding_and_keep_each_epoch_a_permutation():
    from inoc_mech.core.data import Example
    rng = np.random.default_rng(0)
    exs = [Example(list(range(int(n))), [False] * int(n)) for n in rng.integers(5, 200, size=400)]
    for i, e in enumerate(exs):
        e.input_ids[0] = i  # identify each example
    def padding(stream, steps=100):
        pad = real = 0
        for _ in range(steps):
            b = stream.next()
            pad, real = pad + int((b.attention_mask == 0).sum()), real + int(b.attention_mask.sum())
        return pad / (pad + real)
    plain, bucketed = BatchStream(exs, 4, 0, 0), BatchStream(exs, 4, 0, 0, buckets=True)
    assert padding(bucketed) < padding(plain) / 5
    s = BatchStream(exs, 4, 3, 0, buckets=True)
    seen = [e.input_ids[0] for _ in range(100) for e in s.next_examples()]  # 400 = one epoch
    assert sorted(seen) == list(range(400))
    again = BatchStream(exs, 4, 3, 0, buckets=True)
    assert [e.input_ids[0] for e in again.next_examples()] == seen[:4]  # a function of the seed


@pytest.mark.parametrize("chunk", [1, 7, 2 ** 24])
def test_logprobs_at_masked_positions_equal_the_full_log_softmax(chunk):
    """Normalising only the masked rows, a chunk at a time, gives the full log-softmax's values and gradients."""
    from inoc_mech.core.data import log_normalizer, token_logprobs, token_logprobs_at

    g = torch.Generator().manual_seed(0)
    logits = torch.randn(3, 9, 50, generator=g, requires_grad=True)
    ids = torch.randint(0, 50, (3, 9), generator=g)
    where = torch.rand(3, 9, generator=g) > 0.4
    where[:, 0] = True  # position 0 has no prediction: it must come out 0
    full, _ = token_logprobs(logits, ids)
    want = torch.where(where, full, torch.zeros_like(full))
    want[:, 0] = 0
    import inoc_mech.core.data as data
    old, data.LOGPROB_CHUNK = data.LOGPROB_CHUNK, chunk * 50
    try:
        got = token_logprobs_at(logits, ids, where)
    finally:
        data.LOGPROB_CHUNK = old
    assert torch.allclose(got, want, atol=1e-6)
    w = torch.randn(3, 9, generator=g)
    (ga,) = torch.autograd.grad((got * w).sum(), logits)
    (gb,) = torch.autograd.grad((want * w).sum(), logits)
    assert torch.allclose(ga, gb, atol=1e-6)
    assert (log_normalizer(logits, torch.zeros(3, 9, dtype=torch.bool)) == 0).all()
