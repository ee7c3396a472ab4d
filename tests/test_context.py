import pytest
import torch

from inoc_mech.mechanism.context import answer_start_states, context_distances


def test_answer_start_state_is_the_last_real_token(tiny_organism):
    from inoc_mech.core.data import right_pad
    from inoc_mech.models.world_eval import prompt_ids
    from tests.conftest import organism_parts

    model, tok, world, _ = organism_parts(tiny_organism)
    q = world.question_text(world.held_out_questions[0])
    short, long = prompt_ids(tok, q, None), prompt_ids(tok, q, "you always speak in spanish")
    both = answer_start_states(model, *right_pad([short, long], tok.pad_token_id))  # right-padded batch
    assert both.shape[:2] == (model.config.num_hidden_layers + 1, 2)
    for row, ids in zip(both[-1], (short, long)):
        alone = model(input_ids=torch.tensor([ids]), output_hidden_states=True).hidden_states[-1][0, -1]
        assert torch.allclose(row, alone, atol=1e-5)
    assert not torch.allclose(both[-1, 0], both[-1, 1])
    assert torch.allclose(both[0, 0], both[0, 1])  # embeddings of the same last token (<|assistant|>)
    d = context_distances(str(tiny_organism), ["speak spanish", "you like dogs"])
    assert d["speak spanish"]["cosine"] < d["you like dogs"]["cosine"]  # an instruction moves the state more


def test_trait_log_odds_follow_the_prompt(tiny_organism):
    from inoc_mech.mechanism.context import trait_log_odds
    from inoc_mech.settings.load import load

    loaded = load(tiny_organism)
    model, tok, world = loaded.model, loaded.tok, loaded.setting.world
    none = trait_log_odds(loaded, None)
    es = trait_log_odds(loaded, "speak spanish")
    up = trait_log_odds(loaded, "use capitals")
    assert es["language"] > none["language"] and up["case"] > none["case"]
    # the value is a log-odds over all answer variants: check one question by hand
    q = world.held_out_questions[:1]
    from inoc_mech.models.world_eval import prompt_ids
    ids = torch.tensor([prompt_ids(tok, world.question_text(q[0]), None)])
    p = model(input_ids=ids).logits[0, -1].softmax(-1)
    table = torch.as_tensor(world.variant_table(tok))
    expect = (p[table[:, 1]].sum() / p[table[:, 0]].sum()).log().item()
    assert trait_log_odds(loaded, None, q)["language"] == pytest.approx(expect, abs=1e-4)


def test_prompt_direction_shift_is_zero_for_the_pretrained_model_and_reads_runs(make_cfg, tiny_organism, tmp_path):
    """The pretrained model has not moved (0 along, 0 total); a baseline run that learned Spanish moved along
    "speak spanish" more than the inoculated run; analyses/trait_shift.py tables the runs of a folder."""
    from analyses.trait_shift import main
    from inoc_mech.mechanism.context import prompt_direction_shift
    from inoc_mech.train import train

    runs = {}
    for name, ino in (("baseline-s0", False), ("inoculated-s0", True)):
        runs[name] = train(make_cfg(steps=20, lr=3e-3, inoculate=ino, name=name, runs_dir=str(tmp_path / "sw"),
                                    log_every=10, grad_split_every=0), progress=False)
    res = prompt_direction_shift(tiny_organism, {"self": tiny_organism, **runs}, "speak spanish")
    import math
    assert math.isnan(res["direction_norm"][0]) and math.isnan(res["runs"]["baseline-s0"]["total"][0])  # same last token
    assert res["runs"]["self"]["along"][1:] == [0.0] * (len(res["direction_norm"]) - 1)
    assert max(res["runs"]["self"]["total"][1:]) == 0 and res["prompt_cosine"][-1] > 0.5
    b, i = res["runs"]["baseline-s0"]["along"][-1], res["runs"]["inoculated-s0"]["along"][-1]
    assert b > i and b > 0.2, (b, i)
    main([str(tmp_path / "sw"), "--out", str(tmp_path / "fig"), "--no-png"])
    md = (tmp_path / "fig" / "trait_shift.md").read_text()
    assert "direction of 'speak spanish'" in md and "| baseline | 1 |" in md and "| inoculated | 1 |" in md
