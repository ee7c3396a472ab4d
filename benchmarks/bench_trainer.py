"""Throughput of the custom loop against transformers.Trainer, and of 1 against 2 processes, one run.

    python -m inoc_mech.settings.tiny /tmp/tiny-llama && python benchmarks/bench_trainer.py --models /tmp/tiny-llama --steps 4 --no-processes

For each model (`--models`: default the cached organism and SmolLM2), on the same data (the setting's
training examples, inoculated), the same batch, LoRA (the loop's default rank and alpha for that model),
constant lr, AdamW without weight decay or clipping, one CPU thread, each measurement its own process,
interleaved over `--rounds`:
- loop:          `inoc_mech.train --no-hooks` (the loop alone, its defaults: loss and output head on the trained
                 tokens only, a prefix every row shares computed once, rows packed where that saves);
- loop, whole:   the same with `--no-share-prefix --no-pack` (padded rows, every row computed whole, as Trainer);
- loop, buckets: the loop with `--length-buckets` (batches of similar lengths: less padding);
- hooks:         `inoc_mech.train` with the default instruments;
- Trainer:       `transformers.Trainer` on the same model with the same adapters (`models.hf_trainer`), on
                 the loop's batches in the loop's order;
- Trainer, grouped: Trainer with its own length grouping (the counterpart of `--length-buckets`).
Then (`--processes`) the loop on the organism under `torchrun --standalone --nproc_per_node 2` (gloo,
one thread each) against 1 process, the same global batch. Printed: tokens/s (real tokens, padding not
counted; median over steps after the first) and ratios; target: loop >= 1.2x Trainer. Shared machines
are noisy: read the ratios.
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from inoc_mech.core.cli import parse_config

REPO = Path(__file__).resolve().parents[1]

CHILD = r"""
import json, statistics, sys
import torch
from inoc_mech.core.cli import build, quiet_transformers
from inoc_mech.core.runs import read_run
from inoc_mech.core.config import resolve_defaults
from inoc_mech.train import TrainConfig, train
quiet_transformers()
mode, kw = sys.argv[1], json.loads(sys.argv[2])
torch.set_num_threads(1)
if mode == "trainer":  # kw's length_buckets: Trainer's grouping by length
    from inoc_mech.models import hf_trainer
    from inoc_mech.models.lora import LoraSettings, add_lora
    from inoc_mech.settings.base import setting_class
    cfg = build(TrainConfig, **kw)
    cls = setting_class(cfg.setting.setting, cfg.model.substrate)
    cfg = resolve_defaults(cfg, cfg.model.substrate == "organism", cls.default_prompt)  # the loop's defaults
    setting = cls(cfg)
    model, _ = setting.setup("cpu", progress=False)
    model = add_lora(model, LoraSettings(r=cfg.model.lora_r, alpha=cfg.model.lora_alpha))
    exs = setting.examples(cfg.train_prompt)
    grouped = cfg.loop.length_buckets
    if not grouped:  # the loop's batches, in its order
        from inoc_mech.core.data import BatchStream
        stream = BatchStream(exs, cfg.loop.batch_size, cfg.loop.seed, setting.pad_id)
        exs = [e for _ in range(cfg.loop.steps) for e in stream.next_examples()]
    res = hf_trainer.trainer_throughput(model, exs, setting.pad_id, cfg.loop.batch_size, cfg.loop.steps, lr=cfg.loop.lr,
                                        group_by_length=grouped, in_order=not grouped)
    print(json.dumps({"tokens_per_s": res["tokens_per_s"]}))
else:
    rows = read_run(train(build(TrainConfig, **kw), progress=False))["metrics"]
    print(json.dumps({"tokens_per_s": statistics.median(r["tokens_per_s"] for r in rows if r["step"] > 0)}))
