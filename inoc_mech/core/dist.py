"""Processes of one run under torchrun: who am I, my share of a step's batch, sums over all of us.

    torchrun --standalone --nproc_per_node 2 -m inoc_mech.train --model /tmp/tiny-llama --steps 2 --eval-questions 2 --eval-samples 1 --max-new-tokens 4 --name ddp-demo --overwrite

`torchrun` sets WORLD_SIZE / RANK / LOCAL_RANK; `init()` then joins the process group (gloo on CPU,
NCCL on CUDA, one GPU per process by LOCAL_RANK). Without torchrun (or with one process) every helper
is the identity and nothing is initialised, so the single-process loop is the same code.

A step's global batch is the same list of examples on every process (the data stream is
deterministic); process r takes a contiguous share (`share`), which it cuts into micro-batches.
Every loss is a sum of token losses over the *global* number of trained tokens, so adding the
micro-batches' and processes' gradients gives exactly the gradient of the one-batch mean loss.
"""

from __future__ import annotations

import os
import sys

import torch
import torch.distributed as dist
from torch import Tensor


def torchrun_command(n: int, overrides: dict) -> list[str]:
    """The command that runs `inoc_mech.train` in `n` processes (`torchrun --standalone`), with
    `overrides` as flat TrainConfig leaves (`core.cli.to_args`)."""
    from inoc_mech.core.cli import to_args
    from inoc_mech.core.config import TrainConfig

    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(n),
            "-m", "inoc_mech.train", *to_args(TrainConfig, overrides)]


def world() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def rank() -> int:
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def is_main() -> bool:
    """Rank 0: the process that writes the run folder, logs and evaluates."""
    return rank() == 0


def launched() -> bool:
    """Started by torchrun with more than one process."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def init(device_name: str) -> str:
    """Join torchrun's process group (once); returns the device this process uses ('cuda:<local rank>' on
    CUDA). A no-op returning `device_name` without torchrun."""
    if not launched():
        return device_name
    cuda = device_name.startswith("cuda") or (device_name == "auto" and torch.cuda.is_available())
    if not dist.is_initialized():
        from datetime import timedelta  # the others wait at a barrier while rank 0 evaluates: allow hours
        dist.init_process_group("nccl" if cuda else "gloo", timeout=timedelta(hours=2))
    if cuda:
        local = int(os.environ.get("LOCAL_RANK", "0"))
        torch.cuda.set_device(local)
        return f"cuda:{local}"
    return "cpu"


def share(n: int, r: int | None = None, w: int | None = None) -> range:
    """Indices of a global batch of `n` examples that process `r` of `w` takes (contiguous, sizes differ by <= 1)."""
    r, w = rank() if r is None else r, world() if w is None else w
    if n < w:
        raise ValueError(f"--batch-size {n} is smaller than the {w} processes: give each at least one example")
    base, extra = divmod(n, w)
    start = r * base + min(r, extra)
    return range(start, start + base + (1 if r < extra else 0))


def all_sum(tensors: list[Tensor]) -> list[Tensor]:
    """Element-wise sums over all processes, in one collective (identity for one process)."""
    if world() == 1 or not tensors:
        return tensors
    from torch._utils import _flatten_dense_tensors, _unflatten_dense_tensors

    flat = _flatten_dense_tensors([t.double() if t.dtype == torch.float64 else t.float() for t in tensors])
    dist.all_reduce(flat)
    return [o.to(t.dtype) for o, t in zip(_unflatten_dense_tensors(flat, tensors), tensors)]


def any_flag(flag: bool, device) -> bool:
    """True on every process if it is True on any (e.g. a signal that reached one of them)."""
    if world() == 1:
        return flag
    t = torch.tensor([1.0 if flag else 0.0], device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item())


def barrier() -> None:
    if world() > 1:
        dist.barrier()


def close() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


class main_first:
    """`with main_first():` rank 0 runs the block first (e.g. fills a cache), then the others run it."""

    def __enter__(self):
        if not is_main():
            barrier()

    def __exit__(self, *exc):
        if is_main():
            barrier()
        return False
