import json
import math
import sys
from pathlib import Path

import pytest

from inoc_mech.core.cli import UserError
from inoc_mech.core.plots import browser_available
from inoc_mech.core.runs import is_complete
from inoc_mech.train import train

from analyses import gradient_pressure as gp
from inoc_mech.settings.spanish_caps_organism import SpanishCapsOrganism
from inoc_mech.studies.collect import find_runs


@pytest.fixture
def two_runs(make_cfg, runs_dir) -> list[Path]:
    """A baseline and an inoculated tiny run in one sweep-like folder (trained once per session)."""
    folder = runs_dir / "gp-sweep"
    runs = []
    for name, inoculate in (("baseline-s0", False), ("inoculated-s0", True)):
        run = folder / name
        if not is_complete(run):
            train(make_cfg(name=name, runs_dir=str(folder), inoculate=inoculate, steps=4, log_every=1,
                           grad_split_every=2), progress=False)
        runs.append(run)
    return runs


def first_row(run: Path) -> dict:
    return json.loads((run / "metrics.jsonl").read_text().splitlines()[0])


def no_prompt_t1(run: Path) -> dict:
    return json.loads((run / "eval.json").read_text())["contexts"]["none"]["t1"]


def same(a, b) -> bool:
    return (a is None and (b is None or math.isnan(b))) or a == pytest.approx(b, rel=1e-12, abs=0)


def test_analysis_writes_every_figure_and_reads_its_numbers_from_the_runs(two_runs, tmp_path):
    out = tmp_path / "fig"
    png = browser_available()
    gp.analyse([two_runs[0].parent], out, png=png, n_boot=50)
    for name in gp.FIGURES:
        assert (out / f"{name}.html").stat().st_size > 1000, name
        if png:
            assert (out / f"{name}.png").stat().st_size > 1000, name
    summary = json.loads((out / "summary.json").read_text())  # strict JSON: NaN written as null
    base, ino = two_runs
    b, i = summary["conditions"]["baseline"], summary["conditions"]["inoculated"]
    assert b["prompt"] is None and i["prompt"] == "speak spanish" and b["seeds"] == [0]
    for cond, run in ((b, base), (i, ino)):
        row, ev = first_row(run), no_prompt_t1(run)
        for part in ("language", "case", "word"):
            assert cond["step0"][f"surprise/{part}"]["values"] == [row[f"surprise/{part}"]]
        assert cond["elicit_gain"]["values"] == [row["elicit/language/gain"]]
        for k in ("spanish_rate", "caps_rate", "accuracy"):
            assert cond["outcome"][k]["values"] == [ev[k]]
            assert cond["outcome"][k]["mean"] == ev[k] and cond["outcome"][k]["n"] == 1
    # derived numbers: paired step-0 differences and rate ratios of exactly those values
    for t, key in (("language", "spanish_rate"), ("case", "caps_rate")):
        assert i["elicitation"][t]["values"] == [first_row(base)[f"surprise/{t}"] - first_row(ino)[f"surprise/{t}"]]
        base_rate = no_prompt_t1(base)[key]
        want = 1 - no_prompt_t1(ino)[key] / base_rate if base_rate > 0 else None
        assert same(i["suppression"][t]["values"][0], want)
    assert i["elicitation"]["language"]["values"][0] > 0  # "speak spanish" makes Spanish less surprising
    ctx = i["context"]
    assert -1 <= ctx["cosine"] < 1 and ctx["l2"] > 0 and ctx["n_questions"] > 0
    md = (out / "summary.md").read_text()
    assert 'inoculated: "speak spanish"' in md and f"{i['step0']['surprise/language']['mean']:.3g}" in md
    assert set(summary["spearman"]) >= {"Spanish suppression vs language elicitation",
                                        "CAPS generalisation vs context cosine"}


def test_missing_runs_stop_with_the_command_that_makes_them(two_runs, tmp_path):
    sweep = tmp_path / "half"
    sweep.mkdir()
    cmd = "python -m inoc_mech.studies.sweep --name half --seeds 0 1"
    (sweep / "sweep.json").write_text(json.dumps({"runs": ["baseline-s0", "baseline-s1"], "command": cmd}))
    (sweep / "baseline-s0").symlink_to(two_runs[0], target_is_directory=True)
    with pytest.raises(UserError, match="1 of 2 runs are missing") as e:
        find_runs([sweep])
    assert cmd in str(e.value) and "\n" not in str(e.value)
    assert find_runs([sweep], skip_missing=True) == [sweep / "baseline-s0"]
    with pytest.raises(UserError, match=r"python -m inoc_mech.studies.sweep --name nothing-here"):
        find_runs([tmp_path / "nothing-here"])


def test_mixed_organisms_are_refused(two_runs, tmp_path):
    other = tmp_path / "other"
    other.mkdir()
    for f in ("config.json", "metrics.jsonl", "eval.json", "COMPLETE"):
        (other / f).write_bytes((two_runs[1] / f).read_bytes())
    cfg = json.loads((other / "config.json").read_text())
    (other / "config.json").write_text(json.dumps({**cfg, "organism_folder": "elsewhere"}))
    with pytest.raises(UserError, match="differ in organism_folder"):
        gp.load_conditions([two_runs[0], other])


def test_co_learned_trait():
    spec = gp.Spec.of(SpanishCapsOrganism)
    assert spec.co_learned("speak spanish") == "case"
    assert spec.co_learned("be kind") == "case"
    assert spec.co_learned("use capitals") == "language"
    assert spec.co_learned("speak spanish . use capitals") is None


def test_without_a_browser_html_is_written_and_one_line_says_how(tmp_path, monkeypatch, capsys):
    import plotly.graph_objects as go

    from inoc_mech.core import plots

    def no_browser(*args, **kwargs):
        raise RuntimeError("Kaleido requires Google Chrome to be installed.\nmore detail")

    monkeypatch.setattr(plots.pio, "write_images", no_browser)
    written = plots.save_all({"a": go.Figure(), "b": go.Figure()}, tmp_path)
    assert written == [tmp_path / "a.html", tmp_path / "b.html"] and (tmp_path / "a.html").exists()
    assert not (tmp_path / "a.png").exists()
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "apt-get install chromium" in err
