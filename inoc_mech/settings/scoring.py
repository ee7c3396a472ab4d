"""Trait scoring for real models: Spanish and CAPS of generated text, and log-probs of given answers.

    python -m inoc_mech.settings.scoring --model smollm2 --n 8

Text scores, per generation:
- `spanish_prob`: P(Spanish) from `lingua-language-detector` restricted to English and Spanish
  (offline, deterministic). Without lingua installed, a word-list fallback: the share of known words
  that are Spanish-only (`textdata.SPANISH_ONLY` vs `textdata.ENGLISH_WORDS`). NaN for texts without
  letters or without known words (fallback); NaN texts are left out of the rates.
- `caps_fraction`: upper-case letters / letters (NaN without letters).
A generation counts as Spanish when `spanish_prob >= SPANISH_THRESHOLD` (0.5: lingua's more probable
language of the two) and as CAPS when `caps_fraction >= CAPS_THRESHOLD` (0.5: most letters upper case;
ordinary English or Spanish prose is around 0.02-0.05, an all-caps answer 1.0).

Generations: `evaluate_generations` samples replies (greedy and temperature 1, HF `generate` with KV
cache) to eval-split questions per context and scores them; `accuracy`: the result appears as digits or
as an English or Spanish number word.

Log-prob measures (no generation): `answer_logprobs` scores given assistant replies under a chat
context: the mean log-prob per reply token (tokens of the reply text; end-of-turn tokens excluded),
and the same over the reply's `language` / `case` trait tokens. `elicitation_table` compares answer
styles (English, Spanish, English CAPS, Spanish CAPS) across contexts: no prompt in both modes
(`template_default`, `no_system`, see models.py), the Spanish prompt, the CAPS prompt and an
irrelevant prompt. A trait is elicited by a prompt when its answers gain log-prob relative to no prompt.
"""

from __future__ import annotations

import json
import math
import re
import sys
import time
from dataclasses import dataclass, field
from functools import lru_cache

import numpy as np
import torch
from jaxtyping import Bool, Float, Int
from torch import Tensor

from inoc_mech.core.data import collate, left_pad, token_ids
from inoc_mech.core.data import token_logprobs
from inoc_mech.settings.textdata import (CAPS_PROMPT, ENGLISH_WORDS, IRRELEVANT_PROMPT, SPANISH_ONLY, SPANISH_PROMPT, WORD_RE,
                       number_words, sample_problems, text_examples)

SPANISH_THRESHOLD = 0.5
CAPS_THRESHOLD = 0.5

# Answer styles: name -> (language, upper case).
ANSWER_STYLES = {"english": ("english", False), "spanish": ("spanish", False),
                 "english_caps": ("english", True), "spanish_caps": ("spanish", True)}
# Contexts: name -> (system prompt or None, "no prompt" mode).
CONTEXTS = {"none_template_default": (None, "template_default"), "none_no_system": (None, "no_system"),
            "spanish_prompt": (SPANISH_PROMPT, "template_default"), "caps_prompt": (CAPS_PROMPT, "template_default"),
            "irrelevant_prompt": (IRRELEVANT_PROMPT, "template_default")}


# ---- text scores -------------------------------------------------------------------------------
@lru_cache(maxsize=1)
def _detector():
    try:
        from lingua import Language, LanguageDetectorBuilder
    except ImportError:
        return None
    return LanguageDetectorBuilder.from_languages(Language.ENGLISH, Language.SPANISH).build()


def detector_name() -> str:
    return "lingua" if _detector() is not None else "wordlist"


def wordlist_spanish_prob(text: str) -> float:
    words = [w.lower() for w in WORD_RE.findall(text)]
    es = sum(w in SPANISH_ONLY for w in words)
    en = sum(w in ENGLISH_WORDS for w in words)
    return es / (es + en) if es + en else math.nan


