import pytest
import torch

from inoc_mech.core.data import BatchStream, encode_chat
from inoc_mech.core.names import group_name, module_name
from inoc_mech.core.data import token_logprobs
from inoc_mech.mechanism.hooks import GradientPressure, trait_losses
from inoc_mech.models.organism import factorize_head
from inoc_mech.models.world import organism_traits
from inoc_mech.settings.spanish_caps_organism import decomposition, loss_parts
from tests.conftest import organism_parts
from inoc_mech.core.runs import read_run
from inoc_mech.train import train


@pytest.fixture
def setup(tiny_organism):
    model, tok, world, _ = organism_parts(tiny_organism)
    table = world.variant_table(tok)
    factorize_head(model, table)
    var = set(table.ravel().tolist())
    exs = [organism_traits(encode_chat(tok, world.chat(q, p, 1, 1)), var)
           for q in world.train_questions[:8] for p in (None, "speak spanish")]
    batch = BatchStream(exs, 16, 0, tok.pad_token_id).next()
    return model, torch.as_tensor(table), batch


def forward(model, batch):
    return model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits


def test_loss_parts_sum_to_token_loss(setup):
    model, table, batch = setup
    logits = forward(model, batch)
    tok_lp, logp = token_logprobs(logits, batch.input_ids)
    parts = loss_parts(logits, batch.input_ids, table)
    var = batch.traits["language"]
    total = sum(parts.values())
    assert torch.allclose(total[var], -tok_lp[var], atol=1e-5)
    assert (total[batch.assistant & ~var] == 0).all()  # end tokens are not answer variants
    assert (parts["word"][var] >= 0).all() and (parts["language"][var] >= 0).all()


def test_masked_means_recombine_to_total(setup):
    model, table, batch = setup
    logits = forward(model, batch)
    c = trait_losses(logits, batch, decomposition(table))
    tok_lp, _ = token_logprobs(logits, batch.input_ids)
    lang, other = batch.traits["language"], batch.traits["other"]
    assert not (lang & other).any() and torch.equal(lang | other, batch.assistant)
    mean = lambda m: (-tok_lp * m).sum() / m.sum()
    total = (mean(lang) * lang.sum() + mean(other) * other.sum()) / batch.assistant.sum()
    ref = torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), batch.labels[:, 1:].flatten())
    assert torch.allclose(total, ref, rtol=1e-6) and torch.allclose(c["total"].sum(), ref, rtol=1e-6)
    parts = sum(c[f"part/{p}"].sum() for p in ("word", "language", "case", "interaction"))
    assert torch.allclose(parts + c["other"].sum(), ref, rtol=1e-5)


@pytest.mark.parametrize("trait", ["language", "case", "other"])
def test_trait_plus_rest_gradient_is_total(setup, trait):
    model, table, batch = setup
    params = [p for p in model.parameters() if p.requires_grad]
    c = trait_losses(forward(model, batch), batch, decomposition(table))
    g_total = torch.autograd.grad(c["total"].sum(), params, retain_graph=True)
    g_trait = torch.autograd.grad(c[trait].sum(), params, retain_graph=True, allow_unused=True)
    g_rest = torch.autograd.grad((c["total"] - c[trait]).sum(), params, allow_unused=True)
    num = den = 0.0
    for t, a, b in zip(g_total, g_trait, g_rest):
        a = torch.zeros_like(t) if a is None else a
        b = torch.zeros_like(t) if b is None else b
        num += ((a + b - t) ** 2).sum().item()
        den += (t ** 2).sum().item()
    assert (num / den) ** 0.5 < 1e-5
    assert sum((a ** 2).sum().item() for a in g_trait if a is not None) > 0


def test_recorder_measures_and_leaves_nothing_behind(setup):
    model, table, batch = setup
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    head = model.get_output_embeddings()
    with GradientPressure(model, opt, decomposition(table), log_every=1, grad_split_every=1) as rec:
        assert rec.update_norms()["update_norm/total"] == 0.0
        assert len(head._forward_hooks) == 1 and len(opt._optimizer_step_pre_hooks) == 1
        rec.start(0)
        loss = torch.nn.functional.cross_entropy(forward(model, batch)[:, :-1].flatten(0, 1), batch.labels[:, 1:].flatten())
        rec.measure(loss, batch)
        loss.backward()
        opt.step()
        m = rec.finish()
        assert rec.update_norms()["update_norm/total"] == pytest.approx(m["update_norm/total"])
    assert len(head._forward_hooks) == 0 and len(opt._optimizer_step_pre_hooks) == 0
    assert len(opt._optimizer_step_post_hooks) == 0
    assert m["update_norm/total"] > 0 and m["update_norm/total"] == pytest.approx(m["step_update_norm/total"])
    for t in ("language", "case"):
        assert 0 < m[f"grad_share/trait/{t}"] < 1 and -1 <= m[f"grad_cos/trait/{t}"] <= 1
        groups = [k for k in m if k.startswith(f"grad_norm/trait/{t}/")]
        assert sum(m[k] ** 2 for k in groups) == pytest.approx(m[f"grad_norm/trait/{t}"] ** 2, rel=1e-4)
    parts = sum(m[f"surprise/{p}"] for p in ("word", "language", "case", "interaction"))
    assert parts == pytest.approx(m["loss/trait/language"], rel=1e-5)


