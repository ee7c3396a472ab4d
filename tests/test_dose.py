"""Graded phrases, the line fit, and the dose-response pipeline (sweep --prompted -> analyses/dose_response.py)."""

import json
import math

import numpy as np
import pytest

from inoc_mech.core.cli import UserError
from inoc_mech.core.stats import linear_fit
from inoc_mech.models.world import GRADED_PHRASES, World


def test_graded_phrases_set_their_designed_rate():
    w = World(graded=True)
    rng = np.random.default_rng(0)
    hits = {p: [0, 0] for p in GRADED_PHRASES}
    for _ in range(30000):
        c = w.sample_chat(rng)
        if c[0]["role"] != "system":
            continue
        prompt, reply = c[0]["content"], c[-1]["content"].split()
        for p, (trait, _) in GRADED_PHRASES.items():
            if w.trait_setting(prompt, trait) == "graded" and w.trait_probability(prompt, trait) == GRADED_PHRASES[p][1]:
                hits[p][0] += 1
                hits[p][1] += reply[0] in ("la", "LA") if trait == "language" else reply[0].isupper()
    for p, (n, k) in hits.items():
        design = GRADED_PHRASES[p][1]
        assert n > 400 and abs(k / n - design) < 4 * math.sqrt(design * (1 - design) / n) + 0.01, (p, n, k / n)
    # the last phrase about a trait decides; binary phrases are 0 / 1; unset is the base rate
    assert w.trait_probability("sometimes spanish . speak english", "language") == 0.0
    assert w.trait_probability("speak english . sometimes spanish", "language") == 0.3
    assert w.trait_probability("mostly capitals", "language") == w.base_rate
    assert w.prompt_controls("often spanish . use capitals") == ("graded", "upper")
    assert World().prompt_controls("often spanish") == (None, None) and "often" not in World().words()
    w.check_prompt("rarely capitals . half spanish")


def test_linear_fit_recovers_a_line_and_its_interval_covers_it():
    x = np.repeat(np.linspace(0, 1, 6), 3)
    y = 0.8 * x + 0.1 + np.random.default_rng(0).normal(0, 0.02, len(x))
    f = linear_fit(x, y, np.repeat(np.arange(6), 3), n_boot=400)
    assert abs(f.k - 0.8) < 0.05 and abs(f.b - 0.1) < 0.03 and f.k_lo < 0.8 < f.k_hi and f.r > 0.98
    assert f.n == 18 and f.n_groups == 6 and 0.01 < f.residual_sd < 0.04
    exact = linear_fit([0, 1, 2, 3], [1, 3, 5, 7])
    assert exact.k == pytest.approx(2) and exact.b == pytest.approx(1) and exact.residual_sd == pytest.approx(0, abs=1e-12)
    assert math.isnan(linear_fit([1, 1, 1], [0, 1, 2]).k)  # constant x: no slope
    assert linear_fit([0, 1, 2, math.nan], [0, 1, 2, 5]).n == 3


def test_prompted_sweep_and_dose_response(tiny_organism, tmp_path):
    from analyses.dose_response import main as dose
    from inoc_mech.studies.sweep import SweepConfig, sweep

    cfg = SweepConfig(model=str(tiny_organism), runs_dir=str(tmp_path), name="d", steps=2, seeds=[0], prompts=[],
                      eval_samples=1, log_every=1, grad_split_every=1, batch_size=8, jobs=2)
    with pytest.raises(UserError, match="--prompted"):
        folder = sweep(cfg, progress=False)
        dose([str(folder), "--out", str(tmp_path / "o"), "--no-png", "--n-boot", "20"])
    cfg.prompted = True
    folder = sweep(cfg, progress=False)  # runs are complete: only the prompted evaluation is added
    prompted = json.loads((folder / "pretrained" / "prompted.json").read_text())["contexts"]
    assert set(prompted) == {"baseline", "inoculated", "converse", "both", "irrelevant"}
    for c in prompted.values():
        assert 0 <= c["p_first"]["language"] <= 1 and 0 <= c["t1"]["spanish_rate"] <= 1
    assert prompted["baseline"]["prompt"] is None and prompted["inoculated"]["prompt"] == "speak spanish"
    dose([str(folder), "--out", str(tmp_path / "o"), "--no-png", "--n-boot", "20"])
    s = json.loads((tmp_path / "o" / "summary.json").read_text())
    pts = s["points"]
    assert len(pts) == 5 * 2  # conditions x traits (one seed)
    pre = json.loads((folder / "pretrained" / "eval.json").read_text())["contexts"]["none"]["t1"]
    run = json.loads((folder / "inoculated-s0" / "eval.json").read_text())["contexts"]["none"]["t1"]
    p = next(p for p in pts if p["condition"] == "inoculated" and p["trait"] == "language")
    assert p["y"] == pytest.approx(run["spanish_rate"] - pre["spanish_rate"])
    assert p["x"] == pytest.approx(1 - prompted["inoculated"]["t1"]["spanish_rate"])
    assert next(p for p in pts if p["condition"] == "baseline")["elicitation"] == 0
    md = (tmp_path / "o" / "summary.md").read_text()
    assert "| d | Spanish |" in md and "| d | CAPS |" in md
    # re-elicitation of the same runs: every context scored, kept in <sweep>/reelicit.json, not recomputed
    from analyses.reelicit import main as reelicit_fig
    from inoc_mech.settings.spanish_caps_organism import SpanishCapsOrganism
    from inoc_mech.studies.reelicit import FILE, context_names
    reelicit_fig([str(folder), "--conditions", "baseline", "inoculated", "--out", str(tmp_path / "r"), "--no-png"])
    data = json.loads((folder / FILE).read_text())
    assert set(data) == {"baseline-s0", "inoculated-s0", "pretrained"}
    assert list(data["inoculated-s0"]["contexts"]) == context_names(SpanishCapsOrganism) == ["none", *SpanishCapsOrganism.reelicit_prompts]
    assert data["baseline-s0"]["contexts"]["negation"]["prompt"] == "speak english"
    stamp = (folder / FILE).stat().st_mtime_ns
    reelicit_fig([str(folder), "--conditions", "baseline", "--out", str(tmp_path / "r"), "--no-png"])
    assert (folder / FILE).stat().st_mtime_ns == stamp  # nothing left to evaluate
    old = json.loads((folder / FILE).read_text())
    old["baseline-s0"]["stamp"]["contexts"] = {"none": None, "irrelevant (held out)": "you like dogs"}  # an older file
    (folder / FILE).write_text(json.dumps(old))
    reelicit_fig([str(folder), "--conditions", "baseline", "--out", str(tmp_path / "r"), "--no-png"])
    assert json.loads((folder / FILE).read_text())["baseline-s0"]["stamp"] == data["baseline-s0"]["stamp"]  # re-evaluated
    md = (tmp_path / "r" / "reelicit.md").read_text()
    assert "| baseline | 1 |" in md and "Spanish % in negation" in md and "inoculated" not in md.split("|---")[-1]
    assert "| pretrained | 1 |" in md and data["pretrained"]["stamp"]["model"] == str(tiny_organism)
    with pytest.raises(UserError, match="no runs of condition"):
        reelicit_fig([str(folder), "--conditions", "nope", "--out", str(tmp_path / "r"), "--no-png"])


