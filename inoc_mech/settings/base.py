"""What a setting is: the one seam between a trait study and the loop, the instruments and the analyses.

    python -c "from inoc_mech.settings.base import registered; print(registered())"

A *setting* (Spanish+CAPS, later backdoors, subliminal learning, ...) on one *substrate* (the
organism, or real text on any HF causal LM) is one subclass of `Setting` in one module, registered
with `@register`. It supplies:
- `setup(device)`: the model and tokenizer to finetune (prepared, e.g. the organism's factored head);
- `examples(prompt, share)`: tokenized training examples with named per-token trait masks
  (`Example.traits`: one mask per name in `traits`, plus `other` for the remaining trained tokens);
- `decomposition` (optional): an exact split of the trait-token loss, `fn(logits, batch, model) ->
  {part: per-token loss}` (parts sum to the token loss on the tokens of mask `over`, 0 elsewhere) and
  which part is each trait's surprise; it normalises the logits only where it needs to
  (`core.data.token_logprobs_at`, `log_normalizer`): real vocabularies are large;
- `evaluate(model)`: eval.json (its contexts, `none_context` the "no prompt" one) and `rate_keys`,
  the scorer of each trait (the eval metric that is its rate);
- `conditions`: named conditions (baseline, inoculated, converse, ...) -> the prompt each trains
  with; `condition(prompt)` names a run's condition (recorded in config.json at train time);
- optional capabilities the measurements use when present: `answer_start(prompt)` (held-out prompts
  ending where the answer starts, right-padded), `first_token_log_odds(logp, trait)` (the trait's
  log-odds at the first answer token) and `world` (the organism's world, for probes). A measurement
  that needs a capability the setting lacks says so in one line (`require`).
The training loop, the hooks and the analyses only talk to this interface; adding a setting is one
new module per substrate (see the test-only setting in tests/test_settings.py).
"""

from __future__ import annotations

import re
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Callable, ClassVar

import numpy as np
from jaxtyping import Float, Int
from torch import Tensor

from inoc_mech.core.cli import UserError


@dataclass(frozen=True)
class Decomposition:
    """An exact split of trained-token losses into named parts that sum to the token loss.

    Token level (`over` a trait mask): `fn(logits, batch, model)` gives per-token parts that sum to each
    decomposed token's loss (0 elsewhere). Reply level (`over=None`): `fn(logits, batch, model)` gives, per example, parts
    that sum to the whole reply's loss (a sequence-level split from counterfactual replies, placed at the
    reply's first trained token); a trait's contribution is then its part of the reply's loss."""
    parts: tuple[str, ...]  # part names, e.g. ("word", "language", "case", "interaction")
    over: str | None  # the trait mask of the decomposed tokens; None: the split is per reply
    trait_part: dict[str, str]  # trait -> the part that is its surprise (its share of the loss)
    fn: Callable[..., dict[str, Float[Tensor, "batch pos"]]]


class Parts(dict):
    """A decomposition's parts (name -> [batch, pos] loss) whose inputs were partly computed without
    gradient: `deferred` says how to finish a part's parameter gradient later (after the loss's backward
    has freed the training graph, so two forwards' activations are never held at once)."""
    deferred: "Deferred | None" = None


@dataclass(frozen=True)
class Deferred:
    """Inputs of the parts computed without gradient, as a leaf that requires grad, and their completion.

    The parameter gradient of a part P is dP/dtheta through the training graph (autograd, with `leaf` an
    input) plus sum_i (dP/dleaf_i) dleaf_i/dtheta; `finish(leaf_grads, params)` returns the second term,
    for each given dP/dleaf, by recomputing the leaf's values with gradient."""
    leaf: Tensor
    finish: Callable[[list[Tensor], list[Tensor]], list[list[Tensor]]]


