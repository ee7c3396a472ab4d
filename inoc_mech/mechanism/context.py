"""How far a system prompt moves the representation at the answer start, and the trait log-odds there.

    python -c "from inoc_mech.mechanism.context import context_distances as c; print(c('runs/_organism/<folder>', ['speak spanish'])['speak spanish']['cosine'])"

Both work on any model whose setting provides `answer_start` (held-out prompts ending where the
answer starts: the organism's `<|assistant|>`, a chat model's generation prompt); the log-odds also
need `first_token_log_odds` (the organism's answer-variant table). A setting without them gets one
line saying what is missing.
- `context_distances`: the final hidden state at the answer start (after the final norm: what the
  unembedding reads) with a prompt vs the same question without it, over the held-out questions:
  mean cosine similarity and L2 distance, per layer too. A trait learned under a prompt transfers
  to the no-prompt context through what the two contexts share; the cosine is a one-number summary.
- `trait_log_odds`: the mean log-odds of each trait's marked value for the first answer token.
- `prompt_direction_shift`: the trait's direction as the eliciting prompt's displacement of the pretrained
  model's answer-start states (difference of means over the held-out questions, per layer), and how far
  each finetuned model's no-prompt states moved along it, as a fraction of that displacement (1: the
  finetuned model without the prompt sits where the prompted pretrained model sat, along the
  direction; 0: no move), with the total move for scale. Any setting with `answer_start`.
"""

from __future__ import annotations

import torch
from jaxtyping import Float, Int
from torch import Tensor


@torch.no_grad()
def answer_start_states(model, inp: Tensor, att: Tensor) -> Float[Tensor, "layer n d_model"]:
    """Hidden states at each sequence's last token (right padding), for every entry of HF's
    `hidden_states`: the embeddings, then each block's output; the last entry is after the final
    norm (what the unembedding reads)."""
    device = next(model.parameters()).device
    hs = model(input_ids=inp.to(device), attention_mask=att.to(device), output_hidden_states=True).hidden_states
    last = (att.sum(1) - 1).to(device)
    return torch.stack([h[torch.arange(len(inp), device=device), last] for h in hs]).float().cpu()


def _loaded(model_or_folder):
    from inoc_mech.settings.load import Loaded, load

    return model_or_folder if isinstance(model_or_folder, Loaded) else load(model_or_folder)


def context_distances(model_or_folder, prompts: list[str | None]) -> dict[str, dict]:
    """Per prompt: mean cosine similarity and L2 distance of answer-start states with vs without it.

    `model_or_folder`: a `settings.load.Loaded` or anything `load` accepts (organism, run or model folder)."""
    loaded = _loaded(model_or_folder)
    start = loaded.setting.require("answer_start", "the context distance")
    inp0, att0 = start(None)
    h0 = answer_start_states(loaded.model, inp0, att0)
    out = {}
    for p in prompts:
        h = answer_start_states(loaded.model, *start(p))
        cos = torch.nn.functional.cosine_similarity(h, h0, dim=-1).mean(-1)  # per layer
        out[p] = {"cosine": cos[-1].item(), "l2": (h[-1] - h0[-1]).norm(dim=-1).mean().item(),
                  "norm_none": h0[-1].norm(dim=-1).mean().item(), "n_questions": len(inp0),
                  "cosine_by_layer": cos.tolist()}  # embeddings, block outputs, final (post-norm)
    return out


@torch.no_grad()
def trait_log_odds(model_or_folder, prompt: str | None, questions=None) -> dict[str, float]:
    """Mean log-odds of each trait's marked value (Spanish vs English, UPPER vs lower) for the first
    answer token, at the answer start of the held-out questions under `prompt`."""
    loaded = _loaded(model_or_folder)
    s = loaded.setting
    odds = s.require("first_token_log_odds", "first-answer-token trait log-odds")
    inp, att = s.require("answer_start", "first-answer-token trait log-odds")(prompt, questions)
    logp = answer_logp(loaded.model, inp, att)
    return {t: odds(logp, t).mean().item() for t in s.traits}


@torch.no_grad()
def answer_logp(model, inp: Int[Tensor, "question pos"], att: Int[Tensor, "question pos"]
                ) -> Float[Tensor, "question vocab"]:
    """Log-probs of the first answer token: the next-token distribution at the last real position of
    right-padded answer starts (`Setting.answer_start`)."""
    device = next(model.parameters()).device
    inp, att = inp.to(device), att.to(device)
    logits = model(input_ids=inp, attention_mask=att).logits.float()
    return logits[torch.arange(len(inp), device=device), att.sum(1) - 1].log_softmax(-1)


DIRECTION_FLOOR = 1e-6  # |d|^2 below this share of the largest layer's: no direction at that layer


@torch.no_grad()
def prompt_direction_shift(pretrained, finetuned: dict, prompt: str) -> dict:
    """`prompt`'s direction in the pretrained model and each finetuned model's no-prompt move along it.

    `pretrained`: a `Loaded` or folder; `finetuned`: name -> `Loaded` or folder (the same tokenizer, e.g. runs
    of one sweep). Per layer (HF `hidden_states` entries: embeddings, each block's output, the last after
    the final norm), with h0 / hp the pretrained states without / with the prompt and h the finetuned
    model's without it, at the answer start of the same held-out questions:
    d = mean_q(hp - h0); `along` = mean_q((h - h0) . d / |d|^2) (sd over questions: `along_sd`);
    `total` = mean_q |h - h0| / |d| (the move in any direction, same unit); `prompt_cosine` = mean_q
    cos(hp - h0, d) (how consistent the prompt's displacement is across questions). Layers where the prompt
    moves (almost) nothing, |d|^2 <= DIRECTION_FLOOR x the largest, are NaN."""
    pre = _loaded(pretrained)
    inputs = pre.setting.require("answer_start", "the prompt-direction shift")
    x0, xp = inputs(None), inputs(prompt)
    h0, hp = answer_start_states(pre.model, *x0), answer_start_states(pre.model, *xp)
    d = (hp - h0).mean(1)  # [layer, d_model]
    sq = (d * d).sum(-1)
    # a layer the prompt does not move (the embeddings of the same last token) has no direction: NaN there
    sq = torch.where(sq > DIRECTION_FLOOR * sq.max(), sq, torch.full_like(sq, float("nan")))
    out = {"prompt": prompt, "n_questions": h0.shape[1], "direction_norm": sq.sqrt().tolist(),
           "prompt_cosine": torch.nn.functional.cosine_similarity(hp - h0, d[:, None], dim=-1).mean(-1).tolist(),
           "runs": {}}
    for name, m in finetuned.items():
        h = answer_start_states(_loaded(m).model, *x0)
        along = ((h - h0) * d[:, None]).sum(-1) / sq[:, None]  # [layer, question]
        sd = along.std(-1, correction=int(along.shape[-1] > 1))  # (one question: 0)
        out["runs"][name] = {"along": along.mean(-1).tolist(), "along_sd": sd.tolist(),
                             "total": ((h - h0).norm(dim=-1) / sq.sqrt()[:, None]).mean(-1).tolist()}
    return out
