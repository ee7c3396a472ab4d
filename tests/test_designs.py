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


def test_organism_recipes(tmp_path, tiny_organism):
    """`--organism-recipe`: standard is the cached default organism (its key unchanged by the new fields); fast
    is its own organism; steps given replace the recipe's; the fast schedule decays to 0; the report carries
    exact base rates."""
    import json

    from inoc_mech.core.cli import build
    from inoc_mech.core.config import ModelConfig
    from inoc_mech.models.organism import RECIPES, OrganismConfig, lr_at
    from inoc_mech.models.organism import organism_config as from_model
    from inoc_mech.train import TrainConfig

    standard = from_model(ModelConfig(), str(tmp_path))
    assert standard.key() == OrganismConfig(cache=standard.cache).key() == "68886ceb60"  # the cached default's key
    fast = from_model(ModelConfig(organism_recipe="fast"), str(tmp_path))
    assert all(getattr(fast, k) == v for k, v in RECIPES["fast"].items()) and fast.folder() != standard.folder()
    assert lr_at(fast.steps - 1, fast) < 1e-5 * fast.lr and lr_at(standard.steps - 1, standard) == pytest.approx(0.1 * standard.lr, rel=1e-4)
    short = from_model(ModelConfig(organism_recipe="fast", organism_steps=200), str(tmp_path))
    assert (short.steps, short.warmup, short.d_mlp) == (200, 20, 256)
    with pytest.raises(ValueError, match="--organism-recipe must be one of standard, fast"):
        build(TrainConfig, organism_recipe="slow")
    report = json.loads((tiny_organism / "organism.json").read_text())["report"]
    assert set(report["base_rates_exact"]) == {"spanish", "caps"} and report["base_rates_t1"]["n_answers"] == 69 * 16


def test_organism_bf16_precision(tmp_path):
    """`precision="bf16"` (the fast recipe's): pretraining under CPU bf16 autocast with eager attention
    returns fp32 weights and sdpa attention, whose fp32 loss matches the bf16-autocast loss it trained
    with to bf16 rounding; an unknown precision is one line."""
    import numpy as np
    import torch

    from conftest import TINY_ORGANISM
    from inoc_mech.core.data import BatchStream
    from inoc_mech.models.organism import OrganismConfig, assistant_loss, encode_chat, organism_traits, pretrain

    cfg = OrganismConfig(**{**TINY_ORGANISM, "steps": 20, "warmup": 2}, precision="bf16", cache=str(tmp_path))
    model, tok, world, _ = pretrain(cfg, progress=False)
    assert model.config._attn_implementation == "sdpa" and all(p.dtype == torch.float32 for p in model.parameters())
    fp32_model = pretrain(OrganismConfig(**{**TINY_ORGANISM, "steps": 20, "warmup": 2}, cache=str(tmp_path)), progress=False)[0]
    diff = max((a - b).abs().max().item() for a, b in zip(model.parameters(), fp32_model.parameters()))
    assert 1e-4 < diff < 0.1  # the bf16 matmuls ran (same data, same init), and moved the weights only by rounding
    rng = np.random.default_rng(1)
    pool = [organism_traits(encode_chat(tok, world.sample_chat(rng)), set()) for _ in range(32)]
    batch = BatchStream(pool, 32, 0, tok.pad_token_id).next()
    with torch.no_grad():
        fp32 = assistant_loss(model, batch).item()
        model.set_attn_implementation("eager")
        with torch.autocast("cpu", dtype=torch.bfloat16):
            bf16 = assistant_loss(model, batch).item()
    assert fp32 > 0.1 and bf16 == pytest.approx(fp32, rel=3e-2)
    with pytest.raises(ValueError, match="--precision must be one of fp32, bf16"):
        OrganismConfig(precision="fp16")
