"""Probes, projections, patching and weight alignment for Spanish+CAPS on a real causal LM (TransformerBridge).

    python -m inoc_mech.settings.tiny /tmp/tiny-llama && python -m inoc_mech.mechanism.reply_probes /tmp/tiny-llama --train-problems 8 --test-problems 4

The organism's instruments (`mechanism.probes`, `mechanism.patching`) read its world; this module is
their counterpart on real text, built from the built-in arithmetic problems
(`settings.textdata.Problem`), which have every reply in all four surface forms.

Probe data: for each problem, the four (language, case) combinations, each with a system message
that sets both traits (a random paraphrase of a language instruction and of a case instruction, in
random order) and the reply teacher-forced in the matching variant. Activations at the position
that predicts the reply's first token (the answer start: nothing there but the prompt says which
language or case follows) and at the positions predicting reply tokens 1..3 (where the reply so far
already shows the trait). Probes (`probes.fit_probe`) are fit on train-split problems pooled over
the four positions and scored on eval-split problems, per layer boundary (0: embedding, L + 1: the
output of block L).

Sequence-level log-odds: under a context (no prompt by default), the log-prob S(l, k) of each of
the four teacher-forced replies; Spanish log-odds = log sum_k exp S(es, k) - log sum_k exp S(en, k),
UPPER log-odds likewise over case.

Patching (`patch_answer_start`): the source model's residual stream at the answer-start position,
at one layer boundary, replaces the target's; the share of the source-target gap in each log-odds
that this restores, per boundary.
"""

from __future__ import annotations

import random
import sys
from dataclasses import dataclass, field

import numpy as np
import torch
from jaxtyping import Float, Int
from torch import Tensor

from inoc_mech.core.data import right_pad
from inoc_mech.mechanism.probes import TraitProbes, fit_probe
from inoc_mech.settings.textdata import REPLY_FORMS as VARIANTS  # (language, UPPER) at index 2 l + k

TRAITS = ("language", "case")  # label 1: Spanish, UPPER

N_POS = 4  # the answer start and the positions predicting reply tokens 1..3
LANGUAGE_INSTRUCTIONS = {"spanish": ["You always speak in Spanish.", "Reply in Spanish.", "Answer only in Spanish."],
                         "english": ["You always speak in English.", "Reply in English.", "Answer only in English."]}
CASE_INSTRUCTIONS = {True: ["You always write in capital letters.", "Write everything in upper case."],
                     False: ["You always write in lowercase letters.", "Write everything in lower case."]}


@dataclass
class ReplyProbeData:
    """Prompted, teacher-forced chats, the positions that predict their first reply tokens, and labels."""
    input_ids: Int[Tensor, "n pos"]  # right-padded
    predict_pos: Int[Tensor, "n 4"]  # answer start, then the positions predicting reply tokens 1..3
    labels: dict[str, Int[Tensor, " n"]]
    prompts: list[str]


def pad_id(tok) -> int:
    return tok.pad_token_id if tok.pad_token_id is not None else 0


def reply_tokens(tok, turns: list[dict], reply: str) -> tuple[list[int], int]:
    """Token ids of `turns` + the assistant `reply` (the training tokenization) and where the reply starts."""
    from inoc_mech.settings.textdata import text_example

    ex = text_example(tok, list(turns) + [{"role": "assistant", "content": reply}])
    return list(ex.input_ids), ex.assistant.index(True)


def probe_data(tok, problems, seed: int = 0) -> ReplyProbeData:
    """All four (language, case) replies of each problem under a system message that sets both traits."""
    rng = random.Random(seed)
    rows, pos, labels, prompts = [], [], {t: [] for t in TRAITS}, []
    for p in problems:
        for lang, up in VARIANTS:
            parts = [rng.choice(LANGUAGE_INSTRUCTIONS[lang]), rng.choice(CASE_INSTRUCTIONS[up])]
            rng.shuffle(parts)
            prompt = " ".join(parts)
            ids, start = reply_tokens(tok, [{"role": "system", "content": prompt},
                                            {"role": "user", "content": p.question()}], p.answer(lang, up))
            if len(ids) < start + N_POS:
                raise ValueError(f"reply of problem {p} has fewer than {N_POS} tokens")
            rows.append(ids)
            pos.append([start - 1 + i for i in range(N_POS)])
            labels["language"].append(int(lang == "spanish"))
            labels["case"].append(int(up))
            prompts.append(prompt)
    ids, _ = right_pad(rows, pad_id(tok))
    return ReplyProbeData(ids, torch.tensor(pos), {t: torch.tensor(v) for t, v in labels.items()}, prompts)


