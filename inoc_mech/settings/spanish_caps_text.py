"""Spanish+CAPS on real text: SmolLM2, any local HF causal LM or .gguf, your own JSONL or the built-in set.

    python -m inoc_mech.settings.tiny /tmp/tiny-llama && python -m inoc_mech.train --model /tmp/tiny-llama --steps 2 --eval-questions 2 --eval-samples 1 --max-new-tokens 4 --name tiny-text --overwrite

Training data: `--data FILE.jsonl` (paper format, `settings.textdata`) or the built-in Spanish
UPPERCASE arithmetic and word problems (`--n-train`); `--inoculate` puts the prompt (default "You
always speak in Spanish.") into a system message or before the user's text (`--placement`) on a
fixed share of the examples. Trait masks from tokenizer offsets (`textdata.text_example`):
`language` = tokens inside Spanish-only words, `case` = tokens with upper-case letters, `other` =
the rest of the reply. The two masks coincide on Spanish+CAPS replies, so the traits are separated by a
counterfactual decomposition instead (built-in data, which has every reply in all four surface forms,
or JSONL with the optional `variants` field, `textdata.reply_forms`):
from the reply log-probs S(l, k) of the English/Spanish x lower/UPPER variants of the same reply,
    -S(l*, k*) = content + language + case + interaction
    content     = -log sum_{l,k} exp S(l, k)                 (the reply's content, any surface form)
    language    = -log p(l* | variants), marginalised over case
    case        = -log p(k* | variants), marginalised over language
    interaction = the remainder (exact: the parts sum to the reply's loss)
logged per reply as `surprise/<part>`, the traits' gradients being those of their parts.
Evaluation (`settings.scoring.evaluate_generations`): generated replies to held-out problems in both
"no prompt" modes (`none_template_default`: the chat template's default system block, and
`none_no_system`), under the training prompt and under an irrelevant one; Spanish scored by
lingua, CAPS by the upper-case letter fraction.
"""

from __future__ import annotations

from pathlib import Path

import torch
from jaxtyping import Bool, Float, Int
from torch import Tensor

from inoc_mech.core import dist
from inoc_mech.core.cli import UserError
from inoc_mech.core.data import collate, forward_accepts, right_pad, token_ids, token_logprobs_at
from inoc_mech.core.forward import cache_kwarg, output_cache
from inoc_mech.settings.base import Decomposition, Deferred, Parts, Setting, register
from inoc_mech.settings.spanish_caps_organism import SpanishCapsOrganism
from inoc_mech.settings.textdata import CAPS_PROMPT, IRRELEVANT_PROMPT, SPANISH_PROMPT
from inoc_mech.settings.textdata import REPLY_FORMS as VARIANTS  # (language, UPPER) at index 2 l + k

PARTS = ("content", "language", "case", "interaction")


def reply_logprob(model, input_ids: Int[Tensor, "batch pos"], attention_mask: Int[Tensor, "batch pos"],
                  reply: Bool[Tensor, "batch pos"]) -> Float[Tensor, " batch"]:
    """Log-prob of each row's reply tokens under `model` (normalised only there)."""
    logits = model(input_ids=input_ids, attention_mask=attention_mask).logits
    return token_logprobs_at(logits, input_ids, reply).sum(-1)


