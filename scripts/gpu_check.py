"""GPU readiness: SmolLM2 + LoRA for a fixed number of steps, custom loop vs transformers.Trainer.

    bash scripts/gpu_check.sh --steps 20

On a CUDA machine: fetches SmolLM2 if needed (runs/_models/), runs `inoc_mech.train` (bf16 autocast,
LoRA r16 on all projections, hooks at the default cadence) and `transformers.Trainer` (bf16) on the
same data and batch size, and prints tokens/s and peak GPU memory for both, and their ratio.
Without CUDA it says so and exits 0 (the CPU path is covered by the test suite).
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
    from inoc_mech.core.cli import build, quiet_transformers
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
    setting = make_setting(build(TrainConfig, model="smollm2"))
    model, _ = setting.setup("cuda")  # the same model and data as the custom loop's run
    model = add_lora(model, LoraSettings(r=16, alpha=32.0))
    exs = setting.examples(None)
    ref = hf_trainer.trainer_throughput(model, exs, setting.pad_id, a.batch_size, a.steps, bf16=True)
    print("| loop | tokens/s | peak GPU memory |\n|---|---|---|")
    print(f"| inoc_mech.train (hooks on) | {custom:,.0f} | {custom_mem:.2f} GiB |")
    print(f"| transformers.Trainer | {ref['tokens_per_s']:,.0f} | {ref['peak_memory_gb']:.2f} GiB |")
    print(f"custom loop throughput = {custom / ref['tokens_per_s']:.2f}x Trainer's")
    return 0


if __name__ == "__main__":
    sys.exit(main())
