"""Finetuned-minus-pretrained weights of the matrices that write into the residual stream, and how
much of each update writes along a given direction (e.g. a trait probe's).

    python -m inoc_mech.mechanism.weight_diff runs/_organism/factored-d128-l4-s0-68886ceb60 runs/sweep/baseline-s0

Output-side matrices of a block, as the architecture's naming table says (`core.names`, `outputs`):
for Llama-style models attention `o_proj` (TransformerLens `W_O`, [d_model, d_model] as an HF weight
[out, in]) and MLP `down_proj` (`W_out`, [d_model, d_mlp]). Their columns live in the residual
stream, so for a unit direction u in it:
- `share` = ||u^T dW|| / ||dW||_F, the fraction of the update's size that writes along u. An update
  with no preferred output direction gives about 1 / sqrt(d_model) (`random_share`);
- `top_cos` = |cos(u, first left singular vector of dW)|, whether the update's main output direction
  is u (random level also about 1 / sqrt(d_model), up to a constant).
"""

from __future__ import annotations

import math
import sys
from dataclasses import dataclass, field

import torch
from jaxtyping import Float
from torch import Tensor

from inoc_mech.core.cli import UserError
from inoc_mech.core.names import arch_names, block_index, is_output_matrix, module_name

def output_matrices(model) -> dict[str, Float[Tensor, "d_model d_in"]]:
    """`blocks.{L}.attn.W_O` / `blocks.{L}.mlp.W_out` -> HF weight [d_model, d_in] (detached copy)."""
    names = arch_names(model)
    modules = dict(model.named_modules())
    out = {}
    for name, p in model.named_parameters():
        if not name.endswith(".weight"):
            continue
        tl = module_name(name, names)
        if is_output_matrix(tl, names):
            w = p.detach().float().clone()
            out[tl] = w.T.contiguous() if _is_conv1d(modules.get(name[:-len(".weight")])) else w  # GPT-2: [in, out]
    if not out:
        raise UserError(f"found no output-side block matrices: architecture {model.config.model_type!r} has no "
                        "naming table in inoc_mech.core.names (add one with its `outputs`)")
    return dict(sorted(out.items(), key=lambda kv: (block_index(kv[0]), kv[0])))


def alignment(delta: Float[Tensor, "d_model d_in"], direction: Float[Tensor, " d_model"]) -> dict[str, float]:
    """Norm of the update, share of it along `direction`, and |cos| with its top output direction."""
    u = direction.float() / direction.float().norm()
    norm = delta.norm().item()
    if norm == 0:
        return {"norm": 0.0, "share": float("nan"), "top_cos": float("nan")}
    share = (u @ delta).norm().item() / norm
    left = torch.linalg.svd(delta.double(), full_matrices=False).U[:, 0].float()
    return {"norm": norm, "share": share, "top_cos": abs(float(u @ left))}


@torch.no_grad()
def update_response(pretrained, finetuned, batches: dict[str, tuple[Tensor, Tensor]]) -> dict[str, dict[str, float]]:
    """How strongly each projection's update dW = W_ft - W_pre responds to the finetuned model's own
    input at the last real token, per batch: {batch name: {module: mean ||dW x||}}, plus "total":
    the root of the summed squares over modules. `batches` maps a name to (input_ids, attention_mask),
    right-padded. Comparing a prompted batch with an unprompted one tells how much of the update is
    reached from the no-prompt context (1: equally; 0: only from the prompt's)."""
    pre = dict(pretrained.named_modules())
    names = arch_names(finetuned)
    mods = {n: m for n, m in finetuned.named_modules()
            if (isinstance(m, torch.nn.Linear) or _is_conv1d(m)) and block_index(module_name(n, names)) is not None}
    if not mods:
        raise UserError("found no linear layers inside the blocks (merge LoRA adapters first)")
    deltas = {n: (m.weight.float() - pre[n].weight.float()) for n, m in mods.items()}
    deltas = {n: d.T if _is_conv1d(mods[n]) else d for n, d in deltas.items()}  # all as [out, in]
    out = {}
    for name, (ids, mask) in batches.items():
        seen: dict[str, Tensor] = {}
        handles = [m.register_forward_hook(lambda mod, inp, _o, n=n: seen.__setitem__(n, inp[0].detach()))
                   for n, m in mods.items()]
        try:
            finetuned(input_ids=ids, attention_mask=mask)
        finally:
            for h in handles:
                h.remove()
        last = mask.sum(1) - 1
        rows = {}
        for n, x in seen.items():
            x_last = x[torch.arange(len(ids)), last].float()  # [batch, d_in]
            rows[n] = (x_last @ deltas[n].T).norm(dim=-1).mean().item()
        rows["total"] = math.sqrt(sum(v * v for v in rows.values()))
        out[name] = rows
    return out


def _is_conv1d(module) -> bool:
    """GPT-2's Conv1D: a linear layer whose weight is stored [in, out]."""
    from transformers.pytorch_utils import Conv1D

    return isinstance(module, Conv1D)


def random_share(d_model: int) -> float:
    """Expected `share` for an update without a preferred output direction (about 1/sqrt(d_model))."""
    return 1 / math.sqrt(d_model)


@dataclass
class WeightDiffConfig:
    """Frobenius norm of (finetuned - pretrained) per output-side matrix."""
    pretrained: str = field(default="", metadata={"help": "pretrained model or organism folder", "positional": None})
    finetuned: str = field(default="", metadata={"help": "run or model folder", "positional": None})

def main(argv=None):
    from inoc_mech.core.cli import parse_config
    from inoc_mech.mechanism.lens import load_bridge

    a = parse_config(WeightDiffConfig, argv, prog="python -m inoc_mech.mechanism.weight_diff",
                     description=WeightDiffConfig.__doc__)
    pre, ft = output_matrices(load_bridge(a.pretrained).model), output_matrices(load_bridge(a.finetuned).model)
    for k in pre:
        print(f"{k:<22} ||dW||_F = {(ft[k] - pre[k]).norm():.4f}   ||W||_F = {pre[k].norm():.3f}")

if __name__ == "__main__":
    from inoc_mech.core.cli import run_main
    sys.exit(run_main(main))
