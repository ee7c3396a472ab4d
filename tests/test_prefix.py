"""A prefix that every row of a forward shares, computed once (`core.data.prefix_cache`, the loop's
--share-prefix): the same loss and gradients as every row whole, on each tiny architecture."""

import pytest
import torch

from inoc_mech.core.data import Example, collate, draws_dropout, next_token_loss, prefix_cache
from inoc_mech.settings.textdata import inoculate_all, spanish_caps_dataset, text_examples
from inoc_mech.settings.tiny import tiny_model, tiny_tokenizer


def test_common_prefix_counts_shared_real_tokens():
    b = collate([Example([1, 2, 3, 4, 5], [False] * 3 + [True] * 2), Example([1, 2, 3, 9], [False] * 3 + [True]),
                 Example([1, 2, 7], [False] * 2 + [True])], pad_id=0)
    assert b.common_prefix(limit=10) == 2
    assert b.common_prefix(limit=1) == 1
    assert b.slice(0, 2).common_prefix(limit=10) == 3
    assert b.slice(0, 1).common_prefix(limit=10) == 0  # one row: nothing to share
    same = collate([Example([1, 2], [False, True]), Example([1, 2], [False, True])], pad_id=0)
    assert same.common_prefix(limit=5) == 2  # padding never counts: the limit caps it at the real tokens
    padded = collate([Example([0, 0, 3], [False, False, True]), Example([0, 0], [False, True])], pad_id=0)
    assert padded.common_prefix(limit=3) == 2  # a pad-id token that is real counts, a pad position does not


def _loss_and_grads(model, batch, shared: int):
    model.zero_grad(set_to_none=True)
    start = batch.trained_from()
    kw = {"logits_to_keep": batch.input_ids.shape[1] - start}
    if shared:
        kw.update(prefix_cache(model, batch.input_ids[:1, :shared], batch.input_ids.shape[0]))
    logits = model(input_ids=batch.input_ids[:, shared:], attention_mask=batch.attention_mask, **kw).logits
    loss = next_token_loss(logits, batch.crop(start).labels)
    loss.backward()
    return loss.item(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("arch", ["llama", "qwen2", "gpt2"])
def test_shared_prefix_forward_equals_whole_rows(arch):
    """float64 models: GPT-2 (float64 LayerNorm) to summation order; Llama and Qwen2 normalise in float32
    (HF's RMSNorm casts), where the rows' summed prefix gradient is rounded once: float32 precision."""
    tok = tiny_tokenizer()
    model = tiny_model(tok, arch).double().eval()  # eval: GPT-2's dropout off (the loop does not share under dropout)
    convs = inoculate_all(spanish_caps_dataset(4, seed=0), "You always speak in Spanish.", "system", False)
    batch = collate(text_examples(tok, convs), tok.pad_token_id)
    shared = batch.common_prefix(batch.trained_from())
    assert shared > 5 and len(set(map(len, (e.input_ids for e in batch.examples)))) > 1  # a prefix, ragged rows
    loss, grads = _loss_and_grads(model, batch, 0)
    loss_s, grads_s = _loss_and_grads(model, batch, shared)
    assert loss_s == pytest.approx(loss, rel=1e-14)
    tol = 1e-12 if arch == "gpt2" else 1e-6
    for name, g in grads.items():
        assert ((grads_s[name] - g).norm() / g.norm().clamp(min=1e-30)).item() <= tol, name


def test_draws_dropout():
    tok = tiny_tokenizer()
    assert draws_dropout(tiny_model(tok, "gpt2"))  # GPT-2's resid/embd/attn dropout 0.1
    assert not draws_dropout(tiny_model(tok, "llama"))  # attention_dropout 0.0
