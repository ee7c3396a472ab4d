"""Cost of the gradient-pressure hooks, as ratios measured in one process on the same model and data.

    python benchmarks/bench_hooks.py --steps 60 --rounds 1

Modes, each a real `inoc_mech.train` run on the cached default organism (inoculated data):
- plain:   hooks off (`--no-hooks`), the loop alone;
- default: the default cadence (cheap metrics every `--log-every`, gradient split every `--grad-split-every`);
- full:    every metric and the gradient split at every step (one trait per step, in turn);
- full_all: the same with every trait split at every step (`--grad-split-all`).
Plus two references measured in the same process:
- floor:   6*N*T FLOPs per step (N parameters, T tokens) at the matrix-multiply rate measured here;
- Trainer: the same model, data, batch size and optimizer through `transformers.Trainer`.
Throughput is tokens/s over steps after the first; each mode is run `--rounds` times interleaved
and the median is reported. Ratios are per-step time relative to `plain` (and Trainer/custom
throughput). Shared machines are noisy: read the ratios, not the absolute numbers.
"""

from __future__ import annotations

import statistics
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from inoc_mech.core.cli import build, parse_config, quiet_transformers
from inoc_mech.core.config import LoopConfig, ModelConfig
from inoc_mech.core.runs import read_run
from inoc_mech.models import hf_trainer
from inoc_mech.models.organism import ensure_organism, organism_config
from inoc_mech.train import TrainConfig, make_setting, train


def loop_throughput(runs_dir: Path, steps: int, threads: int, **kw) -> float:
    org = ensure_organism(organism_config(ModelConfig(), threads=threads), progress=False)
    cfg = build(TrainConfig, inoculate=True, lora_r=0, steps=steps,  # full finetuning, as in the README numbers
                threads=threads, runs_dir=str(runs_dir), overwrite=True, eval_samples=1, name="bench",
                model=str(org), **kw)
    rows = read_run(train(cfg, progress=False))["metrics"]
    rows = [r for r in rows if r["step"] > 0]
    # tokens_per_s of a row covers the steps since the previous logged row
    return statistics.median(r["tokens_per_s"] for r in rows[:-1] or rows)


def matmul_rate(threads: int, n: int = 512, reps: int = 30) -> float:
    torch.set_num_threads(threads)
    a, b = torch.randn(n, n), torch.randn(n, n)
    for _ in range(3):
        a @ b
    t = time.perf_counter()
    for _ in range(reps):
        a @ b
    return 2 * n ** 3 * reps / (time.perf_counter() - t)


def trainer_throughput(steps: int, threads: int, batch_size: int) -> tuple[float, int, int]:
    """tokens/s of transformers.Trainer on the same model and data; also N and tokens per step."""
    torch.set_num_threads(threads)
    folder = ensure_organism(organism_config(ModelConfig(), threads=threads), progress=False)
    setting = make_setting(build(TrainConfig, model=str(folder), inoculate=True, prompt="speak spanish"))
    model, tok = setting.setup("cpu", progress=False)  # the organism as the loop finetunes it (factored head)
    exs = setting.examples("speak spanish")
    res = hf_trainer.trainer_throughput(model, exs, setting.pad_id, batch_size, steps)
    tokens_per_step = sum(len(e.input_ids) for e in exs) / len(exs) * batch_size
    return res["tokens_per_s"], sum(p.numel() for p in model.parameters()), int(tokens_per_step)


@dataclass
class BenchConfig:
    """How long to measure."""
    steps: int = field(default=200, metadata={"help": "steps per measured run"})
    rounds: int = field(default=3, metadata={"help": "interleaved rounds (medians are reported)"})
    threads: int = field(default=1, metadata={"help": "torch CPU threads"})
    log_every: int = field(default=LoopConfig.log_every, metadata={"help": "the default cadence's --log-every"})
    grad_split_every: int = field(default=LoopConfig.grad_split_every, metadata={"help": "the default cadence's --grad-split-every"})


def main(argv=None):
    a = parse_config(BenchConfig, argv, prog="python benchmarks/bench_hooks.py", description=__doc__.split("\n\n")[0])
    quiet_transformers()
    modes = {"plain": dict(hooks=False, log_every=a.log_every),
             "default": dict(log_every=a.log_every, grad_split_every=a.grad_split_every),
             "full": dict(log_every=1, grad_split_every=1),
             "full_all": dict(log_every=1, grad_split_every=1, grad_split_all=True)}
    res: dict[str, list[float]] = {m: [] for m in list(modes) + ["trainer", "matmul"]}
    n_params = tokens = 0
    with tempfile.TemporaryDirectory() as d:
        for r in range(a.rounds):
            for m, kw in modes.items():
                res[m].append(loop_throughput(Path(d), a.steps, a.threads, **kw))
            tp, n_params, tokens = trainer_throughput(a.steps, a.threads, 32)
            res["trainer"].append(tp)
            res["matmul"].append(matmul_rate(a.threads))
            print(f"round {r + 1}/{a.rounds}: " + ", ".join(f"{k} {v[-1]:.3g}" for k, v in res.items()), file=sys.stderr)
    med = {k: statistics.median(v) for k, v in res.items()}
    step = {m: tokens / med[m] for m in modes}  # seconds per step
    floor = 6 * n_params * tokens / med["matmul"]
    print(f"organism: {n_params / 1e6:.2f}M parameters, {tokens} tokens/step, {a.threads} thread(s), "
          f"{a.steps} steps x {a.rounds} rounds (medians)")
    print("| measurement | value | ratio | target |")
    print("|---|---|---|---|")
    print(f"| plain step | {step['plain'] * 1e3:.1f} ms | 1.00x plain | |")
    print(f"| default cadence (log every {a.log_every}, split every {a.grad_split_every}) | "
          f"{step['default'] * 1e3:.1f} ms | {step['default'] / step['plain']:.2f}x plain | <= 1.10x |")
    print(f"| full split every step (one trait per step, in turn) | {step['full'] * 1e3:.1f} ms | "
          f"{step['full'] / step['plain']:.2f}x plain | <= 1.6x |")
    print(f"| full split every step, both traits (`--grad-split-all`) | {step['full_all'] * 1e3:.1f} ms | "
          f"{step['full_all'] / step['plain']:.2f}x plain | (one extra backward per trait) |")
    print(f"| 6NT FLOP floor ({med['matmul'] / 1e9:.1f} GFLOP/s matmul) | {floor * 1e3:.1f} ms | "
          f"plain = {step['plain'] / floor:.2f}x floor | <= 1.3x |")
    print(f"| transformers.Trainer | {tokens / med['trainer'] * 1e3:.1f} ms | "
          f"custom loop throughput = {med['plain'] / med['trainer']:.2f}x (plain), "
          f"{med['default'] / med['trainer']:.2f}x (default cadence) Trainer's | >= 1.0x |")


if __name__ == "__main__":
    main()