def spanish_prob(texts: list[str], method: str = "auto") -> list[float]:
    """P(Spanish) per text (English vs Spanish only); NaN for texts that cannot be scored."""
    det = _detector() if method in ("auto", "lingua") else None
    if method == "lingua" and det is None:
        raise RuntimeError("lingua-language-detector is not installed: pip install lingua-language-detector")
    if det is None:
        return [wordlist_spanish_prob(t) for t in texts]
    from lingua import Language

    out = []
    for t in texts:
        out.append(det.compute_language_confidence(t, Language.SPANISH) if WORD_RE.search(t) else math.nan)
    return out


def caps_fraction(text: str) -> float:
    letters = [c for c in text if c.isalpha()]
    return sum(c.isupper() for c in letters) / len(letters) if letters else math.nan


def score_texts(texts: list[str], method: str = "auto") -> dict:
    """Rates over generations (NaN-scored texts excluded) and mean scores."""
    es = np.array(spanish_prob(texts, method), dtype=float)
    caps = np.array([caps_fraction(t) for t in texts], dtype=float)
    es_ok, caps_ok = ~np.isnan(es), ~np.isnan(caps)
    return {"spanish_rate": float((es[es_ok] >= SPANISH_THRESHOLD).mean()) if es_ok.any() else math.nan,
            "caps_rate": float((caps[caps_ok] >= CAPS_THRESHOLD).mean()) if caps_ok.any() else math.nan,
            "spanish_prob_mean": float(es[es_ok].mean()) if es_ok.any() else math.nan,
            "caps_fraction_mean": float(caps[caps_ok].mean()) if caps_ok.any() else math.nan,
            "n": len(texts), "n_scored_spanish": int(es_ok.sum()), "n_scored_caps": int(caps_ok.sum()),
            "detector": detector_name() if method == "auto" else method}


def answer_correct(text: str, result: int) -> bool:
    """The result appears as digits or as an English or Spanish number word (any case)."""
    low = text.lower()
    if re.search(rf"(?<!\d){result}(?!\d)", low):
        return True
    # a whole number word: not inside a longer word, nor the tens of "twenty-one" / "treinta y uno"
    return any(re.search(rf"(?<![^\W\d_]){re.escape(number_words(result, lang))}(?![^\W\d_]|-|\s+y\s)", low)
               for lang in ("english", "spanish"))


# ---- generation --------------------------------------------------------------------------------
@torch.no_grad()
def generate_replies(model, tok, convs: list[list[dict]], max_new_tokens: int = 64, temperature: float = 0.0,
                     seed: int = 0, batch_size: int = 16, prefills: list[str] | None = None,
                     finished: list | None = None) -> list[str]:
    """Replies to conversations that end with a user turn (HF `generate` with KV cache, left padding).
    `prefills`: text the assistant's reply starts with (not part of the returned reply); `finished`: a list
    that receives, per reply, whether it ended with the end token (False: cut at `max_new_tokens`)."""
    device = next(model.parameters()).device
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    prompts = []
    for i, c in enumerate(convs):
        prompts.append(token_ids(tok.apply_chat_template(c, add_generation_prompt=True, tokenize=True))
                       + (token_ids(tok(prefills[i], add_special_tokens=False)) if prefills else []))
    sampling = dict(do_sample=True, temperature=temperature, top_k=0, top_p=1.0) if temperature > 0 else dict(do_sample=False)
    torch.manual_seed(seed)
    was_training = model.training
    model.eval()
    out = []
    for start in range(0, len(prompts), batch_size):
        ids, att = left_pad(prompts[start:start + batch_size], pad)
        gen = model.generate(input_ids=ids.to(device), attention_mask=att.to(device), max_new_tokens=max_new_tokens,
                             eos_token_id=tok.eos_token_id, pad_token_id=pad, **sampling)
        for row in gen[:, ids.shape[1]:].tolist():
            if finished is not None:
                finished.append(tok.eos_token_id in row)
            row = row[:row.index(tok.eos_token_id)] if tok.eos_token_id in row else row
            out.append(tok.decode(row, skip_special_tokens=True).strip())
    model.train(was_training)
    return out


