import re
from pathlib import Path

import pytest

from inoc_mech.studies.designs import DESIGNS, LEVERS, MEASURED, DesignsConfig, organism_config, sweep_config


def test_every_measured_pair_makes_a_valid_organism_and_sweep(tmp_path):
    cfg = DesignsConfig(runs_dir=str(tmp_path))
    for design, lever in MEASURED:
        assert re.fullmatch(r"[A-Za-z0-9]+", design)  # analyses/selectivity.py splits names at the first '-o'
        org = organism_config(design, 1, str(tmp_path))
        for k, v in DESIGNS[design].items():
            assert getattr(org, k) == v
        sw = sweep_config(design, lever, 1, Path("org"), cfg)
        assert sw.name == f"{design}-o1-{lever}" and sw.prompts == [] and sw.seeds == [0]
        for k, v in LEVERS[lever].items():
            assert getattr(sw, k) == v


def test_design_folders_differ_and_the_default_is_the_cached_default(tmp_path):
    folders = {organism_config(d, 0, str(tmp_path)).folder() for d in DESIGNS}
    assert len(folders) == len(DESIGNS)
    from inoc_mech.models.organism import OrganismConfig
    assert organism_config("factored", 0, str(tmp_path)).folder() == OrganismConfig(cache=str(tmp_path)).folder()


def test_selection_and_bad_names():
    assert DesignsConfig(designs=["free"]).pairs() == [("free", "default"), ("free", "lora8")]
    assert DesignsConfig(levers=["lora2"]).pairs() == [("factored", "lora2")]
    with pytest.raises(ValueError, match="unknown --designs"):
        DesignsConfig(designs=["huge"])


def test_dry_run_trains_nothing_and_says_what_is_missing(tmp_path, capsys):
    from inoc_mech.studies.designs import run

    run(DesignsConfig(designs=["factoredbias"], organism_seeds=[7], runs_dir=str(tmp_path / "sel"),
                      organism_cache=str(tmp_path / "cache"), dry_run=True))
    out = capsys.readouterr().out
    assert "factoredbias-o7-default: organism" in out and "(to pretrain)" in out
    assert not (tmp_path / "cache").exists() and not (tmp_path / "sel").exists()
