"""Probes, TransformerLens loading, hooks, patching and weight alignment (fast, tiny organism)."""

import numpy as np
import pytest
import torch

from inoc_mech.models.world_eval import prompt_ids
from inoc_mech.mechanism.lens import hook_count, hooked, load_bridge, residuals, run_with_hooks
from inoc_mech.mechanism.patching import patch
from inoc_mech.settings.spanish_caps_organism import trait_log_odds, trait_share
from tests.conftest import organism_parts
from inoc_mech.mechanism.probes import N_ANSWER, fit_probe, probe_data
from inoc_mech.mechanism.weight_diff import alignment, output_matrices, random_share


@pytest.fixture(scope="module")
def lens(tiny_organism):
    return load_bridge(tiny_organism)


def chat_ids(lens, prompts=(None, "speak spanish", "use capitals . you like cats")):
    w = lens.world
    qs = w.held_out_questions[:4]
    rows = [prompt_ids(lens.tok, w.question_text(q), p) for p in prompts for q in qs]
    T = max(map(len, rows))
    return torch.tensor([r + [lens.tok.pad_token_id] * (T - len(r)) for r in rows])


# ---- probes ------------------------------------------------------------------------------------
def test_probe_recovers_planted_direction():
    g = torch.Generator().manual_seed(0)
    d, n = 32, 800
    u = torch.randn(d, generator=g)
    u /= u.norm()
    y = torch.randint(0, 2, (n,), generator=g)
    x = torch.randn(n, d, generator=g) + 5.0 + (2 * y[:, None] - 1) * 1.5 * u  # offset: centring must work
    p = fit_probe(x[:600], y[:600])
    assert torch.dot(p.direction, u).item() > 0.9
    assert p.accuracy(x[600:], y[600:]) > 0.9
    proj = p.project(x[600:])
    assert proj[y[600:] == 1].mean() > 0 > proj[y[600:] == 0].mean()
    assert p.separation == pytest.approx(3.0, rel=0.25)  # the planted class-mean distance along u
    shuffled = fit_probe(x[:600], y[torch.randperm(n, generator=g)][:600])
    assert shuffled.accuracy(x[600:], y[600:]) < 0.7  # no direction, no accuracy


def test_probe_data_points_at_the_token_before_each_answer_token(lens):
    w, tok = lens.world, lens.tok
    data = probe_data(w, tok, w.held_out_questions[:3], seed=0)
    assert len(data.input_ids) == 12  # 3 questions x 4 (language, case) combinations
    assert data.labels["language"].tolist() == [0, 0, 1, 1] * 3 and data.labels["case"].tolist() == [0, 1, 0, 1] * 3
    labels = {tok.convert_tokens_to_ids(t): v for t, v in w.variants.items()}
    assistant = tok.convert_tokens_to_ids("<|assistant|>")
    for i in range(len(data.input_ids)):
        pos = data.predict_pos[i]
        assert data.input_ids[i, pos[0]].item() == assistant
        nxt = [labels[data.input_ids[i, p + 1].item()] for p in pos.tolist()]
        assert [v.language for v in nxt] == [data.labels["language"][i].item()] * N_ANSWER
        assert [v.case for v in nxt] == [data.labels["case"][i].item()] * N_ANSWER


# ---- TransformerLens -----------------------------------------------------------------------------
def test_bridge_logprobs_equal_hf_logprobs(lens, tiny_organism):
    hf, _, _, _ = organism_parts(tiny_organism)  # a fresh HF model, not the one inside the bridge
    ids = chat_ids(lens)
    with torch.no_grad():
        ref = torch.log_softmax(hf(input_ids=ids).logits.float(), -1)
    got = run_with_hooks(lens.bridge, ids)
    assert got.shape == ref.shape
    assert (got - ref).abs().max().item() <= 1e-4
    r = residuals(lens.bridge, ids)
    assert r.shape == (lens.n_layers + 1, *ids.shape, lens.d_model)
    with torch.no_grad():
        assert torch.allclose(torch.log_softmax(lens.final(r[-1]).float(), -1), ref, atol=1e-4)


def test_hooks_are_gone_after_use(lens):
    ids = chat_ids(lens)
    clean = run_with_hooks(lens.bridge, ids)
    before = hook_count(lens.bridge)
    seen = []

    def zero(tensor, *, hook):
        seen.append(hook.name)
        return torch.zeros_like(tensor)

    with hooked(lens.bridge, [("blocks.0.hook_resid_post", zero)]):
        assert hook_count(lens.bridge) == before + 1
        inside = run_with_hooks(lens.bridge, ids)
    assert seen and not torch.allclose(inside, clean)  # the hook did act
    assert hook_count(lens.bridge) == before
    assert torch.equal(run_with_hooks(lens.bridge, ids), clean)
    with pytest.raises(KeyError):  # an exception inside the block still removes the hooks
        with hooked(lens.bridge, [("blocks.0.hook_resid_post", zero)]):
            raise KeyError("boom")
    assert hook_count(lens.bridge) == before
    assert torch.equal(run_with_hooks(lens.bridge, ids), clean)