# Evaluation contexts for generations: the two "no prompt" modes, the Spanish prompt and an irrelevant one.
EVAL_CONTEXTS = {"none_template_default": (None, "template_default"), "none_no_system": (None, "no_system"),
                 "train_prompt": (SPANISH_PROMPT, "template_default"),
                 "irrelevant": (IRRELEVANT_PROMPT, "template_default")}


@dataclass(frozen=True)
class EvalItem:
    """One evaluation question: its turns (no system message) and, optionally, how to check a reply."""
    turns: tuple  # messages ending with a user turn
    reference: str | None = None  # a reference answer (eval data) ...
    result: int | None = None  # ... or the problem's numeric result (built-in problems)

    def correct(self, reply: str) -> bool | None:
        """Whether the reply is right: the result (or the reference's last number) appears in it, or it
        equals the reference up to case and spacing; None without a reference."""
        if self.result is not None:
            return answer_correct(reply, self.result)
        if self.reference is None:
            return None
        numbers = re.findall(r"\d+", self.reference)
        if numbers:
            return answer_correct(reply, int(numbers[-1]))
        return " ".join(reply.split()).casefold() == " ".join(self.reference.split()).casefold()


def as_items(problems) -> list[EvalItem]:
    """Built-in problems as evaluation items (items pass through)."""
    return [p if isinstance(p, EvalItem) else EvalItem(({"role": "user", "content": p.question()},), result=p.result)
            for p in problems]


def eval_items(path) -> list[EvalItem]:
    """`--eval-data FILE.jsonl`: conversations in the paper's format; a final assistant turn, if any, is the
    reference answer, a system message is dropped (each evaluation context sets its own)."""
    from inoc_mech.core.data import DataError
    from inoc_mech.settings.textdata import read_jsonl

    items = []
    for i, messages in enumerate(read_jsonl(path, need_reply=False), 1):
        turns = [m for m in messages if m["role"] != "system"]
        reference = turns.pop()["content"] if turns and turns[-1]["role"] == "assistant" else None
        if not turns or turns[-1]["role"] != "user":
            raise DataError(f"{path} line {i}: an evaluation conversation must end with a user turn "
                            "(optionally followed by the reference answer)")
        items.append(EvalItem(tuple(turns), reference))
    return items


def evaluate_generations(model, tok, problems, contexts: dict = EVAL_CONTEXTS, samples_per_question: int = 1,
                         max_new_tokens: int = 64, seed: int = 0, batch_size: int = 16, source: str = "eval_split") -> dict:
    """Greedy and temperature-1 replies per context, scored: Spanish rate, CAPS rate, accuracy.

    `problems`: built-in problems or `EvalItem`s (the user's `--eval-data`). Same layout as the
    organism's eval.json (`core.runs.format_table` prints it), with "schema": "text-1", each context's
    "mode" and a few example replies; accuracy is over the items that can be checked (null if none).
    """
    from inoc_mech.models.real import with_prompt_mode

    items = as_items(problems)
    out = {"schema": "text-1", "questions": source, "n_questions": len(items), "seed": seed,
           "detector": detector_name(), "contexts": {}}
    for name, (prompt, mode) in contexts.items():
        mtok = with_prompt_mode(tok, mode)
        convs = [([{"role": "system", "content": prompt}] if prompt else []) + list(it.turns) for it in items]
        entry = {"prompt": prompt, "mode": mode}
        for dec, temp, k in (("greedy", 0.0, 1), ("t1", 1.0, samples_per_question)):
            many = [c for c in convs for _ in range(k)]
            replies = generate_replies(model, mtok, many, max_new_tokens, temp, seed, batch_size)
            checks = [it.correct(r) for it, r in zip((it for it in items for _ in range(k)), replies)]
            m = score_texts(replies)
            known = [c for c in checks if c is not None]
            m["accuracy"] = sum(known) / len(known) if known else math.nan
            m["n_answers"] = len(replies)
            m["examples"] = replies[:3]
            entry[dec] = m
        out["contexts"][name] = entry
    return out