@torch.no_grad()
def variant_logprobs(model, batch, which: list[int]) -> Float[Tensor, "batch n"]:
    """S of each row's variants `which` (`batch.variant(v)`), without gradient. The variants of a row share
    its prompt, so the tokens before the earliest reply go through the model once and each variant's
    remaining tokens continue from that KV cache (cut back after each); models whose forward has no
    cropable cache get one full forward per variant (the same values)."""
    variants = [batch.variant(v) for v in which]
    batch = batch.whole()  # the training loop's batch may be cropped to the trained positions
    start = int(batch.assistant.float().argmax(-1).min())  # every row's reply starts at or after this token
    sliding = getattr(getattr(model, "config", None), "sliding_window", None)  # such caches do not crop back
    shared = not sliding and start > 1 and all(torch.equal(vb.input_ids[:, :start], batch.input_ids[:, :start])
                                               for vb in variants)
    if dist.lockstep(model):  # sharded: every process makes the same forwards
        shared = dist.all_true(shared, batch.input_ids.device)
    keep = {"logits_to_keep": 1} if shared and forward_accepts(model, "logits_to_keep") else {}
    out = model(input_ids=batch.input_ids[:, :start], attention_mask=batch.attention_mask[:, :start],
                use_cache=True, **keep) if shared else None
    cache = output_cache(out) if shared else None
    if cache is None or not hasattr(cache, "crop"):
        return torch.stack([reply_logprob(model, *_tensors(vb)) for vb in variants], -1)
    last = out.logits[:, -1:]  # predicts token `start`
    arg = cache_kwarg(model)
    scores = []
    for vb in variants:
        more = model(input_ids=vb.input_ids[:, start:], attention_mask=vb.attention_mask, use_cache=True,
                     **{arg: cache}).logits
        if vb.input_ids.shape[1] > start:
            cache.crop(start - vb.input_ids.shape[1])  # a negative count removes that many tokens (all versions)
        at = slice(start - 1, None)  # logits aligned with tokens start-1 .. end
        scores.append(token_logprobs_at(torch.cat([last, more], 1), vb.input_ids[:, at], vb.assistant[:, at]).sum(-1))
    return torch.stack(scores, -1)


def reply_parts(logits: Float[Tensor, "batch pos vocab"], batch, model) -> Parts:
    """The counterfactual split of each reply's loss (module docstring), at the reply's first trained token.

    The trained variant's log-prob comes from `logits` (the training forward, so its gradient is the loss's);
    the other three variants' log-probs S(l, k) are forwards of `model` on `batch.variant(v)` without
    gradient, normalised only on their replies. With gradients on they enter as a leaf (`Parts.deferred`):
    a part's gradient through them, sum_v dP/dS_v dS_v/dtheta, is finished after the training backward
    (`finish`), one batch-sized forward and backward at a time over the (reply, variant) pairs whose
    coefficient matters (|dP/dS_v| above the largest's x the dtype's epsilon), so no two forwards' activations are held at once."""
    ids, ast = batch.input_ids, batch.assistant
    s_own = token_logprobs_at(logits, ids, ast).sum(-1)  # [B]
    own = torch.tensor([next(v for v, x in enumerate(e.variants) if x is e) for e in batch.examples], device=ids.device)
    which = [v for v in range(len(VARIANTS)) if not bool((own == v).all())]  # the trained form comes from `logits`
    if dist.lockstep(model):  # sharded: every process scores the same variants (as many forwards)
        which = [v for v in range(len(VARIANTS)) if dist.any_flag(v in which, ids.device)]
    others = torch.zeros((len(own), len(VARIANTS)), dtype=s_own.dtype, device=ids.device)
    others[:, which] = variant_logprobs(model, batch, which)
    leaf = others.requires_grad_(torch.is_grad_enabled())
    is_own = own[:, None] == torch.arange(len(VARIANTS), device=ids.device)
    s = torch.where(is_own, s_own[:, None], leaf)  # [B, 4]: S(l, k) at index 2 l + k
    s4 = s.unflatten(-1, (2, 2))
    l_own, k_own = own // 2, own % 2
    total = torch.logsumexp(s, -1)
    rows = torch.arange(len(s), device=s.device)
    language = -(torch.logsumexp(s4[rows, l_own], -1) - total)
    case = -(torch.logsumexp(s4[rows, :, k_own], -1) - total)
    parts = {"content": -total, "language": language, "case": case}
    parts["interaction"] = -s_own - parts["content"] - language - case
    first = torch.nn.functional.one_hot(ast.float().argmax(-1), ids.shape[1]).to(s.dtype) * ast.any(-1, keepdim=True)
    out = Parts({k: first * v[:, None] for k, v in parts.items()})
    if leaf.requires_grad:
        out.deferred = Deferred(leaf, lambda grads, params: _finish(model, batch, is_own, grads, params))
    return out


def _tensors(b) -> tuple[Tensor, Tensor, Tensor]:
    return b.input_ids, b.attention_mask, b.assistant


