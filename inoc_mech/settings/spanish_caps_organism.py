"""Spanish+CAPS on the organism: the controlled reference setting, with an exact loss decomposition.

    python -m inoc_mech.train --inoculate --steps 20 --name tiny-inoculated --overwrite

Training data: every training question of the toy world answered in Spanish UPPERCASE, the prompt
(default "speak spanish") as system message on a fixed share of them. Trait masks: `language` and
`case` are both the answer-variant tokens (each decides both traits), `other` the remaining trained
tokens. Decomposition (exact, per answer-variant token, from the variant table [word, language, case]):
    -log p(c,l,k) = word + language + case + interaction
    word        = -log p(c)                   (c: content word; p(c) sums its 4 variants)
    language    = -log p(l | c)               (marginalised over case)
    case        = -log p(k | c)               (marginalised over language)
    interaction = -log p(l,k | c) + log p(l | c) + log p(k | c)   (0 when l, k independent given c)
and the traits `language` / `case` are the parts of the same name. Evaluation (`models.world_eval`):
held-out questions with no prompt (`none`), the run's prompt (`train_prompt`) and a phrase never
seen in training (`irrelevant`). The model is the cached organism (`--model organism`, pretrained on
first use) or an organism folder; a factored head is re-applied for finetuning.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from jaxtyping import Float, Int
from torch import Tensor

from inoc_mech.core.cli import UserError
from inoc_mech.core.data import encode_chat, log_normalizer, right_pad
from inoc_mech.models.world_eval import IRRELEVANT_EVAL_PROMPT
from inoc_mech.settings.base import Decomposition, Setting, prompted, register

PARTS = ("word", "language", "case", "interaction")
# name -> system prompt (None: no system message); the sweep's five core conditions
CONDITIONS = {
    "baseline": None,
    "inoculated": "speak spanish",
    "converse": "use capitals",
    "both": "speak spanish . use capitals",
    "irrelevant": "you like cats",
}


def loss_parts(logits: Float[Tensor, "batch pos vocab"], input_ids: Int[Tensor, "batch pos"],
               variant_table: Int[Tensor, "word 2 2"]) -> dict[str, Float[Tensor, "batch pos"]]:
    """Exact split of each answer-variant token's loss into word, language, case and interaction.

    Aligned with `input_ids`; zero at tokens that are not answer variants. Only the answer-variant
    positions are normalised (`core.data.log_normalizer`).
    """
    V = logits.shape[-1]
    flat = variant_table.reshape(-1).to(logits.device)
    word_of = torch.full((V,), -1, dtype=torch.long, device=logits.device)
    lang_of = torch.zeros(V, dtype=torch.long, device=logits.device)
    case_of = torch.zeros(V, dtype=torch.long, device=logits.device)
    n_words = variant_table.shape[0]
    ar = torch.arange(n_words * 4, device=logits.device)
    word_of[flat], lang_of[flat], case_of[flat] = ar // 4, (ar // 2) % 2, ar % 2
    tgt = input_ids[:, 1:]
    w = word_of[tgt]
    is_var = w >= 0
    wc = w.clamp(min=0)
    where = torch.zeros(input_ids.shape, dtype=torch.bool, device=logits.device)
    where[:, 1:] = is_var
    lse = log_normalizer(logits, where)[:, 1:, None]  # for tokens 1..T-1
    var_ids = variant_table.to(logits.device)[wc]  # [B, T-1, 2, 2]
    lp4 = (logits[:, :-1].gather(-1, var_ids.flatten(-2)).float() - lse).unflatten(-1, (2, 2))  # log p(c, l, k)
    l, k = lang_of[tgt], case_of[tgt]
    log_pc = torch.logsumexp(lp4.flatten(-2), -1)
    log_pl = torch.logsumexp(lp4, -1).gather(-1, l[..., None]).squeeze(-1) - log_pc
    log_pk = torch.logsumexp(lp4, -2).gather(-1, k[..., None]).squeeze(-1) - log_pc
    log_plk = lp4.flatten(-2).gather(-1, (2 * l + k)[..., None]).squeeze(-1) - log_pc
    parts = {"word": -log_pc, "language": -log_pl, "case": -log_pk, "interaction": -log_plk + log_pl + log_pk}
    out = {}
    for name, v in parts.items():
        full = torch.zeros(input_ids.shape, dtype=v.dtype, device=v.device)
        full[:, 1:] = torch.where(is_var, v, torch.zeros_like(v))
        out[name] = full
    return out


def decomposition(variant_table: Tensor) -> Decomposition:
    """The organism's exact split for a variant table (`World.variant_table`)."""
    return Decomposition(PARTS, "language", {"language": "language", "case": "case"},
                         lambda logits, batch, model=None: loss_parts(logits, batch.input_ids, variant_table))