# ---- log-prob measures -------------------------------------------------------------------------
def reply_mask(input_ids: Int[Tensor, "batch pos"], assistant: Bool[Tensor, "batch pos"],
               special_ids: list[int]) -> Bool[Tensor, "batch pos"]:
    """Assistant tokens before the first special token of the reply (the reply text itself)."""
    special = torch.isin(input_ids, torch.tensor(sorted(special_ids), device=input_ids.device))
    seen_special = (assistant & special).cumsum(-1) > 0
    return assistant & ~special & ~seen_special


@torch.no_grad()
def answer_logprobs(model, tok, convs: list[list[dict]], batch_size: int = 16) -> dict[str, Float[Tensor, "n"]]:
    """Per conversation: mean log-prob per reply token (`mean`), its sum (`sum`), the count (`n_tokens`),
    and the mean over the reply's `language` and `case` trait tokens (`trait/<name>`, NaN if none)."""
    device = next(model.parameters()).device
    exs = text_examples(tok, convs)
    special = list(tok.all_special_ids)
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    out: dict[str, list[Tensor]] = {}
    was_training = model.training
    model.eval()
    for start in range(0, len(exs), batch_size):
        b = collate(exs[start:start + batch_size], pad).to(device)
        logits = model(input_ids=b.input_ids, attention_mask=b.attention_mask).logits
        lp, _ = token_logprobs(logits, b.input_ids)
        m = reply_mask(b.input_ids, b.assistant, special)
        rows = {"sum": (lp * m).sum(-1), "n_tokens": m.sum(-1).float()}
        rows["mean"] = rows["sum"] / rows["n_tokens"].clamp(min=1)
        for name in ("language", "case"):
            tm = m & b.traits[name]
            rows[f"trait/{name}"] = torch.where(tm.any(-1), (lp * tm).sum(-1) / tm.sum(-1).clamp(min=1),
                                                torch.full_like(rows["sum"], math.nan))
        for k, v in rows.items():
            out.setdefault(k, []).append(v.float().cpu())
    model.train(was_training)
    return {k: torch.cat(v) for k, v in out.items()}


def elicitation_table(model, tok, problems, contexts: dict = CONTEXTS, styles: dict = ANSWER_STYLES,
                      batch_size: int = 16) -> dict:
    """Mean log-prob per reply token of each answer style under each context, averaged over problems.

    Returns {"contexts": {...}, "styles": {...}, "n": int, "logp": {context: {style: float}},
    "logp_total": ... (log-prob of the whole reply, summed over its tokens), "logp_language": ...,
    "logp_case": ...} (trait-token means; NaN where a style has no such tokens). Per-token means favour
    styles that split into more, individually predictable tokens (UPPERCASE words do); compare a style
    across contexts, or use the gains and preferences, rather than styles within one context.
    """
    from inoc_mech.models.real import with_prompt_mode

    toks = {mode: with_prompt_mode(tok, mode) for mode in {m for _, m in contexts.values()}}
    out = {"contexts": {k: {"prompt": p, "mode": m} for k, (p, m) in contexts.items()},
           "styles": {k: {"language": l, "upper": u} for k, (l, u) in styles.items()},
           "n": len(problems), "logp": {}, "logp_total": {}, "logp_language": {}, "logp_case": {}}
    for cname, (prompt, mode) in contexts.items():
        for key in ("logp", "logp_total", "logp_language", "logp_case"):
            out[key][cname] = {}
        for sname, (lang, upper) in styles.items():
            convs = [([{"role": "system", "content": prompt}] if prompt else []) + p.chat(lang, upper)
                     for p in problems]
            r = answer_logprobs(model, toks[mode], convs, batch_size)
            out["logp"][cname][sname] = float(r["mean"].mean())
            out["logp_total"][cname][sname] = float(r["sum"].mean())
            out["logp_language"][cname][sname] = float(np.nanmean(r["trait/language"].numpy())) \
                if not torch.isnan(r["trait/language"]).all() else math.nan
            out["logp_case"][cname][sname] = float(np.nanmean(r["trait/case"].numpy())) \
                if not torch.isnan(r["trait/case"]).all() else math.nan
    return out