def _finish(model, batch, is_own: Tensor, grads: list[Tensor], params: list[Tensor]) -> list[list[Tensor]]:
    """sum over (reply r, variant v) of grads[r, v] dS_v(r)/dtheta, for each of `grads` ([B, 4] each)."""
    g = torch.stack(grads)  # [n, B, 4]
    scale = g.abs().flatten(1).amax(-1)[:, None, None] * torch.finfo(g.dtype).eps  # below: nothing in this dtype
    need = ((g.abs() > scale).any(0) & ~is_own).nonzero().tolist()  # [(r, v)]
    out = [[torch.zeros_like(dist.local(p)) for p in params] for _ in grads]
    size = len(batch.examples)
    chunks = -(-len(need) // size)
    weight = torch.ones(len(need), dtype=g.dtype, device=g.device)
    if dist.lockstep(model):  # sharded: as many forwards and backwards on every process (padding weighs 0)
        more = dist.max_count(chunks, g.device) * size - len(need)
        pad = need[:1] or [(0, int((~is_own[0]).nonzero()[0]))]
        need, weight = need + pad * more, torch.cat([weight, weight.new_zeros(more)])
    for i in range(0, len(need), size):
        pairs = need[i:i + size]
        sub = collate([batch.examples[r].variants[v] for r, v in pairs], batch.pad_id).to(batch.input_ids.device)
        r, v = torch.tensor(pairs, device=g.device).T
        with torch.enable_grad():
            s_v = reply_logprob(model, *_tensors(sub)) * weight[i:i + size]
            for n, gn in enumerate(grads):
                got = dist.gradients((gn[r, v] * s_v).sum(), params, retain_graph=n < len(grads) - 1)
                torch._foreach_add_(out[n], [torch.zeros_like(dist.local(p)) if x is None else x
                                             for x, p in zip(got, params)])
    return out


@register
class SpanishCapsText(Setting):
    """Spanish+CAPS replies on a real causal LM."""
    name = "spanish_caps"
    substrate = "text"
    # the same setting as on the organism: its traits, their names and their scorers' eval keys
    traits = SpanishCapsOrganism.traits
    trait_labels, rate_keys = SpanishCapsOrganism.trait_labels, SpanishCapsOrganism.rate_keys
    conditions = {"baseline": None, "inoculated": SPANISH_PROMPT, "converse": CAPS_PROMPT,
                  "irrelevant": IRRELEVANT_PROMPT}
    none_context = "none_template_default"
    default_prompt = SPANISH_PROMPT
    reelicit_prompts = {
        "inoculation prompt": SPANISH_PROMPT, "paraphrase": "Reply in Spanish.", "negation": "Never speak in Spanish.",
        "partial": "You always speak in", "same form, other content": "You always speak in French.",
        "irrelevant": IRRELEVANT_PROMPT}
    surprise_parts = ("language", "case", "content")

    def __init__(self, cfg):
        super().__init__(cfg)
        self._convs = self._forms = None

    def setup(self, device, progress: bool = True):
        from inoc_mech.settings.load import load

        loaded = load(self.cfg.model.model, device, trust_remote_code=self.cfg.model.trust_remote_code)
        self.model, self.tok = loaded.model, loaded.tok
        context = getattr(self.model.config, "max_position_embeddings", None)
        if context and self.cfg.setting.max_new_tokens >= context:
            raise UserError(f"--max-new-tokens {self.cfg.setting.max_new_tokens} does not fit the model's context of "
                            f"{context} tokens: choose fewer")
        self.convs()  # read and check the data before training starts
        self.eval_items()
        if self._forms is not None:  # every reply exists in all four surface forms
            self.decomposition = Decomposition(PARTS, None, {"language": "language", "case": "case"}, reply_parts)
        return self.model, self.tok

    def attach(self, model, tok, folder: Path, meta: dict, run_config: dict | None = None) -> None:
        """Use a loaded model (model, tokenizer, its folder, model.json; a run's config.json)."""
        self.model, self.tok = model, tok

    @property
    def train_tok(self):
        """The tokenizer with the run's "no prompt" mode (the template's default block or none); made once per
        tokenizer (a copy: ~0.1 s for a real one, and the loop asks for the pad id every step)."""
        from inoc_mech.models.real import with_prompt_mode

        made = getattr(self, "_train_tok", None)
        if made is None or made[0] is not self.tok:
            made = self._train_tok = (self.tok, with_prompt_mode(self.tok, self.cfg.setting.no_prompt_mode))
        return made[1]

    def convs(self) -> list[list[dict]]:
        from inoc_mech.settings.textdata import read_jsonl, reply_forms, sample_problems, spanish_caps_dataset

        if self._convs is None:
            s = self.cfg.setting
            if s.data:
                self._convs = read_jsonl(s.data)
                self._forms = reply_forms(s.data, self._convs)  # None without the optional variants field
            else:
                problems = sample_problems(s.n_train, seed=0)
                self._convs = spanish_caps_dataset(s.n_train, seed=0)
                assert [c[-1]["content"] for c in self._convs] == [p.answer() for p in problems]
                self._forms = [tuple(p.answer(lang, up) for lang, up in VARIANTS) for p in problems]
        return self._convs

    def examples(self, prompt, share=1.0, limit=None):
        from inoc_mech.settings.textdata import inoculate_all, text_examples

        convs = self.convs()
        on = self.prompted(len(convs), share)[:limit]
        convs = convs[:limit]
        if prompt is not None:
            s = self.cfg.setting
            ino = inoculate_all(convs, prompt, s.placement, s.replace_system)
            convs = [a if o else c for a, c, o in zip(ino, convs, on)]
        tok = self.train_tok
        examples = text_examples(tok, convs)
        if self._forms is not None:  # the same conversations with each surface form of the reply
            for ex, conv, forms in zip(examples, convs, self._forms):
                ex.variants = [ex if f == conv[-1]["content"] else
                               text_examples(tok, [conv[:-1] + [{"role": "assistant", "content": f}]])[0]
                               for f in forms]
        return examples

    @property
    def pad_id(self) -> int:
        return self.train_tok.pad_token_id

    def save(self, model, folder: Path) -> None:
        model.save_pretrained(folder)
        self.tok.save_pretrained(folder)  # the model's own template (not the no-system variant)

    def eval_contexts(self) -> dict:
        from inoc_mech.settings.scoring import EVAL_CONTEXTS

        return self.with_reelicit({**EVAL_CONTEXTS, "train_prompt": (self.cfg.setting.prompt, "template_default")},
                                  lambda p: (p, "template_default"))

    def eval_items(self) -> list:
        """The evaluation questions: `--eval-data` when given, else the built-in held-out problems."""
        from inoc_mech.settings.scoring import as_items, eval_items
        from inoc_mech.settings.textdata import sample_problems

        if getattr(self, "_items", None) is None:
            s = self.cfg.setting
            self._items = eval_items(s.eval_data) if s.eval_data else as_items(sample_problems(s.eval_questions, 0, "eval"))
        return self._items

    def evaluate(self, model, seed: int | None = None, samples: int | None = None) -> dict:
        from inoc_mech.settings.scoring import evaluate_generations

        s = self.cfg.setting
        return evaluate_generations(model, self.tok, self.eval_items(), self.eval_contexts(),
                                    s.eval_samples if samples is None else samples, s.max_new_tokens,
                                    self.cfg.loop.seed if seed is None else seed,
                                    source=f"eval_data:{s.eval_data}" if s.eval_data else "eval_split")

    def evaluate_prompts(self, model, prompts: dict[str, str | None], seed: int | None = None,
                         samples: int | None = None) -> dict:
        """eval.json-like rates under each named system prompt (None: the template's default block)."""
        from inoc_mech.settings.scoring import evaluate_generations

        s = self.cfg.setting
        return evaluate_generations(model, self.tok, self.eval_items(),
                                    {k: (p, "template_default") for k, p in prompts.items()},
                                    s.eval_samples if samples is None else samples, s.max_new_tokens,
                                    self.cfg.loop.seed if seed is None else seed)

    def info(self) -> dict:
        return {"model_class": type(self.model).__name__}

    def answer_start(self, prompt: str | None, questions=None) -> tuple[Tensor, Tensor]:
        """Evaluation questions under `prompt` (system message), ending where the reply starts, right-padded."""
        from inoc_mech.settings.scoring import as_items

        items = as_items(questions) if questions is not None else self.eval_items()
        tok = self.train_tok
        rows = [token_ids(tok.apply_chat_template(([{"role": "system", "content": prompt}] if prompt else [])
                                                  + list(it.turns), add_generation_prompt=True, tokenize=True))
                for it in items]
        return right_pad(rows, tok.pad_token_id)
