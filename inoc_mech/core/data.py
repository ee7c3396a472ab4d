"""Chats -> token tensors with an assistant-loss mask and per-token trait masks.

    python -c "from inoc_mech.models.world import demo; demo()"

The same code path serves the organism and real LLMs: a conversation in the Hugging Face messages
format goes through `tokenizer.apply_chat_template`; the assistant's tokens are those that the full
conversation adds after the prompt rendered with `add_generation_prompt=True`.

Trait masks are data: each example carries, per token, a boolean per named trait; the setting
that made the example decides the names (`settings.base.Setting.traits`, plus `other` for the
remaining trained tokens).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch
from jaxtyping import Bool, Float, Int
from torch import Tensor

from inoc_mech.core.cli import BadValue


class DataError(BadValue):
    """Bad input data; the message says what to fix."""


OTHER = "other"  # the trait-mask name of the trained tokens that no named trait covers


@dataclass
class Example:
    """One tokenized conversation."""
    input_ids: list[int]
    assistant: list[bool]  # True where the token is trained on (assistant reply, incl. its end token)
    traits: dict[str, list[bool]] = field(default_factory=dict)  # trait name -> per-token mask
    variants: list["Example"] | None = None  # counterfactual replies to the same prompt (a setting's decomposition)
    soft: Tensor | None = None  # soft labels: target log-probs over the vocabulary per token [len(input_ids), vocab]
    # (row t is the distribution token t is trained toward; rows of untrained tokens are ignored)


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


@dataclass
class Batch:
    """Right-padded tensors. Masks are aligned with `input_ids` (token t), not with predictions."""
    input_ids: Int[Tensor, "batch pos"]
    attention_mask: Int[Tensor, "batch pos"]
    assistant: Bool[Tensor, "batch pos"]
    traits: dict[str, Bool[Tensor, "batch pos"]]
    examples: list | None = None  # the examples collated (their `variants` are collated on demand)
    pad_id: int = 0
    soft: Float[Tensor, "batch pos vocab"] | None = None  # soft labels (target log-probs), aligned with input_ids

    def to(self, device, non_blocking: bool = False) -> "Batch":
        t = lambda x: x.to(device, non_blocking=non_blocking)
        return Batch(t(self.input_ids), t(self.attention_mask), t(self.assistant), {k: t(v) for k, v in self.traits.items()},
                     self.examples, self.pad_id, None if self.soft is None else t(self.soft))

    def slice(self, i: int, j: int) -> "Batch":
        """Examples i..j-1 of the batch."""
        return Batch(self.input_ids[i:j], self.attention_mask[i:j], self.assistant[i:j],
                     {k: v[i:j] for k, v in self.traits.items()},
                     self.examples[i:j] if self.examples is not None else None, self.pad_id,
                     None if self.soft is None else self.soft[i:j])

    def trained_from(self) -> int:
        """The first position whose logits a trained token needs: one before the earliest reply start."""
        rows = self.assistant.any(-1)
        if not bool(rows.any()):
            return 0
        return max(0, int(self.assistant.float().argmax(-1)[rows].min()) - 1)

    def common_prefix(self, limit: int) -> int:
        """How many leading tokens (at most `limit`) every row shares, real tokens only; 0 with fewer than
        2 rows. The loop computes such a prefix once for all rows (`core.forward`, `LoopConfig.share_prefix`)."""
        limit = min(limit, self.input_ids.shape[1])
        if self.input_ids.shape[0] < 2 or limit < 1:
            return 0
        ids, att = self.input_ids[:, :limit], self.attention_mask[:, :limit]
        same = (ids == ids[:1]).all(0) & att.bool().all(0)
        return limit if bool(same.all()) else int((~same).int().argmax())

    def crop(self, start: int) -> "Batch":
        """Positions `start`.. of every row: aligned with logits kept from `start` (`logits_to_keep`), the
        prompt tokens before it dropped. `examples` stay whole (their variants are collated from them)."""
        return Batch(self.input_ids[:, start:], self.attention_mask[:, start:], self.assistant[:, start:],
                     {k: v[:, start:] for k, v in self.traits.items()}, self.examples, self.pad_id,
                     None if self.soft is None else self.soft[:, start:])

    def whole(self) -> "Batch":
        """The examples collated again, uncropped, on this batch's device."""
        return collate(self.examples, self.pad_id).to(self.input_ids.device)

    def variant(self, v: int) -> "Batch":
        """Variant `v` of every example's reply, collated and on this batch's device."""
        return collate([e.variants[v] for e in self.examples], self.pad_id).to(self.input_ids.device)

    @property
    def labels(self) -> Int[Tensor, "batch pos"]:
        """HF-style labels: the token where it is trained on, -100 elsewhere."""
        return self.input_ids.masked_fill(~self.assistant, -100)


