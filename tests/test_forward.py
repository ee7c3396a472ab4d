"""The loop's forward layouts (`core.forward.step_logits`): a prefix every row shares computed once, and rows
packed without padding, give the logits, loss and gradients of every row whole, on each tiny architecture."""

import pytest
import torch

import inoc_mech.core.forward as fwd
from inoc_mech.core.data import Example, collate, next_token_loss
from inoc_mech.core.forward import (ATTENTION_ONLY, LayoutCosts, choose_bins, draws_dropout, pack_rows, packable,
                                   shareable, step_logits)
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
    assert choose_bins([10, 10, 10], 2, 2, flat) is None  # equal rows: nothing to save
    assert choose_bins([10, 6, 4], 2, 2, flat) == [[0, 1, 2]]
    dear = LayoutCosts(linear=1.0, attention=1.0)  # attention dear: a long packed sequence costs more
    assert choose_bins([10, 6, 4], 2, 2, dear) == [[0], [1, 2]]  # 2 x 8 x (1 + 2 + 8) = 176 < padded 264 < one of 14
    assert choose_bins([10, 10, 4], 2, 2, dear) is None  # the short row has no partner within the longest row
    # the head: at the 8 padded slots of one sequence, at the union of the slots (8 columns) in each of two
    assert choose_bins([10, 6, 4], 2, 2, LayoutCosts(linear=1.0, attention=1.0, head=5.0)) == [[0], [1, 2]]  # 256 < 278
    assert choose_bins([10, 6, 4], 2, 2, LayoutCosts(linear=1.0, attention=1.0, head=10.0)) == [[0, 1, 2]]  # 318 < 336
    assert choose_bins([10, 6, 4], 2, 6, LayoutCosts(linear=1.0, attention=1.0, head=10.0)) == [[0], [1, 2]]  # 4 slots


def _batch(tok, n=4, prompt="You always speak in Spanish."):
    convs = spanish_caps_dataset(n, seed=0)
    if prompt:
        convs = inoculate_all(convs, prompt, "system", False)
    return collate(text_examples(tok, convs), tok.pad_token_id)


def _loss_and_grads(model, batch, shared: int, pack: bool):
    model.zero_grad(set_to_none=True)
    start = batch.trained_from()
    logits = step_logits(model, model, batch, batch, start, shared, LayoutCosts.of(model) if pack else None)
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
    model = tiny_model(tok, arch).double()
    for m in model.modules():  # GPT-2's dropout off (the loop uses neither layout for a model that draws dropout)
        if isinstance(m, torch.nn.Dropout):
            m.p = 0.0
    model.config._attn_implementation = attn
    assert packable(model)
    batch = _batch(tok)
    shared = batch.common_prefix(batch.trained_from()) if share else 0
    assert (shared > 5) == share and len(set(batch.attention_mask.sum(1).tolist())) > 1  # a prefix, ragged rows
    loss, logits, grads = _loss_and_grads(model, batch, 0, False)
    tol = 1e-12 if arch == "gpt2" else 1e-6  # Llama's eager attention also takes its softmax in float32
    # packed as one sequence, in pairs (the prefix repeated over the sequences) and one row per sequence
    packed = []
    real_packed = fwd._packed
    monkeypatch.setattr(fwd, "_packed", lambda *a: packed.append(a[-1]) or real_packed(*a))
    for bins in ([[0, 1, 2, 3]], [[0, 1], [2, 3]], [[0], [1], [2], [3]]) if pack else (None,):
        monkeypatch.setattr(fwd, "choose_bins", lambda *a, bins=bins: bins)
        loss_l, logits_l, grads_l = _loss_and_grads(model, batch, shared, pack)
        assert packed[-1:] == ([bins] if pack else [])  # the packed layout ran, with these sequences
        assert loss_l == pytest.approx(loss, rel=tol)
        assert torch.allclose(logits_l, logits, rtol=tol, atol=tol)
        for name, g in grads.items():
            assert ((grads_l[name] - g).norm() / g.norm().clamp(min=1e-30)).item() <= tol, name


def _tiny_of_type(tok, model_type: str):
    """A random-init float64 model of `model_type` (2 layers, width 32) for `tok`, from transformers' own config."""
    from transformers import AutoConfig, AutoModelForCausalLM

    torch.manual_seed(0)
    kw = dict(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, max_position_embeddings=256, pad_token_id=tok.pad_token_id)
    if model_type == "gpt2":
        kw = dict(vocab_size=len(tok), n_embd=32, n_layer=2, n_head=4, n_positions=256)
    config = AutoConfig.for_model(model_type, **kw)
    for off in ("sliding_window", "hidden_dropout", "attention_dropout", "resid_pdrop", "embd_pdrop", "attn_pdrop"):
        if getattr(config, off, None):
            setattr(config, off, None if off == "sliding_window" else 0.0)
    config._attn_implementation = "sdpa"
    return AutoModelForCausalLM.from_config(config).double()


@pytest.mark.parametrize("model_type", sorted(ATTENTION_ONLY))
def test_every_listed_architecture_packs_to_whole_rows(model_type, monkeypatch):
    """`ATTENTION_ONLY` is what has been tested: each type's shared prefix and packed sequences (2 of 2 rows)
    give the logits and gradients of whole rows (float64 weights; float32 rounding where the model normalises
    in float32)."""
    tok = tiny_tokenizer()
    model = _tiny_of_type(tok, model_type)
    assert shareable(model) and packable(model), model_type
    batch = _batch(tok)
    shared = batch.common_prefix(batch.trained_from())
    loss, logits, grads = _loss_and_grads(model, batch, 0, False)
    monkeypatch.setattr(fwd, "choose_bins", lambda *a: [[0, 3], [1, 2]])
    loss_l, logits_l, grads_l = _loss_and_grads(model, batch, shared, True)
    assert loss_l == pytest.approx(loss, rel=1e-6)
    assert torch.allclose(logits_l, logits, rtol=1e-6, atol=1e-6)
    for name, g in grads.items():
        assert ((grads_l[name] - g).norm() / g.norm().clamp(min=1e-30)).item() <= 1e-6, (model_type, name)


def test_layouts_only_where_they_are_the_same_computation():
    tok = tiny_tokenizer()
    assert draws_dropout(tiny_model(tok, "gpt2"))  # GPT-2's resid/embd/attn dropout 0.1
    assert not shareable(tiny_model(tok, "gpt2")) and not packable(tiny_model(tok, "gpt2"))
    llama = tiny_model(tok, "llama")
    assert not draws_dropout(llama) and shareable(llama) and packable(llama)  # attention_dropout 0.0
    llama.config.sliding_window = 16
    assert not packable(llama) and not shareable(llama)  # the packed mask has no window
    llama.config.sliding_window = None
    llama.config.layer_types = ["full_attention", "sliding_attention"]
    assert not packable(llama)
    llama.config.layer_types = ["full_attention", "full_attention"]
    llama.config.rope_parameters = {"rope_type": "dynamic", "factor": 2.0, "rope_theta": 10000.0}
    assert not shareable(llama)  # frequencies from the longest position of each forward: a prefix alone differs
    llama.config.rope_parameters = {"rope_type": "default", "rope_theta": 10000.0}
    assert packable(llama)
    llama.config._attn_implementation = "flash_attention_2"
    assert shareable(llama) and not packable(llama)  # no 4D mask
    llama.config._attn_implementation = "sdpa"
    llama.config.model_type = "lfm2"  # convolution layers: a mask does not isolate packed rows, a cache is not all
    assert not shareable(llama) and not packable(llama)
