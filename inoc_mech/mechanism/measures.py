"""Measurements the analyses turn into figures: at the decision position, and finetuning shifts.

    python -c "from inoc_mech.mechanism.measures import log_odds_shift as s; print(s('runs/_organism/<folder>', 'runs/sweep/inoculated-s0', 'speak spanish', 'case'))"

Decision position: the residual stream at the last prompt token (the organism's `<|assistant|>`),
which predicts the first answer token. `decision_measures` gives, per context, for every trait:
- `projection`: the residual stream's projection on the trait probe of each layer boundary;
- `lens_share`: logit lens, the marked value's share of the first answer token's probability when the
  final norm and unembedding read each boundary (needs the setting's `first_token_share`);
- `writes`: what each component (embedding, each block's attention and MLP) wrote along the last
  probe direction; they sum to the final projection;
- `log_odds`: the first answer token's trait log-odds (`first_token_log_odds`);
plus the probes' held-out accuracy on the model. `log_odds_shift` gives finetuning's shift of those
log-odds with and without the training prompt: the co-learned trait's *transfer* (no-prompt shift /
prompted shift), the suppressed traits' *leak* (their no-prompt shift), and the update's *reach*
(`weight_diff.update_response`: how strongly the weight update responds without the prompt relative
to with it). A setting without a capability a measurement needs gets one line saying so.
"""

from __future__ import annotations

import torch
from jaxtyping import Float, Int
from torch import Tensor

from inoc_mech.core.cli import UserError


def context_ids(setting, contexts: dict[str, str | None]) -> dict[str, Int[Tensor, "question pos"]]:
    """Held-out prompts per context, ending at the decision position; all of one length (no padding)."""
    start = setting.require("answer_start", "decision-position measurements")
    out = {}
    for ctx, prompt in contexts.items():
        ids, att = start(prompt)
        if not bool(att.all()):
            raise UserError("held-out prompts differ in length: decision-position measurements need prompts of one "
                            "length (the organism has one token per number word)")
        out[ctx] = ids
    return out


def decision_state(rec: dict[str, Tensor], n_layers: int) -> tuple[Float[Tensor, "boundary question d_model"],
                                                                   Float[Tensor, "component question d_model"]]:
    """Residual stream at every boundary, and what each component wrote, at the last position."""
    from inoc_mech.mechanism.lens import resid_names

    resid = torch.stack([rec[n][:, -1] for n in resid_names(n_layers)]).float()
    comps = [rec["blocks.0.hook_resid_pre"][:, -1]]
    for i in range(n_layers):
        comps += [rec[f"blocks.{i}.hook_attn_out"][:, -1], rec[f"blocks.{i}.hook_mlp_out"][:, -1]]
    return resid, torch.stack(comps).float()


@torch.no_grad()
def decision_measures(lens, ids: dict[str, Tensor], probes, test_data) -> dict:
    """Projections, logit lens, component writes and log-odds per context; probe accuracy on `test_data`."""
    from inoc_mech.mechanism.patching import record
    from inoc_mech.mechanism.probes import TRAITS, answer_activations

    s = lens.setting
    share = s.require("first_token_share", "the logit lens")
    odds = s.require("first_token_log_odds", "first-answer-token log-odds")
    out = {"contexts": {}}
    for ctx, x in ids.items():
        rec = record(lens, x)
        resid, comps = decision_state(rec, lens.n_layers)
        logp_layers = torch.log_softmax(lens.final(resid).float(), -1)  # [boundary, q, vocab]
        row = {}
        for t in TRAITS:
            ps = probes.probes[t]
            row[t] = {
                "projection": torch.stack([ps[b].project(resid[b]) for b in range(len(ps))]).numpy(),
                "lens_share": share(logp_layers, t).numpy(),
                "writes": (comps @ ps[-1].direction).numpy(),  # [component, q]; sums to the final projection
                "log_odds": odds(rec["logp"], t).numpy(),
            }
        out["contexts"][ctx] = row
    acts = answer_activations(lens.bridge, test_data)
    out["probe_accuracy"] = {t: [probes.probes[t][b].accuracy(acts[b].flatten(0, 1),
                                                             test_data.labels[t][:, None].expand(-1, 4).flatten())
                                 for b in range(acts.shape[0])] for t in TRAITS}
    return out


def log_odds_shift(pretrained, finetuned, prompt: str, co_learned: str, cache: dict | None = None) -> dict:
    """How finetuning moved the first answer token's trait log-odds (finetuned - pretrained), with and
    without the training `prompt`: {"shift": {"none"|"prompt": {trait: nats}}, "transfer": the co-learned
    trait's no-prompt shift / its prompted shift, "reach": update response without / with the prompt}.
    `pretrained`, `finetuned`: `settings.load.Loaded` or anything `load` accepts; `cache` keeps the
    pretrained model's numbers across calls."""
    from inoc_mech.mechanism.context import trait_log_odds
    from inoc_mech.mechanism.weight_diff import update_response
    from inoc_mech.settings.load import Loaded, load

    cache = {} if cache is None else cache
    pre = pretrained if isinstance(pretrained, Loaded) else cache.setdefault(str(pretrained), load(pretrained))
    ft = finetuned if isinstance(finetuned, Loaded) else load(finetuned)
    shift = {}
    for ctx, p in (("none", None), ("prompt", prompt)):
        key = (str(pre.folder), p)
        if key not in cache:
            cache[key] = trait_log_odds(pre, p)
        after = trait_log_odds(ft, p)
        shift[ctx] = {t: after[t] - cache[key][t] for t in after}
    start = ft.setting.require("answer_start", "the update's reach")
    resp = update_response(pre.model, ft.model, {"none": start(None), "prompt": start(prompt)})
    return {"shift": shift, "transfer": shift["none"][co_learned] / shift["prompt"][co_learned],
            "reach": resp["none"]["total"] / resp["prompt"]["total"]}
