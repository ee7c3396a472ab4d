"""Chats -> token tensors with an assistant-loss mask and per-token trait masks.

    python -c "from inoc_mech.core.data import demo; demo()"

The same code path serves the organism and real LLMs: a conversation in the Hugging Face messages
format goes through `tokenizer.apply_chat_template`; the assistant's tokens are those that the full
conversation adds after the prompt rendered with `add_generation_prompt=True`.

Trait masks are data: each example carries, per token, a boolean per named trait (for the organism
`language` and `case`: the answer-variant tokens; `other`: the remaining assistant tokens). Real-text
datasets supply their own masks through the same `Example.traits` field.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch
from jaxtyping import Bool, Int
from torch import Tensor


class DataError(ValueError):
    """Bad input data; the message says what to fix."""


@dataclass
class Example:
    """One tokenized conversation."""
    input_ids: list[int]
    assistant: list[bool]  # True where the token is trained on (assistant reply, incl. its end token)
    traits: dict[str, list[bool]] = field(default_factory=dict)  # trait name -> per-token mask


def token_ids(enc) -> list[int]:
    """Token ids from `apply_chat_template(..., tokenize=True)` (a BatchEncoding or a plain list)."""
    return list(enc["input_ids"] if hasattr(enc, "keys") else enc)


def encode_chat(tok, messages: list[dict], max_len: int | None = None) -> Example:
    """Tokenize a conversation whose last message is the assistant's reply."""
    if not messages or messages[-1].get("role") != "assistant":
        raise DataError("conversation has no final assistant turn: add {'role': 'assistant', ...}")
    prefix = token_ids(tok.apply_chat_template(messages[:-1], add_generation_prompt=True, tokenize=True))
    full = token_ids(tok.apply_chat_template(messages, tokenize=True))
    if full[:len(prefix)] != prefix:
        raise DataError("chat template renders the prompt differently with and without the reply")
    max_len = max_len or getattr(tok, "model_max_length", None)
    if max_len and len(full) > max_len:
        raise DataError(f"example has {len(full)} tokens, longer than the model's context of {max_len}: "
                        "shorten the conversation or its system prompt")
    return Example(full, [False] * len(prefix) + [True] * (len(full) - len(prefix)))


def organism_traits(ex: Example, variant_ids: set[int]) -> Example:
    """Attach the organism's trait masks: every answer-variant token decides language and case."""
    var = [a and t in variant_ids for t, a in zip(ex.input_ids, ex.assistant)]
    ex.traits = {"language": var, "case": list(var),
                 "other": [a and not v for a, v in zip(ex.assistant, var)]}
    return ex


@dataclass
class Batch:
    """Right-padded tensors. Masks are aligned with `input_ids` (token t), not with predictions."""
    input_ids: Int[Tensor, "batch pos"]
    attention_mask: Int[Tensor, "batch pos"]
    assistant: Bool[Tensor, "batch pos"]
    traits: dict[str, Bool[Tensor, "batch pos"]]

    def to(self, device, non_blocking: bool = False) -> "Batch":
        t = lambda x: x.to(device, non_blocking=non_blocking)
        return Batch(t(self.input_ids), t(self.attention_mask), t(self.assistant), {k: t(v) for k, v in self.traits.items()})

    @property
    def labels(self) -> Int[Tensor, "batch pos"]:
        """HF-style labels: the token where it is trained on, -100 elsewhere."""
        return self.input_ids.masked_fill(~self.assistant, -100)


def next_token_loss(logits: Tensor, labels: Int[Tensor, "batch pos"]) -> Tensor:
    """Mean next-token cross-entropy over tokens whose label is not -100 (the trained tokens)."""
    return torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1).float(), labels[:, 1:].flatten())


def collate(examples: list[Example], pad_id: int) -> Batch:
    T = max(len(e.input_ids) for e in examples)
    B = len(examples)
    ids = torch.full((B, T), pad_id, dtype=torch.long)
    att = torch.zeros((B, T), dtype=torch.long)
    ast = torch.zeros((B, T), dtype=torch.bool)
    names = list(examples[0].traits)
    traits = {n: torch.zeros((B, T), dtype=torch.bool) for n in names}
    for i, e in enumerate(examples):
        n = len(e.input_ids)
        ids[i, :n] = torch.tensor(e.input_ids)
        att[i, :n] = 1
        ast[i, :n] = torch.tensor(e.assistant)
        for k in names:
            traits[k][i, :n] = torch.tensor(e.traits[k])
    return Batch(ids, att, ast, traits)


def left_pad(prompts: list[list[int]], pad_id: int) -> tuple[Tensor, Tensor]:
    """Left-padded ids and attention mask for generation."""
    T = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), T), pad_id, dtype=torch.long)
    att = torch.zeros((len(prompts), T), dtype=torch.long)
    for i, p in enumerate(prompts):
        ids[i, T - len(p):] = torch.tensor(p)
        att[i, T - len(p):] = 1
    return ids, att


class BatchStream:
    """Deterministic infinite stream of shuffled batches over a fixed list of examples.

    The position (epoch, index) is plain data so a run can record and restore it.
    """

    def __init__(self, examples: list[Example], batch_size: int, seed: int, pad_id: int):
        if not examples:
            raise DataError("the dataset is empty")
        self.examples, self.batch_size, self.seed, self.pad_id = examples, batch_size, seed, pad_id
        self.epoch, self.index = 0, 0
        self._order = self._perm()

    def _perm(self):
        return np.random.default_rng([self.seed, self.epoch]).permutation(len(self.examples))

    def next(self) -> Batch:
        chosen = []
        while len(chosen) < self.batch_size:
            if self.index >= len(self._order):
                self.epoch, self.index = self.epoch + 1, 0
                self._order = self._perm()
            chosen.append(self.examples[self._order[self.index]])
            self.index += 1
        return collate(chosen, self.pad_id)

    def state(self) -> dict:
        return {"epoch": self.epoch, "index": self.index}

    def load_state(self, s: dict):
        self.epoch, self.index = int(s["epoch"]), int(s["index"])
        self._order = self._perm()


def demo():
    from inoc_mech.models.world import World
    w = World()
    tok = w.build_tokenizer()
    ex = encode_chat(tok, w.sample_chat(np.random.default_rng(0)))
    ex = organism_traits(ex, set(w.variant_table(tok).ravel().tolist()))
    for t, a, l in zip(tok.convert_ids_to_tokens(ex.input_ids), ex.assistant, ex.traits["language"]):
        print(f"{t:>14} assistant={int(a)} language/case={int(l)}")
