"""The loop's forward layouts (`core.forward.step_logits`): a prefix every row shares computed once, and rows
packed without padding, give the logits, loss and gradients of every row whole, on each tiny architecture."""

import pytest
import torch

import inoc_mech.core.forward as fwd
from inoc_mech.core.data import Example, collate, next_token_loss
from inoc_mech.core.forward import LayoutCosts, choose_bins, draws_dropout, pack_rows, packable, step_logits
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


def test_pack_rows_first_fit_within_capacity():
    assert pack_rows([5, 5, 5], 10) == [[0, 1], [2]]
    assert pack_rows([8, 3, 2, 9], 10) == [[0, 2], [1], [3]]
    assert pack_rows([12, 1], 10) == [[0], [1]]  # a row longer than the capacity stands alone
    assert pack_rows([1, 12, 1], 10) == [[0, 2], [1]]


def test_choose_bins_packs_where_it_saves():
    flat = LayoutCosts(linear=1.0, attention=0.0)  # cost = tokens computed: packing ragged rows saves
    assert choose_bins([10, 10, 10], 2, flat) is None  # equal rows: nothing to save
    assert choose_bins([10, 6, 4], 2, flat) == [[0, 1, 2]]
    dear = LayoutCosts(linear=1.0, attention=1.0)  # attention dear: a long packed sequence costs more
    assert choose_bins([10, 6, 4], 2, dear) == [[0], [1, 2]]  # 2 x 8 x (1 + 2 + 8) = 176 < padded 264 < one of 14
    assert choose_bins([10, 10, 4], 2, dear) is None  # the short row has no partner within the longest row


def _batch(tok, n=4, prompt="You always speak in Spanish."):
    convs = spanish_caps_dataset(n, seed=0)
    if prompt:
        convs = inoculate_all(convs, prompt, "system", False)
    return collate(text_examples(tok, convs), tok.pad_token_id)


def _loss_and_grads(model, batch, shared: int, pack: bool):
    model.zero_grad(set_to_none=True)
    start = batch.trained_from()
    logits = step_logits(model, model, batch, "cpu", start, shared, LayoutCosts.of(model) if pack else None)
    crop = batch.crop(start)
    assert logits.shape[:2] == crop.input_ids.shape
    loss = next_token_loss(logits, crop.labels)
    loss.backward()
    where = crop.assistant  # the logits that the loss and the instruments read
    return loss.item(), logits.detach()[where], {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("arch,attn", [("llama", "sdpa"), ("llama", "eager"), ("qwen2", "sdpa"), ("gpt2", "sdpa")])
@pytest.mark.parametrize("share,pack", [(True, False), (False, True), (True, True)])
def test_layouts_equal_whole_rows(arch, attn, share, pack, monkeypatch):
    """float64 models: GPT-2 (float64 LayerNorm) to summation order; Llama and Qwen2 normalise in float32 (HF's
    RMSNorm casts, and eager attention takes its softmax in float32), where a summed prefix gradient or a value
    computed in another layout is rounded: float32 precision."""
    tok = tiny_tokenizer()
    model = tiny_model(tok, arch).double().eval()  # eval: GPT-2's dropout off (the loop shares no prefix under dropout)
    model.config._attn_implementation = attn
    assert packable(model)
    batch = _batch(tok)
    shared = batch.common_prefix(batch.trained_from()) if share else 0
    assert (shared > 5) == share and len(set(batch.attention_mask.sum(1).tolist())) > 1  # a prefix, ragged rows
    loss, logits, grads = _loss_and_grads(model, batch, 0, False)
    tol = 1e-12 if arch == "gpt2" else 1e-6  # Llama's eager attention also takes its softmax in float32
    # packed as one sequence, in pairs (the prefix repeated over the sequences) and one row per sequence
    for bins in ([[0, 1, 2, 3]], [[0, 1], [2, 3]], [[0], [1], [2], [3]]) if pack else (None,):
        monkeypatch.setattr(fwd, "choose_bins", lambda *a, bins=bins: bins)
        loss_l, logits_l, grads_l = _loss_and_grads(model, batch, shared, pack)
        assert loss_l == pytest.approx(loss, rel=tol)
        assert torch.allclose(logits_l, logits, rtol=tol, atol=tol)
        for name, g in grads.items():
            assert ((grads_l[name] - g).norm() / g.norm().clamp(min=1e-30)).item() <= tol, name


def test_draws_dropout_and_packable():
    tok = tiny_tokenizer()
    assert draws_dropout(tiny_model(tok, "gpt2"))  # GPT-2's resid/embd/attn dropout 0.1
    llama = tiny_model(tok, "llama")
    assert not draws_dropout(llama) and packable(llama)  # attention_dropout 0.0
    llama.config.sliding_window = 16
    assert not packable(llama)  # the packed mask has no window