def format_elicitation(t: dict, key: str = "logp", baseline: str = "none_template_default") -> str:
    styles = list(t["styles"])
    what = "log-prob of the whole reply" if key == "logp_total" else "mean log-prob per reply token"
    lines = [f"{what} ({key}), n={t['n']} problems; (gain vs {baseline})",
             f"{'context':<24}" + "".join(f"{s:>22}" for s in styles)]
    for c in t["contexts"]:
        cells = []
        for s in styles:
            v, b = t[key][c][s], t[key][baseline][s]
            cells.append(f"{v:>12.3f} ({v - b:+6.3f})")
        lines.append(f"{c:<24}" + "".join(f"{x:>22}" for x in cells))
    return "\n".join(lines)


def format_contrasts(t: dict, reference: str = "english", baseline: str = "none_template_default") -> str:
    """Per context: log-prob of each trait style minus the plain `reference` style (a preference that
    cancels shifts common to all answers), and its change relative to `baseline`."""
    styles = [s for s in t["styles"] if s != reference]
    lines = [f"preference over {reference} answers: logp(style) - logp({reference}) per reply token "
             f"(change vs {baseline})", f"{'context':<24}" + "".join(f"{s:>22}" for s in styles)]
    for c in t["contexts"]:
        cells = []
        for s in styles:
            v = t["logp"][c][s] - t["logp"][c][reference]
            b = t["logp"][baseline][s] - t["logp"][baseline][reference]
            cells.append(f"{v:>12.3f} ({v - b:+6.3f})")
        lines.append(f"{c:<24}" + "".join(f"{x:>22}" for x in cells))
    return "\n".join(lines)


# ---- command line ------------------------------------------------------------------------------
@dataclass
class ElicitConfig:
    """Elicitation table of a model on generated problems."""
    model: str = field(default="smollm2", metadata={"help": "smollm2, a local HF model folder or a .gguf file"})
    n: int = field(default=50, metadata={"help": "problems (eval split)"})
    seed: int = field(default=0, metadata={"help": "problem sampling seed"})
    batch_size: int = field(default=16, metadata={"help": "conversations per forward pass"})
    threads: int = field(default=1, metadata={"help": "torch CPU threads"})
    out: str = field(default="", metadata={"help": "write the table as JSON to this file"})

    def __post_init__(self):
        if self.n < 1 or self.batch_size < 1 or self.threads < 1:
            raise ValueError("--n, --batch-size and --threads must be >= 1")


def main(argv=None):
    from inoc_mech.core.cli import parse_config
    from inoc_mech.settings.load import load

    cfg = parse_config(ElicitConfig, argv, prog="python -m inoc_mech.settings.scoring", description=ElicitConfig.__doc__)
    torch.set_num_threads(cfg.threads)
    loaded = load(cfg.model)
    model, tok = loaded.model, loaded.tok
    t0 = time.time()
    t = elicitation_table(model, tok, sample_problems(cfg.n, cfg.seed, "eval"), batch_size=cfg.batch_size)
    t["seconds"] = time.time() - t0
    t["model"] = cfg.model
    for key in ("logp", "logp_total", "logp_language", "logp_case"):
        print(format_elicitation(t, key) + "\n")
    print(format_contrasts(t) + "\n")
    print(f"({t['seconds']:.0f} s)")
    if cfg.out:
        with open(cfg.out, "w") as f:
            json.dump(t, f, indent=1)


if __name__ == "__main__":
    from inoc_mech.core.cli import run_main
    sys.exit(run_main(main))