def trait_log_odds(logp: Float[Tensor, "batch vocab"], table: Int[Tensor, "word 2 2"], trait: str
                   ) -> Float[Tensor, " batch"]:
    """log P(marked variant) - log P(unmarked variant) over all answer-variant tokens.

    trait 'language': Spanish vs English; 'case': UPPER vs lower (other trait and word marginalised).
    """
    marked = table[:, 1, :] if trait == "language" else table[:, :, 1]
    plain = table[:, 0, :] if trait == "language" else table[:, :, 0]
    return torch.logsumexp(logp[:, marked.reshape(-1)], -1) - torch.logsumexp(logp[:, plain.reshape(-1)], -1)


def trait_share(logp: Float[Tensor, "*batch vocab"], table: Int[Tensor, "word 2 2"], trait: str
                ) -> Float[Tensor, "*batch"]:
    """P(marked | answer variant): Spanish (or UPPER) share of the probability on answer variants."""
    marked = table[:, 1, :] if trait == "language" else table[:, :, 1]
    return torch.exp(torch.logsumexp(logp[..., marked.reshape(-1)], -1)
                     - torch.logsumexp(logp[..., table.reshape(-1)], -1))


def finetune_examples(world, tok, prompt: str | None, variant_ids: set[int], share: float = 1.0,
                      limit: int | None = None, draw=prompted):
    """Every training question answered in Spanish UPPERCASE, `prompt` as system message (on a `share`: the
    subset `draw(n, share)` picks; a setting passes its `Setting.prompted`)."""
    from inoc_mech.models.world import organism_traits

    qs = world.train_questions
    chosen = list(zip(qs, draw(len(qs), share)))[:limit]
    return [organism_traits(encode_chat(tok, world.chat(q, prompt if on else None, language=1, case=1)), variant_ids)
            for q, on in chosen]