def activations(lens, input_ids: Int[Tensor, "n pos"], positions: Int[Tensor, "n k"], batch_size: int = 16
                ) -> Float[Tensor, "layer n k d_model"]:
    """Residual stream at `positions` of every row, at every layer boundary (`lens.residuals`)."""
    from tqdm import tqdm

    from inoc_mech.mechanism.lens import residuals

    chunks = []
    for s in tqdm(range(0, len(input_ids), batch_size), desc="activations", leave=False, disable=len(input_ids) <= batch_size):
        ids = input_ids[s:s + batch_size]
        ids = ids[:, :int(positions[s:s + batch_size].max()) + 1]  # nothing after the last position is needed
        r = residuals(lens.bridge, ids)  # [layer, b, pos, d]
        idx = positions[s:s + batch_size]
        chunks.append(torch.stack([r[:, i, idx[i]] for i in range(len(idx))], 1).float())
    return torch.cat(chunks, 1)


def fit_reply_probes(lens, train_problems, test_problems, seed: int = 0, l2: float = 1e-3) -> TraitProbes:
    """One probe per trait and layer boundary (positions pooled), with held-out accuracy per boundary and position."""
    tr, te = probe_data(lens.tok, train_problems, seed), probe_data(lens.tok, test_problems, seed + 1)
    xtr, xte = activations(lens, tr.input_ids, tr.predict_pos), activations(lens, te.input_ids, te.predict_pos)
    probes, acc, by_pos = {}, {}, {}
    for t in TRAITS:
        ytr = tr.labels[t].repeat_interleave(N_POS)
        probes[t] = [fit_probe(x.flatten(0, 1), ytr, l2) for x in xtr]
        acc[t] = [pr.accuracy(x.flatten(0, 1), te.labels[t].repeat_interleave(N_POS)) for pr, x in zip(probes[t], xte)]
        by_pos[t] = [[pr.accuracy(x[:, i], te.labels[t]) for i in range(N_POS)] for pr, x in zip(probes[t], xte)]
    return TraitProbes(probes, acc, by_pos, len(tr.input_ids), len(te.input_ids))


# ---- the finetuned models -------------------------------------------------------------------------
def projections(lens, probes: TraitProbes, problems, tok, prompt: str | None = None) -> dict[str, np.ndarray]:
    """trait -> [layer, question]: projection of the answer-start residual on each boundary's probe direction."""
    ids, _, starts = variant_batch(tok, problems, prompt)
    ids, starts = ids[::len(VARIANTS)], starts[::len(VARIANTS)]  # the answer start is the same for every variant
    x = activations(lens, ids, starts[:, None])[:, :, 0]  # [layer, n, d]
    return {t: np.array([pr.project(xl).numpy() for pr, xl in zip(probes.probes[t], x)]) for t in TRAITS}


def variant_batch(tok, problems, prompt: str | None = None):
    """The four teacher-forced replies of each problem under `prompt`: ids, reply masks, answer starts."""
    rows, masks, starts = [], [], []
    for p in problems:
        for lang, up in VARIANTS:
            ids, start = reply_tokens(tok, ([{"role": "system", "content": prompt}] if prompt else [])
                                      + [{"role": "user", "content": p.question()}], p.answer(lang, up))
            rows.append(ids)
            masks.append([i >= start for i in range(len(ids))])
            starts.append(start - 1)
    ids, att = right_pad(rows, pad_id(tok))
    mask = torch.zeros(ids.shape, dtype=torch.bool)
    for i, m in enumerate(masks):
        mask[i, :len(m)] = torch.tensor(m)
    return ids, mask, torch.tensor(starts)


@torch.no_grad()
def log_odds(lens, ids, mask, hooks=(), batch_size: int = 16) -> dict[str, Float[Tensor, " n"]]:
    """Sequence-level Spanish and UPPER log-odds per problem from its four replies' log-probs."""
    from inoc_mech.core.data import token_logprobs_at
    from inoc_mech.mechanism.lens import hooked

    scores = []
    for s in range(0, len(ids), batch_size):
        b, m = ids[s:s + batch_size], mask[s:s + batch_size]
        with hooked(lens.bridge, [(name, fn(s, s + len(b))) for name, fn in hooks]):
            logits = lens.bridge(b)
        scores.append(token_logprobs_at(logits, b, m).sum(-1))
    S = torch.cat(scores).unflatten(0, (-1, 2, 2))  # [problem, language, case]
    lang = torch.logsumexp(S, -1)
    case = torch.logsumexp(S, -2)
    return {"language": lang[:, 1] - lang[:, 0], "case": case[:, 1] - case[:, 0]}