# ---- patching ----------------------------------------------------------------------------------
def test_patching_a_model_into_itself_changes_nothing(lens):
    table = torch.as_tensor(lens.world.variant_table(lens.tok))
    ids = chat_ids(lens, prompts=(None,))
    r = patch(lens, lens, ids, lambda lp: trait_log_odds(lp, table, "language"))
    assert r.source == pytest.approx(r.target, abs=1e-6)
    np.testing.assert_allclose(r.resid, r.target, atol=1e-5)
    for site in r.components.values():
        assert site["all"] == pytest.approx(r.target, abs=1e-5) and site["last"] == pytest.approx(r.target, abs=1e-5)
    assert r.unembed == pytest.approx(r.target, abs=1e-5)


def test_patching_the_last_residual_gives_the_source_output(lens, tiny_organism):
    other = load_bridge(tiny_organism)
    with torch.no_grad():  # change a block (not the final norm or head) of the source
        w = output_matrices(other.model)  # copies; edit the live parameter instead
        for name, p in other.model.named_parameters():
            if name.replace("._original_component", "") == "model.layers.1.mlp.down_proj.weight":
                p.add_(torch.randn(p.shape, generator=torch.Generator().manual_seed(1)) * 0.5)
    assert not torch.equal(output_matrices(other.model)["blocks.1.mlp.W_out"], w["blocks.1.mlp.W_out"])
    table = torch.as_tensor(lens.world.variant_table(lens.tok))
    ids = chat_ids(lens, prompts=(None,))
    r = patch(lens, other, ids, lambda lp: trait_log_odds(lp, table, "language"))
    assert abs(r.source - r.target) > 1e-3
    assert r.resid[-1, -1] == pytest.approx(r.source, abs=1e-4)  # whole final state at the decision position
    assert r.resid[0, -1] == pytest.approx(r.target, abs=1e-5)  # embeddings are identical
    assert r.restored(r.resid)[-1, -1] == pytest.approx(1.0, abs=1e-3)
    assert np.abs(r.resid[-1, :-1] - r.target).max() < 1e-5  # earlier positions cannot reach the last logits


def test_trait_log_odds_and_share():
    table = torch.arange(8).reshape(2, 2, 2)  # ids [word, language, case]
    p = torch.full((1, 8), 1e-6)
    p[0, table[:, 1, 1]] = 0.3  # Spanish UPPER of both words
    p[0, table[:, 0, 0]] = 0.1  # English lower
    logp = torch.log(p / p.sum())
    assert trait_log_odds(logp, table, "language").item() == pytest.approx(np.log(3), abs=1e-4)
    assert trait_log_odds(logp, table, "case").item() == pytest.approx(np.log(3), abs=1e-4)
    assert trait_share(logp, table, "language").item() == pytest.approx(0.75, abs=1e-4)


# ---- weight alignment --------------------------------------------------------------------------
def test_weight_alignment_finds_a_planted_update():
    g = torch.Generator().manual_seed(0)
    u, v = torch.randn(64, generator=g), torch.randn(32, generator=g)
    u /= u.norm()
    along = alignment(torch.outer(u, v) * 0.1, u)
    assert along["share"] == pytest.approx(1.0, abs=1e-5) and along["top_cos"] == pytest.approx(1.0, abs=1e-5)
    w = torch.randn(64, generator=g)
    w -= (w @ u) * u
    assert alignment(torch.outer(u, v), w)["share"] == pytest.approx(0.0, abs=1e-5)
    noise = torch.randn(64, 32, generator=g)
    assert alignment(noise, u)["share"] == pytest.approx(random_share(64), rel=0.5)


def test_update_response_measures_what_an_update_reads():
    from inoc_mech.settings.tiny import tiny_model, tiny_tokenizer
    from inoc_mech.mechanism.weight_diff import update_response

    tok = tiny_tokenizer()
    pre = tiny_model(tok)
    ft = tiny_model(tok)
    ft.load_state_dict(pre.state_dict())
    ids = torch.randint(5, len(tok), (3, 6))
    mask = torch.ones_like(ids)
    same = update_response(pre, ft, {"a": (ids, mask)})
    assert same["a"]["total"] == 0  # no update, no response
    name = "model.layers.0.mlp.down_proj"
    w = dict(ft.named_modules())[name].weight
    with torch.no_grad():
        w.add_(torch.randn_like(w))
    r = update_response(pre, ft, {"a": (ids, mask)})["a"]
    assert r[name] > 0 and r["total"] == pytest.approx(r[name])
    assert all(v == 0 for k, v in r.items() if k not in (name, "total"))