class Setting(ABC):
    """Data, trait masks, optional loss decomposition, evaluation and named conditions of one study."""
    name: ClassVar[str]  # registry key, recorded as config.json "setting"
    substrate: ClassVar[str]  # "organism" or "text"
    traits: ClassVar[tuple[str, ...]]  # trait masks every example carries (besides "other")
    trait_labels: ClassVar[dict[str, str]]  # trait -> what its marked value is called ("Spanish")
    rate_keys: ClassVar[dict[str, str]]  # trait -> eval.json metric that is its rate
    conditions: ClassVar[dict[str, str | None]]  # condition name -> training prompt (None: no prompt)
    none_context: ClassVar[str] = "none"  # eval.json context with no prompt
    surprise_parts: ClassVar[tuple[str, ...]] = ()  # decomposition parts an analysis shows (traits' parts first)
    trait_parts: ClassVar[dict[str, str]] = {}  # trait -> its decomposition part where the names differ (EM: wrong -> word)
    side_rates: ClassVar[dict[str, str]] = {}  # further eval.json rates analyses show beside the traits' (metric -> label)
    # Re-elicitation contexts (name -> system prompt) related to the default inoculation prompt: itself,
    # paraphrases, a negation, partial prompts, a prompt of the same form with other content, an irrelevant
    # one (what the setting's world or language can say). `evaluate` adds them to eval.json's contexts
    # (as its own contexts of the same prompts) under --eval-reelicit; studies.reelicit reads them there.
    reelicit_prompts: ClassVar[dict[str, str]] = {}
    decomposition: Decomposition | None = None  # set once the model is loaded (it may need the tokenizer)

    def __init__(self, cfg):
        self.cfg = cfg  # the run's TrainConfig (its setting and model parts)
        self.model = self.tok = None

    @abstractmethod
    def setup(self, device) -> tuple[object, object]:
        """(model ready for finetuning, tokenizer); also kept as `self.model`, `self.tok`."""

    @abstractmethod
    def attach(self, model, tok, folder, meta: dict, run_config: dict | None = None) -> None:
        """Use an already loaded model (`settings.load.load` calls this); no preparation for training."""

    @abstractmethod
    def examples(self, prompt: str | None, share: float = 1.0, limit: int | None = None) -> list:
        """Training examples (`core.data.Example`), `prompt` on a fixed `share` of them (`self.prompted`); the
        first `limit`."""

    def prompted(self, n: int, share: float) -> np.ndarray:
        """Which of the setting's n training examples carry the prompt: the subset of --prompt-subset."""
        return prompted(n, share, self.cfg.setting.prompt_subset)

    @abstractmethod
    def save(self, model, folder) -> None:
        """Write the finetuned model (LoRA already merged) and what loading it needs into `folder`."""

    @abstractmethod
    def evaluate(self, model) -> dict:
        """The run's eval.json."""

    def info(self) -> dict:
        """Extra fields for config.json."""
        return {}

    def with_reelicit(self, contexts: dict, spec: Callable[[str], object] = lambda p: p) -> dict:
        """`contexts` (eval.json's, as `evaluate` takes them) and, under --eval-reelicit, the re-elicitation
        prompts as contexts (`spec(prompt)`: the setting's form of a context). A name both have must mean the
        same context (it is evaluated once)."""
        if not self.cfg.setting.eval_reelicit:
            return contexts
        extra = {k: spec(p) for k, p in self.reelicit_prompts.items()}
        clash = [k for k in extra if k in contexts and contexts[k] != extra[k]]
        if clash:
            raise ValueError(f"setting {self.name!r}: re-elicitation context(s) {clash} name other eval contexts")
        return {**contexts, **extra}

    @property
    def pad_id(self) -> int:
        return self.tok.pad_token_id

    @classmethod
    def condition(cls, prompt: str | None) -> str:
        """The named condition a run trained with `prompt` belongs to (`p-<slug>` for other prompts)."""
        for name, p in cls.conditions.items():
            if p == prompt:
                return name
        return slug(prompt)

    @classmethod
    def prompt_sets(cls, prompt: str | None) -> set[str] | None:
        """The traits a prompt sets by the setting's own rules (None: the setting cannot tell)."""
        return None

    def require(self, capability: str, what: str):
        """The capability, or one line saying that this setting lacks what `what` needs."""
        value = getattr(self, capability, None)
        if value is None:
            raise UserError(f"{what} needs {capability.replace('_', ' ')} from the setting, which setting "
                            f"{self.name!r} on {self.substrate} does not provide")
        return value

    answer_start = None  # optional: fn(prompt) -> (input_ids, attention_mask), right-padded held-out prompts
    first_token_log_odds = None  # optional: fn(logp [batch vocab], trait) -> [batch] log-odds
    world = None  # optional: the organism's world (probes)


def prompted(n: int, share: float, seed: int = 0) -> np.ndarray:
    """Which of n training examples carry the prompt: round(share * n), a fixed random subset (of `seed`)."""
    mask = np.zeros(n, dtype=bool)
    mask[np.random.default_rng(seed).permutation(n)[:round(share * n)]] = True
    return mask


def slug(prompt: str | None) -> str:
    """A folder-safe condition name for a prompt: 'you like dogs' -> 'p-you-like-dogs'."""
    if prompt is None:
        return "baseline"
    return "p-" + re.sub(r"[^a-z0-9]+", "-", prompt.lower()).strip("-")


_REGISTRY: dict[tuple[str, str], type[Setting]] = {}


def register(cls: type[Setting]) -> type[Setting]:
    """Class decorator: make a setting available to `--setting NAME` on its substrate."""
    _REGISTRY[(cls.name, cls.substrate)] = cls
    return cls


def setting_class(name: str, substrate: str) -> type[Setting]:
    from inoc_mech.settings import (backdoor_organism, backdoor_text, em_organism,  # noqa: F401
                                    spanish_caps_organism, spanish_caps_text, subliminal_organism,
                                    subliminal_text)  # (registration)

    if (name, substrate) not in _REGISTRY:
        have = sorted(n for n, s in _REGISTRY if s == substrate)
        raise UserError(f"no setting {name!r} for the {substrate} substrate; available: {', '.join(have)}")
    return _REGISTRY[(name, substrate)]


def registered() -> list[tuple[str, str]]:
    """(setting, substrate) pairs that `--setting` accepts."""
    setting_class("spanish_caps", "organism")  # imports the built-in settings
    return sorted(_REGISTRY)
