"""Shared fixtures: a fixed seed for every test, one thread, and a tiny cached organism."""

import random
from pathlib import Path

import numpy as np
import pytest
import torch

from inoc_mech.models.organism import OrganismConfig, ensure_organism
from inoc_mech.core.cli import build
from inoc_mech.train import TrainConfig

TINY_ORGANISM = dict(d_model=32, n_layers=2, n_heads=2, d_mlp=64, steps=60, warmup=5, batch_size=32)


def organism_parts(folder):
    """(model, tokenizer, world, organism.json) of an organism or organism run folder, through the one loader."""
    from inoc_mech.settings.load import load
    loaded = load(folder)
    return loaded.model, loaded.tok, loaded.setting.world, loaded.meta


@pytest.fixture(autouse=True)
def seed():
    random.seed(0)
    np.random.seed(0)
    torch.manual_seed(0)
    torch.set_num_threads(1)
    yield 0


@pytest.fixture(scope="session")
def runs_dir(tmp_path_factory) -> Path:
    """A runs folder shared by the session, holding the tiny organism cache."""
    return tmp_path_factory.mktemp("runs")


@pytest.fixture(scope="session")
def tiny_organism(runs_dir) -> Path:
    cfg = OrganismConfig(**TINY_ORGANISM, cache=str(runs_dir / "_organism"))
    return ensure_organism(cfg, progress=False, quiet=True)


@pytest.fixture
def make_cfg(runs_dir, tiny_organism):
    """TrainConfig factory on the tiny organism: make_cfg(steps=3, inoculate=True, ...); full finetuning
    unless lora_r is given (the organism's default is LoRA r 2)."""

    def make(**overrides) -> TrainConfig:
        base = dict(steps=3, batch_size=8, lora_r=0, log_every=1, grad_split_every=1, grad_split_all=True, eval_samples=1,
                    runs_dir=str(runs_dir), model=str(tiny_organism), name="t", overwrite=True)
        base.update(overrides)
        cfg = build(TrainConfig, **base)
        return cfg

    return make


def tiny_design(runs_dir, **design) -> Path:
    """The tiny organism of a world design (e.g. triggers=True), cached in the session's runs folder."""
    return ensure_organism(OrganismConfig(**TINY_ORGANISM, **design, cache=str(runs_dir / "_organism")),
                           progress=False, quiet=True)


def setting_on(cls, folder, runs_dir, **overrides):
    """A setting of class `cls` set up on an organism folder (inoculated, full finetuning, 2 steps)."""
    cfg = build(TrainConfig, **{**dict(setting=cls.name, model=str(folder), runs_dir=str(runs_dir), name="s",
                                       inoculate=True, lora_r=0, steps=2, batch_size=8), **overrides})
    s = cls(cfg)
    s.setup(torch.device("cpu"), progress=False)
    return s


def assert_split_exact(setting, trait: str, limit: int = 12) -> int:
    """The setting's decomposition parts sum to the token loss on the trait's trained tokens and are 0
    elsewhere, on its first `limit` untreated examples; returns how many tokens were decomposed."""
    from inoc_mech.core.data import collate

    batch = collate(setting.examples(None, limit=limit), setting.pad_id)
    with torch.no_grad():
        logits = setting.model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits
    parts = setting.decomposition.fn(logits, batch)
    total = sum(parts.values())
    lp = torch.log_softmax(logits[:, :-1].double(), -1).gather(-1, batch.input_ids[:, 1:, None])[..., 0]
    nll = torch.zeros_like(total, dtype=torch.float64)
    nll[:, 1:] = -lp
    where = batch.traits[trait] & batch.assistant
    torch.testing.assert_close(total[where].double(), nll[where], atol=1e-5, rtol=1e-5)
    assert all((v[~where] == 0).all() for v in parts.values())
    return int(where.sum())
