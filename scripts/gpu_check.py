"""GPU readiness: SmolLM2 + LoRA for a fixed number of steps, custom loop vs transformers.Trainer.

    bash scripts/gpu_check.sh --steps 20

On a CUDA machine: fetches SmolLM2 if needed (runs/_models/), runs `inoc_mech.train` (bf16 autocast,
LoRA r16 on all projections, hooks at the default cadence) and `transformers.Trainer` (bf16) on the
same data and batch size, and prints tokens/s and peak GPU memory for both, and their ratio. Then the
run in padded rows (`--no-share-prefix --no-pack`) against the default layouts: their speed and agreement. Then the
torchrun path: the same run under `torchrun --standalone --nproc_per_node N` (NCCL) for N = 1 and
N = every visible GPU, same global batch: tokens/s of each and the largest relative difference of
their metrics (bf16: expect ~1e-2, not float32's 1e-5), and that rank 0 alone wrote a complete run;
with two or more GPUs also full finetuning sharded by `--fsdp` against the same run under DDP.
Without CUDA it says so and exits 0 (the CPU path, gloo included, is covered by the test suite).
"""

from __future__ import annotations

import statistics
import sys
import tempfile
from dataclasses import dataclass, field

import torch

from inoc_mech.core.cli import parse_config


@dataclass
class GpuCheckConfig:
    """How long to measure."""
    steps: int = field(default=40, metadata={"help": "steps per loop"})
    batch_size: int = field(default=16, metadata={"help": "conversations per step"})


def main(argv=None):
    a = parse_config(GpuCheckConfig, argv, prog="scripts/gpu_check.sh", description=__doc__.split("\n\n")[0])
    if not torch.cuda.is_available():
        print("gpu_check: no CUDA GPU on this machine; nothing to measure (CPU paths are covered by `make test`)")
        return 0
    from inoc_mech.core.cli import build, flatten, quiet_transformers
    from inoc_mech.core.runs import read_run
    from inoc_mech.models import hf_trainer
    from inoc_mech.models.lora import LoraSettings, add_lora
    from inoc_mech.models.real import fetch
    from inoc_mech.train import TrainConfig, make_setting, train

    quiet_transformers()
    fetch("smollm2")
    print(f"device: {torch.cuda.get_device_name()}, torch {torch.__version__}")
    with tempfile.TemporaryDirectory() as d:
        torch.cuda.reset_peak_memory_stats()
        cfg = build(TrainConfig, model="smollm2", steps=a.steps, batch_size=a.batch_size, runs_dir=d, name="gpu",
                    eval_questions=4, eval_samples=1, max_new_tokens=8, device="cuda")
        rows = read_run(train(cfg, progress=False))["metrics"]
        custom = statistics.median(r["tokens_per_s"] for r in rows if r["step"] > 0)
        custom_mem = torch.cuda.max_memory_allocated() / 2 ** 30
        # the same run in padded rows (no shared prefix, no packing): the layouts' agreement and speed on CUDA
        padded = read_run(train(build(TrainConfig, **{**flatten(cfg), "name": "gpu-padded", "share_prefix": False,
                                                       "pack": False}), progress=False))["metrics"]
        worst = max((abs(x[k] - y[k]) / max(abs(x[k]), abs(y[k]), 1e-6), f"step {x['step']} {k}")
                    for x, y in zip(rows, padded) for k in x if k in y and k != "tokens_per_s")
        print(f"shared prefix + packing vs padded rows: {custom:,.0f} vs "
              f"{statistics.median(r['tokens_per_s'] for r in padded if r['step'] > 0):,.0f} tokens/s; largest "
              f"relative metric difference {worst[0]:.2e} ({worst[1]}; bf16: expect ~1e-2)")
    setting = make_setting(build(TrainConfig, model="smollm2"))
    model, _ = setting.setup("cuda")  # the same model and data as the custom loop's run
    model = add_lora(model, LoraSettings(r=16, alpha=32.0))
    exs = setting.examples(None)
    ref = hf_trainer.trainer_throughput(model, exs, setting.pad_id, a.batch_size, a.steps, bf16=True)
    print("| loop | tokens/s | peak GPU memory |\n|---|---|---|")
    print(f"| inoc_mech.train (hooks on) | {custom:,.0f} | {custom_mem:.2f} GiB |")
    print(f"| transformers.Trainer | {ref['tokens_per_s']:,.0f} | {ref['peak_memory_gb']:.2f} GiB |")
    print(f"custom loop throughput = {custom / ref['tokens_per_s']:.2f}x Trainer's")
    return torchrun_check(a)


def torchrun_check(a) -> int:
    """The same run under torchrun with 1 and with all visible GPUs: throughput and agreement."""
    import json
    import os
    import subprocess
    from pathlib import Path

    from inoc_mech.core.dist import torchrun_command
    from inoc_mech.core.runs import is_complete, read_run

    gpus = torch.cuda.device_count()
    counts = sorted({1, gpus})
    with tempfile.TemporaryDirectory() as d:
        runs = {}
        for n in counts:
            cmd = torchrun_command(n, dict(model="smollm2", steps=a.steps, batch_size=a.batch_size, runs_dir=d,
                                           name=f"ddp{n}", eval_questions=4, eval_samples=1, max_new_tokens=8,
                                           device="cuda", log_every=1))
            p = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
            if p.returncode:
                print(f"torchrun with {n} GPU(s) failed:\n{p.stderr[-3000:]}")
                return 1
            run = Path(d) / f"ddp{n}"
            assert is_complete(run) and json.loads((run / "config.json").read_text())["processes"] == n
            runs[n] = read_run(run)["metrics"]
        print("| torchrun processes | tokens/s (median, steps > 0) |\n|---|---|")
        for n, rows in runs.items():
            print(f"| {n} | {statistics.median(r['tokens_per_s'] for r in rows if r['step'] > 0):,.0f} |")
        if len(counts) > 1:
            a_rows, b_rows = runs[counts[0]], runs[counts[-1]]
            worst = max((abs(x[k] - y[k]) / max(abs(x[k]), abs(y[k]), 1e-6), f"step {x['step']} {k}")
                        for x, y in zip(a_rows, b_rows) for k in x if k in y and k != "tokens_per_s")
            print(f"largest relative metric difference, 1 vs {counts[-1]} processes: {worst[0]:.2e} ({worst[1]})")
            # FSDP2: full finetuning sharded over every GPU against the same run replicated (DDP)
            full = {}
            for name, extra in (("ddp-full", {}), ("fsdp", {"fsdp": True})):
                cmd = torchrun_command(gpus, dict(model="smollm2", steps=a.steps, batch_size=a.batch_size, runs_dir=d,
                                                  name=name, lora_r=0, eval_questions=4, eval_samples=1,
                                                  max_new_tokens=8, device="cuda", log_every=1, **extra))
                p = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
                if p.returncode:
                    print(f"torchrun {name} with {gpus} GPUs failed:\n{p.stderr[-3000:]}")
                    return 1
                full[name] = read_run(Path(d) / name)["metrics"]
            worst = max((abs(x[k] - y[k]) / max(abs(x[k]), abs(y[k]), 1e-6), f"step {x['step']} {k}")
                        for x, y in zip(full["ddp-full"], full["fsdp"]) for k in x if k in y and k != "tokens_per_s")
            print(f"full finetuning on {gpus} GPUs, --fsdp vs DDP: largest relative metric difference "
                  f"{worst[0]:.2e} ({worst[1]})")
        else:
            print("one GPU visible: the multi-GPU comparison (and --fsdp) needs two or more")
    return 0


if __name__ == "__main__":
    sys.exit(main())
