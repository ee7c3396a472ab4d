"""Activation patching between two models of the same architecture (e.g. baseline -> inoculated).

    python -m inoc_mech.mechanism.patching runs/sweep/baseline-s0 runs/sweep/inoculated-s0

The source model's activations on the same inputs replace the target model's, one site at a time:
- the residual stream at one layer boundary and one position (`resid`: boundary 0 is the embedding,
  boundary L + 1 the output of block L);
- one block's attention or MLP output at all positions or at the last one (`attn`, `mlp`);
- the final norm and unembedding (`unembed`: the source's readout applied to the target's final
  residual stream at the last position).
The metric is a function of the log-probabilities at the last position (for the organism: the
Spanish or UPPER log-odds of the first answer token, the setting's `first_token_log_odds`). `restored` is the share of
the source-target gap a patch closes: (patched - target) / (source - target).

Patching a model into itself changes nothing (tested): every site returns the target's own value.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import torch
from jaxtyping import Float, Int
from torch import Tensor

from inoc_mech.mechanism.lens import Lens, resid_names

Metric = Callable[[Tensor], Tensor]  # log-probs [batch vocab] at the last position -> [batch]


def component_names(n_layers: int) -> dict[str, str]:
    """Short site name -> hook name of every block's attention and MLP output."""
    out = {}
    for i in range(n_layers):
        out[f"attn{i}"] = f"blocks.{i}.hook_attn_out"
        out[f"mlp{i}"] = f"blocks.{i}.hook_mlp_out"
    return out


@torch.no_grad()
def record(lens: Lens, input_ids: Int[Tensor, "batch pos"]) -> dict[str, Tensor]:
    """Every residual boundary and component output (all positions), and last-position log-probs."""
    names = set(resid_names(lens.n_layers)) | set(component_names(lens.n_layers).values())
    logits, cache = lens.bridge.run_with_cache(input_ids, names_filter=lambda n: n in names)
    out = {n: cache[n].detach().clone() for n in names}
    out["logp"] = torch.log_softmax(logits[:, -1].float(), -1)
    return out


@dataclass
class PatchResult:
    """Mean metric of the target, the source and every patched run."""
    target: float
    source: float
    resid: np.ndarray  # [boundary, position]
    components: dict[str, dict[str, float]] = field(default_factory=dict)  # site -> {"all", "last"}
    unembed: float = float("nan")

    def restored(self, value):
        gap = self.source - self.target
        return (np.asarray(value) - self.target) / gap if abs(gap) > 1e-9 else np.full_like(np.asarray(value, float), np.nan)

    def to_dict(self) -> dict:
        return {"target": self.target, "source": self.source, "gap": self.source - self.target,
                "resid": self.resid.tolist(), "resid_restored": self.restored(self.resid).tolist(),
                "components": self.components,
                "components_restored": {k: {w: float(self.restored(v)) for w, v in d.items()}
                                        for k, d in self.components.items()},
                "unembed": self.unembed, "unembed_restored": float(self.restored(self.unembed))}


def _replace(src: Tensor, position: int | None):
    def fn(tensor, *, hook):
        out = tensor.clone()
        if position is None:
            out[:] = src
        else:
            out[:, position] = src[:, position]
        return out
    return fn


@torch.no_grad()
def patch(target: Lens, source: Lens | None, input_ids: Int[Tensor, "batch pos"], metric: Metric,
          source_record: dict[str, Tensor] | None = None) -> PatchResult:
    """Patch the source's activations into the target at every site; mean metric per site."""
    from inoc_mech.mechanism.lens import run_with_hooks

    src = source_record if source_record is not None else record(source, input_ids)
    mine = record(target, input_ids)
    T = input_ids.shape[1]

    def run(hooks) -> float:
        return metric(run_with_hooks(target.bridge, input_ids, hooks)[:, -1]).mean().item()

    names = resid_names(target.n_layers)
    resid = np.zeros((len(names), T))
    for b, name in enumerate(names):
        for pos in range(T):
            resid[b, pos] = run([(name, _replace(src[name], pos))])
    comps = {}
    for site, name in component_names(target.n_layers).items():
        comps[site] = {"all": run([(name, _replace(src[name], None))]),
                       "last": run([(name, _replace(src[name], T - 1))])}
    unembed = float("nan")
    if source is not None:  # the source's final norm + unembedding reading the target's last residual
        final = mine[names[-1]][:, -1]
        unembed = metric(torch.log_softmax(source.final(final).float(), -1)).mean().item()
    return PatchResult(metric(mine["logp"]).mean().item(), metric(src["logp"]).mean().item(), resid, comps, unembed)


@dataclass
class PatchConfig:
    """Patch SOURCE's residual stream into TARGET (no system prompt, held-out questions) and print the
    trait log-odds gap restored per layer boundary and position."""
    source: str = field(default="", metadata={"help": "run or model folder whose activations are patched in", "positional": None})
    target: str = field(default="", metadata={"help": "run or model folder patched", "positional": None})
    trait: str = field(default="language", metadata={"help": "trait whose first-token log-odds is the metric"})

def main(argv=None):
    from inoc_mech.core.cli import UserError, parse_config
    from inoc_mech.mechanism.lens import load_bridge

    a = parse_config(PatchConfig, argv, prog="python -m inoc_mech.mechanism.patching", description=PatchConfig.__doc__)
    torch.set_num_threads(1)
    src, tgt = load_bridge(a.source), load_bridge(a.target)
    odds = tgt.setting.require("first_token_log_odds", "patching's trait log-odds")
    if a.trait not in tgt.setting.traits:
        raise UserError(f"--trait {a.trait!r}: the setting's traits are {', '.join(tgt.setting.traits)}")
    ids, _ = tgt.setting.require("answer_start", "patching")(None)
    r = patch(tgt, src, ids, lambda lp: odds(lp, a.trait))
    print(f"{a.trait} log-odds: target {r.target:.2f}, source {r.source:.2f}; share restored (rows: boundary, "
          f"cols: position {' '.join(tgt.tok.convert_ids_to_tokens(ids[0]))})")
    for b, row in enumerate(r.restored(r.resid)):
        print(f"{'emb' if b == 0 else f'block {b - 1}':<8}" + " ".join(f"{v:6.2f}" for v in row))

if __name__ == "__main__":
    from inoc_mech.core.cli import run_main
    sys.exit(run_main(main))
