import json
from pathlib import Path

import pytest

from inoc_mech.core.cli import UserError
from inoc_mech.train import train

from analyses import selectivity


def test_collect_reads_rates_from_the_runs(make_cfg, tmp_path):
    root = tmp_path / "sel"
    for o in (0, 1, 2):
        for cond, prompt in (("inoculated", "speak spanish"), ("converse", "use capitals")):
            train(make_cfg(runs_dir=str(root / f"factored-o{o}-default"), name=f"{cond}-s0", inoculate=True,
                           prompt=prompt, steps=1), progress=False)
    data = selectivity.collect(root)
    rows = data[("factored", "default")]
    assert [r["organism"] for r in rows["inoculated"]] == [0, 1, 2]
    ev = json.loads((root / "factored-o1-default/converse-s0/eval.json").read_text())
    assert rows["converse"][1]["caps_rate"] == ev["contexts"]["none"]["t1"]["caps_rate"]
    md = selectivity.table(data)
    assert "| factored | default | 3 (3) |" in md
    selectivity.add_log_odds(data)
    r = rows["inoculated"][0]
    assert r["transfer"] == pytest.approx(r["shift"]["none"]["case"] / r["shift"]["prompt"]["case"])
    assert r["reach"] > 0 and set(r["shift"]) == {"none", "prompt"}
    assert "| factored | default | 3 |" in selectivity.log_odds_table(data)
    fig = selectivity.frontier(data)
    assert len(fig.data) == 2  # one family (full finetuning, 1 step), both panels
    assert len(selectivity.figure(data).data) == 8  # 4 criteria x (bars, seeds)


def test_target_rule():
    good_i = [{"spanish_rate": 0.05, "caps_rate": 0.9}] * 3
    good_c = [{"spanish_rate": 0.9, "caps_rate": 0.05}] * 3
    assert selectivity.meets({"inoculated": good_i, "converse": good_c})
    assert not selectivity.meets({"inoculated": good_i[:2], "converse": good_c})  # fewer than 3 seeds
    assert not selectivity.meets({"inoculated": [{"spanish_rate": 0.05, "caps_rate": 0.7}] * 3, "converse": good_c})


def test_empty_root_is_a_clear_error(tmp_path):
    with pytest.raises(UserError, match="no complete selectivity sweeps"):
        selectivity.collect(tmp_path)