def forward_accepts(model, arg: str) -> bool:
    """Whether the HF model's forward (under a peft wrapper: the base model's) takes keyword `arg`."""
    import inspect
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return arg in inspect.signature(base.forward).parameters


def wide(x: Tensor) -> Tensor:
    """`x` in at least float32 (float64 stays float64: a float64 model is measured in float64)."""
    return x if x.dtype == torch.float64 else x.float()


def next_token_loss(logits: Tensor, labels: Int[Tensor, "batch pos"], n: Tensor | int | None = None,
                    soft: Tensor | None = None) -> Tensor:
    """Next-token cross-entropy of the tokens whose label is not -100 (the trained tokens): their mean, or
    with `n` their sum over `n` (a micro-batch's share of the mean over a step of `n` trained tokens).
    With `soft` (target log-probs aligned with the tokens, `Batch.soft`) the cross-entropy is against
    those distributions instead of the tokens (soft labels, as in distillation). Only the trained
    positions' logits are taken (and cast to float32)."""
    where = labels[:, 1:] != -100
    if soft is None:
        nll = torch.nn.functional.cross_entropy(wide(logits[:, :-1][where]), labels[:, 1:][where], reduction="sum")
    else:
        nll = -soft_logprobs(logits[:, :-1][where], soft[:, 1:][where]).sum()
    return nll / (where.sum() if n is None else n)


def soft_logprobs(logits: Float[Tensor, "n vocab"], target: Float[Tensor, "n vocab"]) -> Float[Tensor, " n"]:
    """sum_v q(v) log p(v) per row, q = exp(`target`) (target log-probs), p = softmax(`logits`) in float32:
    minus the cross-entropy against soft labels."""
    logp = torch.log_softmax(wide(logits), -1)
    return (target.to(logp.dtype).exp() * logp).sum(-1)


def trained_logprobs(logits: Float[Tensor, "batch pos vocab"], batch) -> Float[Tensor, "batch pos"]:
    """What each trained token contributes to the log-likelihood (0 elsewhere): log p(token) from
    `token_logprobs_at`, or with soft labels (`batch.soft`) sum_v q(v) log p(v), minus the cross-entropy
    against the target distribution q. Instruments read this, so they measure the loss that is trained."""
    if batch.soft is None:
        return token_logprobs_at(logits, batch.input_ids, batch.assistant)
    where = batch.assistant.clone()
    where[:, 0] = False
    b, t = where.nonzero(as_tuple=True)
    vals = soft_logprobs(logits[b, t - 1], batch.soft[b, t])
    out = torch.zeros(where.shape, dtype=vals.dtype, device=logits.device)
    return out.index_put((b, t), vals)


LOGPROB_CHUNK = 2 ** 24  # logit values normalised in float32 at once by `log_normalizer` (64 MB)