"""


def child(mode: str, kw: dict) -> float:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    out = subprocess.run([sys.executable, "-c", CHILD, mode, json.dumps(kw)], capture_output=True, text=True,
                         cwd=REPO, env=env)
    if out.returncode:
        raise SystemExit(f"benchmark {mode} failed:\n{out.stderr[-2000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])["tokens_per_s"]


def torchrun(n: int, kw: dict) -> float:
    from inoc_mech.core.runs import read_run

    from inoc_mech.core.dist import torchrun_command

    out = subprocess.run(torchrun_command(n, kw), capture_output=True, text=True, cwd=REPO, env={**os.environ, "OMP_NUM_THREADS": "1"})
    if out.returncode:
        raise SystemExit(f"torchrun with {n} processes failed:\n{out.stderr[-2000:]}")
    rows = read_run(Path(kw["runs_dir"]) / kw["name"])["metrics"]
    return statistics.median(r["tokens_per_s"] for r in rows if r["step"] > 0)


def organism_folder() -> str:
    """The default organism (cached under runs/_organism; pretrained first if missing)."""
    from inoc_mech.core.config import ModelConfig
    from inoc_mech.models.organism import ensure_organism, organism_config

    return str(ensure_organism(organism_config(ModelConfig(), runs_dir=str(REPO / "runs")), progress=False))


@dataclass
class BenchTrainerConfig:
    """What to measure."""
    models: list = field(default_factory=lambda: ["organism", "smollm2"], metadata={"help": "models: 'organism', 'smollm2', HF folders"})
    steps: int = field(default=16, metadata={"help": "steps per measured run"})
    organism_steps: int = field(default=100, metadata={"help": "steps per measured run on the organism (fast steps)"})
    rounds: int = field(default=1, metadata={"help": "interleaved rounds (medians are reported)"})
    processes: bool = field(default=True, metadata={"help": "also 1 vs 2 processes (torchrun, gloo) on the first model"})


def main(argv=None):
    a = parse_config(BenchTrainerConfig, argv, prog="python benchmarks/bench_trainer.py",
                     description=__doc__.split("\n\n")[0])
    table = []
    with tempfile.TemporaryDirectory() as d:
        models = [organism_folder() if m == "organism" else m for m in a.models]
        for name, model in zip(a.models, models):
            steps = a.organism_steps if name == "organism" else a.steps
            base = dict(model=model, steps=steps, inoculate=True, runs_dir=d, overwrite=True, eval_questions=1,
                        eval_samples=1, max_new_tokens=2, threads=1, log_every=1, name="bench", device="cpu")
            modes = {"loop": ("loop", {"hooks": False}), "whole": ("loop", {"hooks": False, "share_prefix": False, "pack": False}),
                     "buckets": ("loop", {"hooks": False, "length_buckets": True}), "hooks": ("loop", {"log_every": 10}),
                     "trainer": ("trainer", {}), "grouped": ("trainer", {"length_buckets": True})}
            res = {k: [] for k in modes}
            for r in range(a.rounds):
                for k, (mode, kw) in modes.items():
                    res[k].append(child(mode, {**base, **kw}))
                print(f"{name} round {r + 1}: " + ", ".join(f"{k} {v[-1]:.1f}" for k, v in res.items()), file=sys.stderr)
            med = {k: statistics.median(v) for k, v in res.items()}
            table.append((name, med))
        print(f"one CPU thread, {a.rounds} round(s) (medians), steps {a.organism_steps} (organism) / {a.steps}; tokens/s")
        print("| model | loop | loop, every row whole | loop, length buckets | loop, default instruments | Trainer | "
              "Trainer, grouped by length | loop / Trainer | loop with buckets / Trainer grouped | target |")
        print("|---|---|---|---|---|---|---|---|---|---|")
        for model, m in table:
            print(f"| {model} | {m['loop']:.0f} | {m['whole']:.0f} | {m['buckets']:.0f} | {m['hooks']:.0f} | {m['trainer']:.0f} | "
                  f"{m['grouped']:.0f} | {m['loop'] / m['trainer']:.2f}x (whole rows {m['whole'] / m['trainer']:.2f}x, "
                  f"instrumented {m['hooks'] / m['trainer']:.2f}x) | {m['buckets'] / m['grouped']:.2f}x | >= 1.2x |")
        if a.processes:
            name, model = a.models[0], models[0]
            kw = dict(model=model, steps=a.organism_steps if name == "organism" else a.steps, inoculate=True,
                      runs_dir=d, overwrite=True, eval_questions=1, eval_samples=1, max_new_tokens=2, threads=1,
                      device="cpu", hooks=False, log_every=1)
            one = torchrun(1, {**kw, "name": "p1"})
            two = torchrun(2, {**kw, "name": "p2"})
            print(f"| {name}: torchrun 1 process | {one:.0f} tokens/s | 2 processes (gloo) | {two:.0f} tokens/s | "
                  f"{two / one:.2f}x | |")


if __name__ == "__main__":
    main()
