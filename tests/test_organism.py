
import pytest
import torch

from inoc_mech.models.organism import (OrganismConfig, build_model, factorize_head, materialize_head,
                                pretrain)
from inoc_mech.models.world import World
from tests.conftest import TINY_ORGANISM


def test_factored_head_round_trip():
    w = World()
    tok = w.build_tokenizer()
    table = w.variant_table(tok)
    model = build_model(OrganismConfig(**TINY_ORGANISM), tok)
    factorize_head(model, table, init_from_weight=False)
    head = model.get_output_embeddings()
    W = head.weight.detach().clone()
    # variant rows are word + language + case
    f = head.parametrizations.weight[0]
    c = w.variants["SIETE"]
    expect = f.word[c.word] + f.language[c.language] + f.case[c.case]
    assert torch.allclose(W[tok.convert_tokens_to_ids("SIETE")], expect)
    x = torch.tensor([[1, 4, 20, 21, 6, 5]])
    before = model(input_ids=x).logits
    materialize_head(model)
    assert not hasattr(head, "parametrizations")
    assert torch.equal(model(input_ids=x).logits, before)
    # re-factorising a materialised head recovers the same rows (least squares is exact here)
    factorize_head(model, table, init_from_weight=True)
    assert torch.allclose(model.get_output_embeddings().weight, W, atol=1e-5)


def test_pretraining_is_deterministic(tmp_path):
    cfg = OrganismConfig(**{**TINY_ORGANISM, "steps": 6}, cache=str(tmp_path))
    a, *_ = pretrain(cfg, progress=False)
    b, *_ = pretrain(cfg, progress=False)
    for (n, p), (_, q) in zip(a.named_parameters(), b.named_parameters()):
        assert torch.equal(p, q), n


def test_cached_organism_is_plain_hf_folder(tiny_organism):
    assert (tiny_organism / "model.safetensors").exists() and (tiny_organism / "COMPLETE").exists()
    from tests.conftest import organism_parts
    model, tok, world, meta = organism_parts(tiny_organism)
    assert type(model).__name__ == "LlamaForCausalLM"
    assert meta["config"]["d_model"] == 32 and "report" in meta
    rep = meta["report"]
    assert set(rep["prompt_following"]) >= {"speak spanish", "use capitals"}
    assert 0 <= rep["held_out_accuracy_greedy"] <= 1


def test_config_validation():
    with pytest.raises(ValueError, match="--head"):
        OrganismConfig(head="weird")
    with pytest.raises(ValueError, match="divisible"):
        OrganismConfig(d_model=30, n_heads=4)


def test_design_fields_added_later_keep_old_cache_keys():
    # the key of a default organism must not change when design switches are added (cached organisms stay valid)
    assert OrganismConfig(seed=0).key() == "68886ceb60"
    assert OrganismConfig(seed=0, bias=True).key() != OrganismConfig(seed=0).key()


def test_bias_switch_adds_biases():
    tok = World().build_tokenizer()
    names = {n for n, _ in build_model(OrganismConfig(**TINY_ORGANISM, bias=True), tok).named_parameters()}
    plain = {n for n, _ in build_model(OrganismConfig(**TINY_ORGANISM), tok).named_parameters()}
    assert not any(n.endswith(".bias") for n in plain)
    assert {"model.layers.0.self_attn.q_proj.bias", "model.layers.0.mlp.down_proj.bias"} <= names