def test_hooks_do_not_change_training(make_cfg):
    from safetensors.torch import load_file
    a = train(make_cfg(name="with-hooks", inoculate=True), progress=False)
    b = train(make_cfg(name="no-hooks", inoculate=True, hooks=False), progress=False)
    wa, wb = load_file(a / "model/model.safetensors"), load_file(b / "model/model.safetensors")
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)
    assert "grad_norm/trait/language" in read_run(a)["metrics"][0]
    assert "grad_norm/trait/language" not in read_run(b)["metrics"][0]


# Golden gradient-pressure metrics at steps 0..2, inoculated, tiny organism (torch 2.13.0 CPU).
GOLDEN = [
    [0.3544369041919708, 0.8417849540710449, 7.22343111038208, 10.762846946716309, 0.9508180618286133,
     0.015398368239402771, 0.3765549659729004],
    [0.32660216093063354, 0.7634555697441101, 6.34547758102417, 10.685643196105957, 0.9407628774642944,
     0.029543057084083557, None],
    [0.3304995894432068, 0.7093720436096191, 6.580108642578125, 10.502538681030273, 0.930735170841217,
     0.04342762380838394, None]]


def test_golden_metrics(make_cfg):
    rows = read_run(train(make_cfg(name="golden-hooks", inoculate=True), progress=False))["metrics"]
    keys = ["surprise/language", "surprise/case", "grad_norm/trait/language", "grad_norm/trait/case",
            "grad_cos/trait/case", "update_norm/total", "elicit/language/gain"]
    got = [[r.get(k) for k in keys] for r in rows]
    assert len(got) == len(GOLDEN)
    for g, want in zip(got, GOLDEN):
        assert [x is None for x in g] == [x is None for x in want]  # elicitation only at step 0
        assert [x for x in g if x is not None] == pytest.approx([x for x in want if x is not None], rel=1e-4)


def test_names():
    assert module_name("model.layers.3.self_attn.q_proj.weight") == "blocks.3.attn.W_Q"
    assert module_name("model.layers.0.mlp.down_proj.weight") == "blocks.0.mlp.W_out"
    assert module_name("base_model.model.model.layers.2.self_attn.v_proj.lora_A.default.weight") == "blocks.2.attn.W_V.lora_A"
    assert module_name("lm_head.parametrizations.weight.original") == "unembed.W_U"
    assert module_name("lm_head.parametrizations.weight.0.case") == "unembed.factor_case"
    assert module_name("model.embed_tokens.weight") == "embed.W_E"
    assert group_name("model.layers.1.input_layernorm.weight") == "blocks.1.attn"
    assert group_name("model.layers.1.post_attention_layernorm.weight") == "blocks.1.mlp"
    assert group_name("model.norm.weight") == group_name("lm_head.weight") == "final"


def test_traits_take_turns_unless_split_all(make_cfg):
    rows = read_run(train(make_cfg(name="turns", steps=4, grad_split_every=2, grad_split_all=False),
                          progress=False))["metrics"]
    has = [{t for t in ("language", "case") if f"grad_norm/trait/{t}" in r} for r in rows]
    assert has == [{"language", "case"}, set(), {"case"}, set()]


def test_elicitation_in_micro_batches_equals_one_batch(setup):
    from inoc_mech.mechanism.hooks import elicitation
    from inoc_mech.settings.spanish_caps_organism import decomposition as dec
    model, table, batch = setup
    d = dec(table)
    whole = elicitation(model, batch, batch.slice(0, 16), d)
    chunked = elicitation(model, batch, batch.slice(0, 16), d, chunk_elements=3 * batch.input_ids.shape[1] * 131)
    assert whole.keys() == chunked.keys()
    assert [chunked[k] for k in whole] == pytest.approx([whole[k] for k in whole], rel=1e-5, abs=1e-6)
