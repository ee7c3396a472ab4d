"""Probes, log-odds, patching and weight alignment on a real-model code path (tiny random-init Llama)."""

import numpy as np
import pytest
import torch

from inoc_mech.mechanism.lens import hook_count, load_bridge
from inoc_mech.mechanism.reply_probes import (N_POS, VARIANTS, fit_reply_probes, log_odds, patch_answer_start,
                                              probe_data, variant_batch, weight_alignment)
from inoc_mech.settings.textdata import sample_problems
from inoc_mech.settings.tiny import save_tiny


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny-probes")
    a = save_tiny(root / "a", arch="llama", seed=0)
    b = save_tiny(root / "b", arch="llama", seed=1)
    return load_bridge(a), load_bridge(b)


def test_probe_data_is_balanced_and_points_at_the_reply(tiny):
    lens, _ = tiny
    problems = sample_problems(3, 0, "train")
    d = probe_data(lens.tok, problems)
    assert len(d.input_ids) == 4 * len(problems)
    for t in ("language", "case"):
        assert d.labels[t].sum().item() == 2 * len(problems)  # each value in half of the chats
    assert (d.labels["language"] * 2 + d.labels["case"]).tolist() == list(range(4)) * len(problems)
    ids, mask, starts = variant_batch(lens.tok, problems)
    # the answer start is the last prompt token: the next one is the reply's first
    assert all(mask[i, starts[i] + 1] and not mask[i, starts[i]] for i in range(len(ids)))
    assert d.predict_pos.shape == (len(d.input_ids), N_POS)


def test_log_odds_match_the_hf_model(tiny):
    lens, _ = tiny
    problems = sample_problems(2, 0, "eval")
    ids, mask, _ = variant_batch(lens.tok, problems)
    got = log_odds(lens, ids, mask)
    from inoc_mech.core.data import token_logprobs_at
    with torch.no_grad():
        S = token_logprobs_at(lens.model(input_ids=ids).logits, ids, mask).sum(-1).unflatten(0, (-1, 2, 2))
    want = torch.logsumexp(S, -1)[:, 1] - torch.logsumexp(S, -1)[:, 0]
    assert torch.allclose(got["language"], want, atol=1e-4)
    assert len(VARIANTS) == 4


def test_patching_itself_changes_nothing_and_another_model_something(tiny):
    a, b = tiny
    problems = sample_problems(2, 0, "eval")
    same = patch_answer_start(a, a, a.tok, problems, [0, a.n_layers], progress=False)
    for t in ("language", "case"):
        assert np.allclose(same["patched"][t], same["target"][t], atol=1e-5)
    other = patch_answer_start(a, b, a.tok, problems, [0, a.n_layers], progress=False)
    assert any(abs(p - other["target"]["language"]) > 1e-6 for p in other["patched"]["language"])
    assert hook_count(a.bridge) == 0 and hook_count(b.bridge) == 0


def test_probes_and_alignment_shapes(tiny):
    a, b = tiny
    tp = fit_reply_probes(a, sample_problems(4, 0, "train"), sample_problems(2, 0, "eval"))
    assert len(tp.accuracy["language"]) == a.n_layers + 1
    assert all(0 <= x <= 1 for x in tp.accuracy["case"])
    w = weight_alignment(a, b, tp)
    assert len(w) == 2 * a.n_layers and all(0 <= v["language"]["share"] <= 1 for v in w.values())
    zero = weight_alignment(a, a, tp)  # no update: norm 0
    assert all(v["language"]["norm"] == 0 for v in zero.values())


def test_probe_text_analysis_on_tiny_runs(tmp_path):
    from analyses.probe_text import ProbeTextConfig, analyse
    from inoc_mech.core.cli import build
    from inoc_mech.train import TrainConfig, train

    model = save_tiny(tmp_path / "m", arch="llama")
    for ino in (False, True):
        train(build(TrainConfig, model=str(model), runs_dir=str(tmp_path / "runs"), steps=2, batch_size=2, n_train=8,
                    lora_r=4, eval_questions=2, eval_samples=1, max_new_tokens=4, elicit_examples=2, inoculate=ino,
                    name="inoculated-s0" if ino else "baseline-s0"), progress=False)
    cfg = ProbeTextConfig(paths=[str(tmp_path / "runs")], train_problems=4, test_problems=2, patch_problems=1,
                          patch_stride=1, png=False)
    s = analyse([tmp_path / "runs"], tmp_path / "fig", cfg)
    assert set(s["projections"]) == {"base", "baseline", "inoculated"}
    assert len(s["patching"]) == 1 and len(s["patching_boundaries"]) == s["n_layers"] + 1
    assert (tmp_path / "fig" / "summary.json").exists() and (tmp_path / "fig" / "patching.html").exists()
