"""Checkpoints that survive a kill: everything a run needs to continue bitwise-identically.

    python -m inoc_mech.train --steps 40 --checkpoint-every 10 --name ckpt-demo --overwrite

One file, `<run>/checkpoint.pt`, written atomically (temporary file, fsync, rename), holding the
trainable parameters (all of them, or the LoRA adapters; the factored head's factors included), optimizer state, every
RNG state (torch, numpy's global, python's, CUDA when present), the data position, the step to
continue from and the byte length of metrics.jsonl at that step. A crash while writing leaves the
previous checkpoint intact. Everything in it is tensors and plain values, so it is read with
`torch.load(weights_only=True)`: a crafted checkpoint cannot run code on `--resume`. A full disk
(or any failed write) removes the temporary file and stops with one line.
"""

from __future__ import annotations

import os
import random
from pathlib import Path

import numpy as np
import torch

from inoc_mech.core import dist
from inoc_mech.core.cli import UserError
from inoc_mech.core.runs import is_disk_full

NAME = "checkpoint.pt"


def rng_state() -> dict:
    """Every global RNG state as tensors and plain values (loadable with weights_only=True)."""
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    version, internal, gauss = random.getstate()
    s = {"torch": torch.get_rng_state(),
         "numpy": {"kind": kind, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                   "has_gauss": int(has_gauss), "cached": float(cached)},
         "python": {"version": version, "internal": torch.tensor(internal, dtype=torch.int64), "gauss": gauss}}
    if torch.cuda.is_available():
        s["cuda"] = torch.cuda.get_rng_state_all()
    return s


def set_rng_state(s: dict) -> None:
    torch.set_rng_state(s["torch"])
    n = s["numpy"]
    np.random.set_state((n["kind"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["cached"]))
    py = s["python"]
    random.setstate((py["version"], tuple(int(x) for x in py["internal"].tolist()), py["gauss"]))
    if "cuda" in s and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(s["cuda"])


def save(run: Path, *, step: int, model, optimizer, stream, metrics_bytes: int) -> None:
    """Write the checkpoint for continuing at `step` (atomic; ENOSPC becomes a clear UserError). Called on
    every process: rank 0 writes; an FSDP-sharded model's full state is gathered first (a collective)."""
    names = [n for n, p in model.named_parameters() if p.requires_grad]  # not frozen bases
    full, optim = dist.full_state(model, optimizer)  # sharded: gathered onto rank 0 (a collective)
    if not dist.is_main():
        return
    trainable = {n: full[n] for n in names}
    path = Path(run) / NAME
    tmp = path.with_name(NAME + ".tmp")
    state = {"step": step, "model": trainable, "optimizer": optim, "rng": rng_state(),
             "data": stream.state(), "metrics_bytes": metrics_bytes, "sharded": dist.lockstep(model)}
    try:
        with open(tmp, "wb") as f:
            torch.save(state, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except (OSError, RuntimeError) as e:
        tmp.unlink(missing_ok=True)
        if is_disk_full(e):
            raise UserError(f"disk full while writing the checkpoint for step {step} in {run}: free space, "
                            "then continue with --resume (the previous checkpoint is intact)") from e
        if isinstance(e, OSError):
            raise UserError(f"cannot write checkpoint in {run}: {e.strerror or e}") from e
        raise


def load(run: Path) -> dict:
    path = Path(run) / NAME
    if not path.exists():
        raise UserError(f"run {run} has no checkpoint to resume from: start it again with --overwrite")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)  # tensors and plain values only: no code runs
    except Exception as e:  # a truncated or foreign file
        raise UserError(f"checkpoint {path} is unreadable ({type(e).__name__}): start the run again with --overwrite") from e


def restore(state: dict, *, model, optimizer, stream) -> int:
    """Load a checkpoint into live objects; returns the step to continue from."""
    missing = [n for n, p in model.named_parameters() if p.requires_grad and n not in state["model"]]
    if missing:
        raise UserError(f"checkpoint does not match the model (missing {missing[0]}): start the run again with --overwrite")
    if dist.lockstep(model) != bool(state.get("sharded", False)):
        raise UserError("checkpoint was written " + ("with" if state.get("sharded") else "without") +
                        " --fsdp and the run now goes " + ("with" if dist.lockstep(model) else "without") +
                        " it: resume it as it started")
    if dist.lockstep(model):  # full state dicts into this process's shards
        dist.load_full_state(model, optimizer, state["model"], state["optimizer"])
    else:
        model.load_state_dict(state["model"], strict=False)
        optimizer.load_state_dict(state["optimizer"])
    stream.load_state(state["data"])
    set_rng_state(state["rng"])
    return int(state["step"])
