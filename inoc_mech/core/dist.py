"""Processes of one run under torchrun: who am I, my share of a step's batch, sums over all of us.

    torchrun --standalone --nproc_per_node 2 -m inoc_mech.train --model /tmp/tiny-llama --steps 2 --eval-questions 2 --eval-samples 1 --max-new-tokens 4 --name ddp-demo --overwrite

`torchrun` sets WORLD_SIZE / RANK / LOCAL_RANK; `init()` then joins the process group (gloo on CPU,
NCCL on CUDA, one GPU per process by LOCAL_RANK). Without torchrun (or with one process) every helper
is the identity and nothing is initialised, so the single-process loop is the same code.

A step's global batch is the same list of examples on every process (the data stream is
deterministic); process r takes a contiguous share (`share`), which it cuts into micro-batches.
Every loss is a sum of token losses over the *global* number of trained tokens, so adding the
micro-batches' and processes' gradients gives exactly the gradient of the one-batch mean loss.

`--fsdp` shards parameters, gradients and optimizer state over the processes (FSDP2 `fully_shard`,
one unit per block and the root). Every forward and backward of a sharded model is then a collective,
so the processes run them in lockstep (`lockstep`): the instruments make the same number of forwards
and backwards on every process (`max_count`, `all_true`), a gradient they take is a backward into
`.grad` (`gradients`: its local shard, summed over processes), and a norm is a sum of local squares
added over processes. Checkpoints and the saved model gather full state dicts (`full_state`).
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


def sharded(t: Tensor) -> bool:
    """A DTensor: a parameter (or gradient) FSDP has sharded over the processes."""
    from torch.distributed.tensor import DTensor
    return isinstance(t, DTensor)


def local(t: Tensor) -> Tensor:
    """This process's shard of a sharded tensor; any other tensor as it is."""
    return t.to_local() if sharded(t) else t


def lockstep(model) -> bool:
    """Whether every process must run the same forwards and backwards of `model` (FSDP-sharded: each is a
    collective), so that an instrument's data-dependent choice of how many to run must agree over processes."""
    return any(sharded(p) for p in model.parameters())


def fully_shard(model, layers: str):
    """FSDP2 over the processes: each block of `model.<layers>` (the architecture table's block list) its own
    unit, then the rest. In place; returns the model."""
    from torch.distributed.fsdp import fully_shard as shard

    blocks = model.get_submodule(layers) if layers else []
    for block in blocks:
        shard(block)
    shard(model)
    return model


def gradients(output: Tensor, inputs: list[Tensor], retain_graph: bool = False) -> list[Tensor | None]:
    """d output / d inputs, as `torch.autograd.grad(..., allow_unused=True)`. Over FSDP-sharded parameters
    (a collective: call it on every process) it is a backward into `.grad` (which is kept and restored):
    a sharded input's gradient is its local shard of the gradient summed over processes; an unsharded one
    (e.g. a process's own leaf tensor) is its own gradient."""
    if not any(sharded(x) for x in inputs):
        return list(torch.autograd.grad(output, inputs, retain_graph=retain_graph, allow_unused=True))
    kept = [x.grad for x in inputs]
    for x in inputs:
        x.grad = None
    (output * world()).backward(retain_graph=retain_graph)  # FSDP averages over processes: this sums
    out = [None if x.grad is None else local(x.grad) if sharded(x) else x.grad / world() for x in inputs]
    for x, g in zip(inputs, kept):
        x.grad = g
    return out


def full_state(model, optimizer=None) -> tuple[dict, dict | None]:
    """Full (unsharded) state dicts of a sharded model and its optimizer, on the CPU of rank 0 (empty on
    the others): a collective. Unsharded: the model's own state dict and the optimizer's (no copies)."""
    if not lockstep(model):
        return dict(model.state_dict()), (optimizer.state_dict() if optimizer is not None else None)
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict, get_optimizer_state_dict

    opts = StateDictOptions(full_state_dict=True, cpu_offload=True)
    return (get_model_state_dict(model, options=opts),
            get_optimizer_state_dict(model, optimizer, options=opts) if optimizer is not None else None)


def load_full_state(model, optimizer, model_state: dict, optim_state: dict | None) -> None:
    """Load full state dicts (`full_state`'s, read by every process) into a sharded model and optimizer."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict, set_optimizer_state_dict

    opts = StateDictOptions(full_state_dict=True, strict=False)
    set_model_state_dict(model, model_state, options=opts)
    if optimizer is not None and optim_state is not None:
        set_optimizer_state_dict(model, optimizer, optim_state, options=opts)


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


def max_count(n: int, device) -> int:
    """The largest of each process's `n` (identity for one process)."""
    if world() == 1:
        return n
    t = torch.tensor([float(n)], device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return int(t.item())


def all_true(flag: bool, device) -> bool:
    """True on every process if `flag` is True on all of them."""
    return not any_flag(not flag, device)


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
