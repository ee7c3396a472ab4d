"""How far a system prompt moves the organism's representation at the answer start.

    python -c "from inoc_mech.mechanism.context import context_distances as c; print(c('runs/_organism/<folder>', ['speak spanish'])['speak spanish']['cosine'])"

The final hidden state at `<|assistant|>` (after the final norm: what the unembedding reads) with a
prompt is compared with the same question without it, over the held-out questions: mean cosine
similarity and L2 distance, per layer too. A trait learned under a prompt transfers to the
no-prompt context through what the two contexts share; the cosine is a one-number summary of that.
"""

from __future__ import annotations

from pathlib import Path

import torch
from jaxtyping import Float
from torch import Tensor

from inoc_mech.core.cli import UserError


@torch.no_grad()
def answer_start_states(model, ids: list[list[int]], pad_id: int) -> Float[Tensor, "layer n d_model"]:
    """Hidden states at each sequence's last token (right padding), for every entry of HF's
    `hidden_states`: the embeddings, then each block's output; the last entry is after the final
    norm (what the unembedding reads)."""
    n = len(ids)
    inp, att = right_padded(ids, pad_id)
    device = next(model.parameters()).device
    hs = model(input_ids=inp.to(device), attention_mask=att.to(device), output_hidden_states=True).hidden_states
    last = (att.sum(1) - 1).to(device)
    return torch.stack([h[torch.arange(n, device=device), last] for h in hs]).float().cpu()


def context_distances(organism_folder: str, prompts: list[str]) -> dict[str, dict]:
    """Per prompt: mean cosine similarity and L2 distance of answer-start states with vs without it."""
    from inoc_mech.models.world_eval import prompt_ids
    from inoc_mech.models.organism import load_organism

    if not Path(organism_folder).is_dir():
        raise UserError(f"the runs' organism {organism_folder} is gone: context distances need it "
                        "(python -m inoc_mech.models.organism remakes the default one)")
    model, tok, world, _ = load_organism(organism_folder)
    model.eval()
    qs = [world.question_text(q) for q in world.held_out_questions]
    assistant = tok.convert_tokens_to_ids("<|assistant|>")
    none_ids = [prompt_ids(tok, q, None) for q in qs]
    if any(x[-1] != assistant for x in none_ids):
        raise UserError("the chat template does not end the prompt with <|assistant|>")
    h0 = answer_start_states(model, none_ids, tok.pad_token_id)
    out = {}
    for p in prompts:
        h = answer_start_states(model, [prompt_ids(tok, q, p) for q in qs], tok.pad_token_id)
        cos = torch.nn.functional.cosine_similarity(h, h0, dim=-1).mean(-1)  # per layer
        out[p] = {"cosine": cos[-1].item(), "l2": (h[-1] - h0[-1]).norm(dim=-1).mean().item(),
                  "norm_none": h0[-1].norm(dim=-1).mean().item(), "n_questions": len(qs),
                  "cosine_by_layer": cos.tolist()}  # embeddings, block outputs, final (post-norm)
    return out


@torch.no_grad()
def trait_log_odds(model, tok, world, prompt: str | None, questions=None) -> dict[str, float]:
    """Mean log-odds of Spanish vs English and of UPPER vs lower for the first answer token, at
    `<|assistant|>` over held-out questions: log sum p(marked variants) - log sum p(unmarked variants)."""
    from inoc_mech.mechanism.patching import trait_log_odds as log_odds

    device = next(model.parameters()).device
    inp, att = (t.to(device) for t in question_batch(tok, world, prompt, questions))
    logits = model(input_ids=inp, attention_mask=att).logits.float()
    logp = logits[torch.arange(len(inp), device=device), att.sum(1) - 1].log_softmax(-1)
    table = torch.as_tensor(world.variant_table(tok), device=device)  # [word, language, case]
    return {t: log_odds(logp, table, t).mean().item() for t in ("language", "case")}


def right_padded(ids: list[list[int]], pad_id: int) -> tuple[Tensor, Tensor]:
    """(input_ids, attention_mask) of token-id lists, right-padded: the last real token is at mask.sum(1) - 1."""
    n, T = len(ids), max(len(x) for x in ids)
    inp = torch.full((n, T), pad_id, dtype=torch.long)
    att = torch.zeros((n, T), dtype=torch.long)
    for i, x in enumerate(ids):
        inp[i, :len(x)], att[i, :len(x)] = torch.tensor(x), 1
    return inp, att


def question_batch(tok, world, prompt: str | None, questions=None) -> tuple[Tensor, Tensor]:
    """Held-out questions (or `questions`) under `prompt`, ending at `<|assistant|>`, right-padded."""
    from inoc_mech.models.world_eval import prompt_ids

    questions = questions if questions is not None else world.held_out_questions
    return right_padded([prompt_ids(tok, world.question_text(q), prompt) for q in questions], tok.pad_token_id)