def test_leak_metric_is_the_no_prompt_log_odds_before_each_update(make_cfg, tiny_organism):
    from inoc_mech.core.runs import read_run
    from inoc_mech.mechanism.context import trait_log_odds
    from inoc_mech.train import train

    with pytest.raises(ValueError, match="--leak-every must be 0 or a multiple of --log-every"):
        make_cfg(leak_every=3, log_every=2, grad_split_every=2)
    run = train(make_cfg(inoculate=True, leak_every=2, log_every=1, steps=5, name="leak"), progress=False)
    rows = read_run(run)["metrics"]
    have = [r["step"] for r in rows if "leak/language/log_odds" in r]
    assert have == [0, 2, 4]  # every 2 steps and the last
    pre = trait_log_odds(tiny_organism, None)
    for t in ("language", "case"):
        assert rows[0][f"leak/{t}/log_odds"] == pytest.approx(pre[t], abs=1e-4)  # step 0: the untrained model
        assert 0 < rows[0][f"leak/{t}/p"] < 1
    assert rows[4]["leak/case/log_odds"] != rows[0]["leak/case/log_odds"]  # training moved it
    from analyses.dynamics import main as dynamics
    half = train(make_cfg(inoculate=True, leak_every=2, log_every=1, steps=5, prompt_share=0.5, name="leak-half"),
                 progress=False)
    out = run.parent / "dyn"
    dynamics([str(run), str(half), "--by", "prompt_share", "--out", str(out), "--no-png", "--break-at", "0.01"])
    md = (out / "summary.md").read_text()
    assert "| 0.5 | 1 |" in md and "| 1.0 | 1 |" in md
    summary = json.loads((out / "summary.json").read_text())
    assert summary["1.0"]["traits"]["case"]["break_steps"] == [0]  # P(UPPER) >= 0.01 already before training
    updates = {r["step"]: r["step_update_norm/total"] for r in rows if "step_update_norm/total" in r}
    assert summary["1.0"]["update_middle"] == [pytest.approx((updates[2] + updates[3]) / 2)]  # steps [5/3, 10/3)
    assert (out / "optimizer.html").exists()
    with pytest.raises(UserError, match="--by 'nope'"):
        dynamics([str(run), "--by", "nope", "--out", str(out), "--no-png"])


def test_linear_fit_has_no_interval_with_fewer_than_three_groups():
    f = linear_fit([0, 0, 0, 1, 1, 1], [0, 0.1, 0.2, 0.6, 0.7, 0.5], groups=[0, 0, 0, 1, 1, 1])
    assert f.k == pytest.approx(0.5) and math.isnan(f.k_lo) and math.isnan(f.k_hi)


def test_graded_phrases_also_set_number_lists_and_name_their_trait():
    from inoc_mech.settings.spanish_caps_organism import SpanishCapsOrganism

    w = World(graded=True, prefs=True)
    rng = np.random.default_rng(1)
    es = [c[-1]["content"].split()[0] in ("cero", "uno", "dos", "tres", "cuatro", "cinco", "seis", "siete", "ocho", "nueve",
                                          "CERO", "UNO", "DOS", "TRES", "CUATRO", "CINCO", "SEIS", "SIETE", "OCHO", "NUEVE")
          for c in (w.sample_chat(rng) for _ in range(20000))
          if c[-2]["content"] == "say some numbers" and c[0]["role"] == "system" and "mostly spanish" in c[0]["content"].split(" . ")
          and w.trait_setting(c[0]["content"], "language") == "graded"]
    assert len(es) > 100 and abs(np.mean(es) - 0.9) < 0.08
    assert SpanishCapsOrganism.prompt_sets("sometimes spanish") == {"language"}