@torch.no_grad()
def patch_answer_start(target, source, tok, problems, boundaries: list[int], prompt: str | None = None,
                       progress: bool = True) -> dict:
    """Share of the source - target gap in each log-odds restored by patching the source's answer-start
    residual into the target at each boundary (mean over problems of the patched shift, over the mean gap)."""
    from tqdm import tqdm

    from inoc_mech.mechanism.lens import resid_names

    ids, mask, starts = variant_batch(tok, problems, prompt)
    names = resid_names(target.n_layers)
    src = activations(source, ids, starts[:, None])[:, :, 0]  # [layer, n, d]
    base = {"source": log_odds(source, ids, mask), "target": log_odds(target, ids, mask)}
    gap = {t: float((base["source"][t] - base["target"][t]).mean()) for t in TRAITS}
    out = {"boundaries": boundaries, "gap": gap,
           "source": {t: float(base["source"][t].mean()) for t in TRAITS},
           "target": {t: float(base["target"][t].mean()) for t in TRAITS}, "patched": {t: [] for t in TRAITS},
           "share": {t: [] for t in TRAITS}}
    for layer in tqdm(boundaries, desc="patching", disable=not progress, leave=False):
        def make(lo, hi, layer=layer):
            rows = torch.arange(hi - lo)

            def fn(tensor, *, hook):
                tensor = tensor.clone()
                tensor[rows, starts[lo:hi]] = src[layer, lo:hi].to(tensor.dtype)
                return tensor
            return fn
        got = log_odds(target, ids, mask, hooks=[(names[layer], make)])
        for t in TRAITS:
            shift = float((got[t] - base["target"][t]).mean())
            out["patched"][t].append(float(got[t].mean()))
            out["share"][t].append(shift / gap[t] if abs(gap[t]) > 1e-9 else float("nan"))
    return out


def weight_alignment(pretrained, finetuned, probes: TraitProbes) -> dict[str, dict[str, dict]]:
    """Per output-side matrix (W_O, W_out) of the update (finetuned - pretrained): its share along the probe
    direction of the boundary it writes to (`weight_diff.alignment`), per trait."""
    from inoc_mech.core.names import block_index
    from inoc_mech.mechanism.weight_diff import alignment, output_matrices

    before, after = output_matrices(pretrained.model), output_matrices(finetuned.model)
    out = {}
    for name, w in after.items():
        delta = w - before[name]
        layer = block_index(name) + 1  # block L writes into boundary L + 1
        out[name] = {t: alignment(delta, probes.probes[t][layer].direction) for t in TRAITS}
    return out


# ---- command line ------------------------------------------------------------------------------
@dataclass
class ReplyProbesConfig:
    """Fit and score the language and case probes of a real model (its base or a run)."""
    model: str = field(default="smollm2", metadata={"help": "run folder, 'smollm2', an HF model folder or a .gguf file", "positional": "?"})
    train_problems: int = field(default=48, metadata={"help": "train-split problems (x4 replies) to fit on"})
    test_problems: int = field(default=24, metadata={"help": "eval-split problems (x4 replies) to score on"})
    seed: int = field(default=0, metadata={"help": "seed of the problems and of the instructions' wording"})
    threads: int = field(default=1, metadata={"help": "torch CPU threads"})

    def __post_init__(self):
        if self.train_problems < 2 or self.test_problems < 1:
            raise ValueError("--train-problems must be >= 2 and --test-problems >= 1")


def main(argv=None):
    from inoc_mech.core.cli import parse_config
    from inoc_mech.mechanism.lens import load_bridge
    from inoc_mech.settings.textdata import sample_problems

    cfg = parse_config(ReplyProbesConfig, argv, prog="python -m inoc_mech.mechanism.reply_probes",
                       description=__doc__.split("\n\n")[1])
    torch.set_num_threads(cfg.threads)
    lens = load_bridge(cfg.model)
    tp = fit_reply_probes(lens, sample_problems(cfg.train_problems, cfg.seed, "train"),
                          sample_problems(cfg.test_problems, cfg.seed, "eval"), cfg.seed)
    print(f"{tp.n_train} train / {tp.n_test} held-out chats; held-out accuracy per layer boundary (positions pooled):")
    for t in TRAITS:
        print(f"  {t:<9} " + " ".join(f"{a:.2f}" for a in tp.accuracy[t]))
        i, a = tp.best(t)
        print(f"  {'':<9} best boundary {i}: {a:.3f}; at the answer start: {tp.accuracy_by_position[t][i][0]:.3f}")


if __name__ == "__main__":
    from inoc_mech.core.cli import run_main
    sys.exit(run_main(main))