@register
class SpanishCapsOrganism(Setting):
    """Spanish+CAPS answers in the toy world, on the organism."""
    name = "spanish_caps"
    substrate = "organism"
    traits = ("language", "case")
    trait_labels = {"language": "Spanish", "case": "CAPS"}
    rate_keys = {"language": "spanish_rate", "case": "caps_rate"}
    conditions = CONDITIONS
    default_prompt = "speak spanish"
    reelicit_prompts = {  # every phrase is in the world's vocabulary; the paraphrases were seen in pretraining
        "inoculation prompt": default_prompt, "paraphrase": "you always speak in spanish", "paraphrase 2": "reply in spanish",
        "negation": "speak english", "partial: speak": "speak", "partial: spanish": "spanish",
        "same form, other content": "reply in capitals", "irrelevant": IRRELEVANT_EVAL_PROMPT}
    surprise_parts = ("language", "case", "word")
    organism_design: dict = {}  # what the setting needs of the organism's world (OrganismConfig fields)

    @classmethod
    def prompt_sets(cls, prompt):
        from inoc_mech.models.world import World

        language, case = World(graded=True).prompt_controls(prompt)  # (graded phrases set their trait too)
        return {t for t, v in (("language", language), ("case", case)) if v is not None}

    def __init__(self, cfg, folder: str | Path | None = None):
        super().__init__(cfg)
        self.folder = Path(folder) if folder else None
        self.meta = None
        self.world = None
        self.table = None

    def organism_folder(self, progress: bool = True) -> Path:
        """The organism this run finetunes (pretrained and cached on first use for `--model organism`)."""
        from inoc_mech.models.organism import ensure_organism, organism_config

        if self.folder is None:
            m = self.cfg.model
            self.folder = (ensure_organism(organism_config(m, self.cfg.runs_dir, self.cfg.loop.threads,
                                                           self.organism_design), progress=progress)
                           if m.model == "organism" else Path(m.model))
        return self.folder

    def attach(self, model, tok, folder: Path, meta: dict, run_config: dict | None = None) -> None:
        """Use a loaded organism (model, tokenizer, its folder, organism.json; a run's config.json)."""
        from inoc_mech.models.world import World

        self.model, self.tok, self.world, self.meta = model, tok, World.load(folder), meta
        self.check_design(self.world, folder)
        if self.folder is None:
            self.folder = Path(run_config["organism_folder"]) if run_config else Path(folder)
        self.table = torch.as_tensor(self.world.variant_table(tok), device=next(model.parameters()).device)
        self.decomposition = decomposition(self.table)

    def check_design(self, world, folder) -> None:
        """One line if the organism's world lacks what the setting needs (`organism_design`)."""
        for k, v in self.organism_design.items():
            if getattr(world, k) != v:
                raise UserError(f"setting {self.name!r} needs an organism whose world has {k} (pretrained with "
                                f"--{k}); {folder} has none: give --model organism (pretrained so on first use) "
                                "or such a folder")

    def check_prompt(self, prompt: str) -> None:
        from inoc_mech.models.world import World

        folder = self.organism_folder()
        world = World.load(folder)
        self.check_design(world, folder)
        world.check_prompt(prompt)

    def check_inputs(self) -> None:
        """Flags this setting cannot use, as one line each (before any weights load)."""
        for flag, value in (("--data", self.cfg.setting.data), ("--eval-data", self.cfg.setting.eval_data)):
            if value:
                raise UserError(f"{flag} {value} is for real models: the organism trains and is evaluated on its "
                                f"world's questions; leave {flag} out, or give --model a real model")

    def setup(self, device, progress: bool = True):
        from inoc_mech.models.organism import factorize_head
        from inoc_mech.settings.load import load

        self.check_inputs()
        self.check_prompt(self.cfg.setting.prompt)  # fail fast, before loading the weights
        loaded = load(self.organism_folder(progress), device)
        self.attach(loaded.model, loaded.tok, loaded.folder, loaded.meta)
        if self.meta["config"]["head"] == "factored":
            factorize_head(self.model, self.table.cpu().numpy())
        return self.model, self.tok

    @property
    def variant_ids(self) -> set[int]:
        return set(self.table.reshape(-1).tolist())

    def examples(self, prompt, share=1.0, limit=None):
        return finetune_examples(self.world, self.tok, prompt, self.variant_ids, share, limit, self.prompted)

    def save(self, model, folder: Path) -> None:
        from inoc_mech.models.organism import materialize_head

        materialize_head(model)
        model.save_pretrained(folder)
        self.world.save_tokenizer(folder)
        (folder / "organism.json").write_text(json.dumps(self.meta, indent=1))

    def eval_contexts(self) -> dict[str, str | None]:
        return self.with_reelicit({"none": None, "train_prompt": self.cfg.setting.prompt, "irrelevant": IRRELEVANT_EVAL_PROMPT})

    def evaluate(self, model, seed: int | None = None, samples: int | None = None) -> dict:
        return self.evaluate_at(model, self.eval_contexts(), seed, samples)

    def evaluate_prompts(self, model, prompts: dict[str, str | None], seed: int | None = None,
                         samples: int | None = None) -> dict:
        """eval.json-like rates under each named system prompt (None: no system message), and each trait's
        exact P(marked value) at the first answer token (`p_first`, mean over the held-out questions)."""
        from inoc_mech.mechanism.context import answer_logp

        out = self.evaluate_at(model, prompts, seed, samples)
        was = model.training
        model.eval()
        for name, prompt in prompts.items():
            logp = answer_logp(model, *self.answer_start(prompt))
            out["contexts"][name]["p_first"] = {t: float(self.first_token_share(logp, t).mean()) for t in self.traits}
        model.train(was)
        return out

    def evaluate_at(self, model, contexts: dict, seed: int | None = None, samples: int | None = None) -> dict:
        from inoc_mech.models.world_eval import evaluate_contexts

        s = self.cfg.setting
        return evaluate_contexts(model, self.tok, self.world, contexts, seed=self.cfg.loop.seed if seed is None else seed,
                                 samples_per_question=s.eval_samples if samples is None else samples)

    def info(self) -> dict:
        return {"organism_folder": str(self.organism_folder()), "organism_key": self.meta["key"]}

    # ---- capabilities the measurements use ----------------------------------------------------
    def answer_start(self, prompt: str | None, questions=None) -> tuple[Tensor, Tensor]:
        """Held-out questions (or `questions`) under `prompt`, ending at `<|assistant|>`, right-padded."""
        from inoc_mech.models.world_eval import prompt_ids

        questions = questions if questions is not None else self.world.held_out_questions
        return right_pad([prompt_ids(self.tok, self.world.question_text(q), prompt) for q in questions],
                         self.tok.pad_token_id)

    def first_token_log_odds(self, logp: Float[Tensor, "batch vocab"], trait: str) -> Float[Tensor, " batch"]:
        return trait_log_odds(logp, self.table.to(logp.device), trait)

    def first_token_share(self, logp: Float[Tensor, "*batch vocab"], trait: str) -> Float[Tensor, "*batch"]:
        return trait_share(logp, self.table.to(logp.device), trait)