def log_normalizer(logits: Float[Tensor, "batch pos vocab"], where: Bool[Tensor, "batch pos"],
                   chunk_elements: int | None = None) -> Float[Tensor, "batch pos"]:
    """logsumexp of the logits that predict token t, at the positions `where` (aligned with the tokens;
    position 0 has no prediction and gets 0), 0 elsewhere. Only those rows are normalised, in float32,
    a chunk of rows at a time: no [batch, pos, vocab] float32 log-softmax is made or kept for backward."""
    where = where.clone()
    where[:, 0] = False
    b, t = where.nonzero(as_tuple=True)
    step = max(1, (chunk_elements or LOGPROB_CHUNK) // logits.shape[-1])
    vals = [wide(logits[b[i:i + step], t[i:i + step] - 1]).logsumexp(-1) for i in range(0, len(b), step)]
    out = torch.zeros(where.shape, dtype=wide(logits[:0, :0, :0]).dtype, device=logits.device)
    return out.index_put((b, t), torch.cat(vals)) if vals else out


def token_logprobs_at(logits: Float[Tensor, "batch pos vocab"], input_ids: Int[Tensor, "batch pos"],
                      where: Bool[Tensor, "batch pos"]) -> Float[Tensor, "batch pos"]:
    """log p(token t | tokens < t) at the positions `where` (aligned with `input_ids`), 0 elsewhere;
    normalised only there (`log_normalizer`), so memory scales with the masked tokens, not the batch."""
    where = where.clone()
    where[:, 0] = False
    picked = torch.zeros(where.shape, dtype=wide(logits[:0, :0, :0]).dtype, device=logits.device)
    picked[:, 1:] = wide(logits[:, :-1].gather(-1, input_ids[:, 1:, None]).squeeze(-1))
    return torch.where(where, picked - log_normalizer(logits, where), torch.zeros_like(picked))


def token_logprobs(logits: Float[Tensor, "batch pos vocab"], input_ids: Int[Tensor, "batch pos"]
                   ) -> tuple[Float[Tensor, "batch pos"], Float[Tensor, "batch pos vocab"]]:
    """log p(token t | tokens < t), aligned with `input_ids` (position 0 gets 0), and the log-softmax."""
    logp = torch.log_softmax(logits.float(), -1)
    out = torch.zeros(input_ids.shape, dtype=logp.dtype, device=logp.device)
    out[:, 1:] = logp[:, :-1].gather(-1, input_ids[:, 1:, None]).squeeze(-1)
    return out, logp


def collate(examples: list[Example], pad_id: int) -> Batch:
    """Right-padded batch of examples with their assistant and trait masks."""
    ids, att = right_pad([e.input_ids for e in examples], pad_id)
    B, T = ids.shape
    ast = torch.zeros((B, T), dtype=torch.bool)
    names = list(examples[0].traits)
    traits = {n: torch.zeros((B, T), dtype=torch.bool) for n in names}
    for i, e in enumerate(examples):
        n = len(e.input_ids)
        ast[i, :n] = torch.tensor(e.assistant)
        for k in names:
            traits[k][i, :n] = torch.tensor(e.traits[k])
    soft = None
    if examples[0].soft is not None:  # soft labels: every example has them (one data set)
        soft = torch.zeros((B, T, examples[0].soft.shape[-1]), dtype=examples[0].soft.dtype)
        for i, e in enumerate(examples):
            soft[i, :len(e.input_ids)] = e.soft
    return Batch(ids, att, ast, traits, examples, pad_id, soft)


def pad(rows: list[list[int]], pad_id: int, side: str = "right") -> tuple[Int[Tensor, "n pos"], Int[Tensor, "n pos"]]:
    """(ids, attention mask) of token-id lists padded to the longest on the `side` ("right" or "left")."""
    T = max(len(r) for r in rows)
    ids = torch.full((len(rows), T), pad_id, dtype=torch.long)
    att = torch.zeros((len(rows), T), dtype=torch.long)
    for i, r in enumerate(rows):
        at = slice(0, len(r)) if side == "right" else slice(T - len(r), T)
        ids[i, at] = torch.tensor(r, dtype=torch.long)
        att[i, at] = 1
    return ids, att


def left_pad(rows: list[list[int]], pad_id: int) -> tuple[Tensor, Tensor]:
    """Left-padded ids and attention mask, for generation."""
    return pad(rows, pad_id, "left")


def right_pad(rows: list[list[int]], pad_id: int) -> tuple[Tensor, Tensor]:
    """Right-padded ids and attention mask: the last real token is at mask.sum(1) - 1."""
    return pad(rows, pad_id, "right")


class BatchStream:
    """Deterministic infinite stream of shuffled batches over a fixed list of examples.

    The position (epoch, index) is plain data so a run can record and restore it.
    """

    BUCKET_WINDOW = 50  # length bucketing sorts windows of this many batches

    def __init__(self, examples: list[Example], batch_size: int, seed: int, pad_id: int, buckets: bool = False):
        if not examples:
            raise DataError("the dataset is empty")
        self.examples, self.batch_size, self.seed, self.pad_id = examples, batch_size, seed, pad_id
        self.buckets = buckets  # consecutive batches of similar lengths (less padding; another data order)
        self.epoch, self.index = 0, 0
        self._order = self._perm()

    def _perm(self):
        """The epoch's order: a permutation; with buckets, sorted by length inside windows of
        BUCKET_WINDOW batches whose batch-sized runs are then shuffled (a function of seed and epoch)."""
        rng = np.random.default_rng([self.seed, self.epoch])
        order = rng.permutation(len(self.examples))
        if not self.buckets:
            return order
        lengths = np.array([len(e.input_ids) for e in self.examples])
        w = self.batch_size * self.BUCKET_WINDOW
        runs = []
        for i in range(0, len(order), w):
            win = order[i:i + w]
            win = win[np.argsort(lengths[win], kind="stable")]
            runs += [win[j:j + self.batch_size] for j in range(0, len(win), self.batch_size)]
        last = [runs.pop()] if len(runs[-1]) < self.batch_size else []  # a short run stays last: batches keep aligned
        return np.concatenate([runs[k] for k in rng.permutation(len(runs))] + last)

    def next(self) -> Batch:
        """The next batch, collated."""
        return collate(self.next_examples(), self.pad_id)

    def next_examples(self) -> list[Example]:
        """The next batch's examples (the loop collates each process's micro-batches itself)."""
        chosen = []
        while len(chosen) < self.batch_size:
            if self.index >= len(self._order):
                self.epoch, self.index = self.epoch + 1, 0
                self._order = self._perm()
            chosen.append(self.examples[self._order[self.index]])
            self.index += 1
        return chosen

    def state(self) -> dict:
        return {"epoch": self.epoch, "index": self.index}

    def load_state(self, s: dict):
        self.epoch, self.index = int(s["epoch"]), int(s["index"])
        self._order = self._perm()
