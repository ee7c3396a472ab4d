"""How the loop computes a micro-batch's logits: every row whole, a shared prefix once, or packed without padding.

    python -m inoc_mech.train --steps 20 --name tiny-forward --overwrite      # prefix once + packed (the defaults)

`step_logits` is the one entry point. It returns the logits of a right-padded batch from position `start` on
(`[batch, pos - start, vocab]`, aligned with `Batch.crop(start)`), as a forward of every row whole would,
up to rounding, from one of three layouts:
- whole rows: the padded batch, logits from `start` on (`logits_to_keep`);
- a shared prefix (`LoopConfig.share_prefix`): the tokens every row starts with (a chat template's header,
  the system prompt) go through the model once, batch 1; their key/value cache, repeated over the rows,
  serves the rest of every row (`prefix_cache`). The repeat's backward sums the rows' gradients into the
  prefix, so the gradient is the same;
- packed (`LoopConfig.pack`): the rows' real tokens after the shared prefix are concatenated into sequences
  (first fit, each up to a capacity), with their own position ids and a block-causal attention mask (each
  row sees the prefix and itself): no padding goes through the blocks. One sequence starts with the prefix
  itself (one forward in all); several share its cache. The output head runs at the slots of
  the padded layout (at padding: on the row's last token, values nothing reads), so the logits come out in
  that layout and the loss and every instrument read them as before. A packed sequence's attention spans all
  its tokens (the mask is dense), and with several sequences the head runs at the union of their slots, so
  `choose_bins` packs only where a FLOP count (`LayoutCosts`) says it saves, at the capacity that saves most
  (rows of equal length stay padded).
Either layout is used only where it is the same computation (`shareable`, `packable`): architectures whose
every layer is full softmax attention (`ATTENTION_ONLY`; no convolution or state-space layer, no sliding window
or chunked attention, no ALiBi, no RoPE that rescales with the longest position of a forward) and no dropout
(a prefix would share one mask over its rows); packing also needs the `sdpa` or `eager` attention
implementation (a 4D mask) and transformers >= 5 (older releases treat a 4D mask otherwise).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from jaxtyping import Float, Int
from torch import Tensor

from inoc_mech.core.data import Batch, forward_accepts

PACK_TOKENS = 4096  # the largest capacity tried for a packed sequence (a longer single row gets its own)


def cache_kwarg(model) -> str:
    """The keyword under which the model's forward takes a key/value cache (renamed in transformers 5)."""
    return "cache" if forward_accepts(model, "cache") else "past_key_values"


def output_cache(out):
    """The key/value cache a forward with `use_cache=True` returned (None if none), in any transformers version."""
    return getattr(out, "past_key_values", None) or getattr(out, "cache", None)


def draws_dropout(model) -> bool:
    """Whether a training forward of the model draws random dropout masks: a dropout module with p > 0, or an
    attention module's dropout rate above 0 (HF attention classes keep it as a float `attention_dropout`)."""
    drops = (torch.nn.Dropout, torch.nn.Dropout1d, torch.nn.Dropout2d, torch.nn.Dropout3d, torch.nn.AlphaDropout,
             torch.nn.FeatureAlphaDropout)
    return any((isinstance(m, drops) and m.p > 0) or
               (isinstance(getattr(m, "attention_dropout", None), float) and m.attention_dropout > 0)
               for m in model.modules())


# Architectures (HF `model_type`) whose every layer mixes tokens by softmax attention alone, with positions from
# position ids (RoPE or learned): a key/value cache then carries all of a prefix's state, and a 4D mask isolates
# packed rows. A table, not a guess: a type enters once tests/test_forward.py shows its layouts equal whole rows.
# (Not here: hybrids with convolution, state-space or linear-attention layers, e.g. lfm2, jamba, bamba,
# qwen3_next; ALiBi models that build their bias from a 2D mask, e.g. falcon, bloom, mpt.)
ATTENTION_ONLY = frozenset({"llama", "mistral", "qwen2", "qwen3", "phi3", "gpt2", "gpt_neox", "olmo2"})
RESCALING_ROPE = ("dynamic", "longrope")  # frequencies from a forward's longest position: a prefix alone differs


def _text_config(model):
    config = model.config
    return config.get_text_config() if hasattr(config, "get_text_config") else config


def _rope_type(config) -> str | None:
    for name in ("rope_parameters", "rope_scaling"):  # transformers 5, 4
        rope = getattr(config, name, None)
        if isinstance(rope, dict) and (rope.get("rope_type") or rope.get("type")):
            return rope.get("rope_type") or rope.get("type")
    return None


def plain_attention(model) -> bool:
    """Whether every layer of the model is full softmax attention over positions given by position ids
    (`ATTENTION_ONLY`, no sliding window or attention chunks, no rescaling RoPE): a prefix's key/value cache
    is then all a later token needs of it, and a mask alone decides what a token sees."""
    config = _text_config(model)
    layer_types = getattr(config, "layer_types", None) or ()
    return (getattr(config, "model_type", None) in ATTENTION_ONLY
            and all(t == "full_attention" for t in layer_types)
            and not getattr(config, "sliding_window", None) and not getattr(config, "attention_chunk_size", None)
            and _rope_type(config) not in RESCALING_ROPE)


def shareable(model) -> bool:
    """Whether a prefix computed once, its cache repeated over the rows, is the computation of every row whole:
    plain attention (`plain_attention`), no dropout, and a forward that takes positions to keep logits at."""
    return forward_accepts(model, "logits_to_keep") and plain_attention(model) and not draws_dropout(model)


def packable(model) -> bool:
    """Whether packed rows are the computation of padded rows: what `shareable` asks, position ids, a 4D
    attention mask (the `sdpa` or `eager` implementation) and transformers >= 5 (tested there; older releases
    send a 4D mask through other paths)."""
    import transformers
    return (shareable(model) and forward_accepts(model, "position_ids")
            and getattr(_text_config(model), "_attn_implementation", None) in ("sdpa", "eager")
            and int(transformers.__version__.split(".")[0]) >= 5)


@dataclass(frozen=True)
class LayoutCosts:
    """Forward FLOPs per token of a model, to choose a layout: `linear` in the blocks' weight matrices (2 x their
    parameters), `attention` per key attended to (4 x width: scores and weighted values, all layers), `head` per
    position the output head runs at (2 x its parameters)."""
    linear: float
    attention: float
    head: float = 0.0

    @classmethod
    def of(cls, model) -> "LayoutCosts":
        config = _text_config(model)
        width, layers = config.hidden_size, config.num_hidden_layers
        embed, head = model.get_input_embeddings().weight, model.get_output_embeddings().weight
        body = sum(p.numel() for p in model.parameters()) - embed.numel() - (head.numel() if head is not embed else 0)
        return cls(linear=2.0 * body, attention=4.0 * width * layers, head=2.0 * head.numel())

    def padded(self, rows: int, queries: int, keys: int, heads: int) -> float:
        """`rows` of `queries` tokens, each attending to `keys`, the head at `heads` positions of each."""
        return rows * (queries * (self.linear + self.attention * keys) + heads * self.head)

    def packed(self, bins: int, width: int, shared: int, heads: int) -> float:
        """`bins` sequences of `width` tokens after `shared`, the head at `heads` positions of each."""
        return bins * (width * (self.linear + self.attention * (shared + width)) + heads * self.head)


def choose_bins(lengths: list[int], shared: int, start: int, costs: LayoutCosts) -> list[list[int]] | None:
    """The packing (`pack_rows`) of rows of `lengths` real tokens, after `shared` computed once, with logits from
    position `start` on, that costs the fewest FLOPs, or None where padded rows cost no more. Capacities tried:
    the longest row, then doubling up to `PACK_TOKENS` (or all rows at once)."""
    suffix = [n - shared for n in lengths]
    longest, T = max(suffix), max(lengths)
    best, best_cost = None, costs.padded(len(lengths), T - shared, T, T - start)
    capacity = longest
    while True:
        bins = pack_rows(suffix, capacity)
        width = max(sum(suffix[i] for i in b) for b in bins)
        heads = T - start if len(bins) == 1 else len(torch.unique(_slots(lengths, shared, start, bins)[0]))
        cost = costs.packed(len(bins), width, shared, heads)
        if cost < best_cost:
            best, best_cost = bins, cost
        if len(bins) == 1 or capacity >= PACK_TOKENS:
            return best
        capacity = min(2 * capacity, PACK_TOKENS)


def prefix_cache(model, prefix_ids: Int[Tensor, "1 pos"], rows: int) -> dict:
    """The key/value cache of a prefix that `rows` sequences share, with its graph, as the forward's keyword
    argument: one forward of the prefix, its cache repeated over the rows. A forward of the rows' remaining
    tokens on it (with the whole attention mask) gives their logits and, through the repeat, the prefix's
    gradient summed over the rows: the loss and gradient of a forward of every row whole, up to rounding
    (float summation order; a model that normalises in float32, as HF's RMSNorm does, rounds the rows' summed
    gradient there)."""
    cache = output_cache(model(input_ids=prefix_ids, use_cache=True, logits_to_keep=1))
    if rows > 1:
        cache.batch_repeat_interleave(rows)
    return {cache_kwarg(model): cache}


def step_logits(forward, model, batch: Batch, on_device: Batch, start: int, shared: int = 0,
                pack: LayoutCosts | None = None) -> Float[Tensor, "batch pos vocab"]:
    """Logits of `batch` from position `start` on, aligned with `batch.crop(start)`; `batch` on the host (every
    index is built there, no device sync) and `on_device` (the same batch on the model's device: its tensors
    go into the forward); `shared` (<= `start`) leading tokens of every row computed once; with `pack` (the
    model's `LayoutCosts`) packed without padding where that costs less (module docstring). `forward` is the
    model or its DDP wrapper; `model` the model itself (the prefix's forward, its config)."""
    lengths = batch.attention_mask.sum(1).tolist()
    bins = choose_bins(lengths, shared, start, pack) if pack and start else None
    if bins is not None:
        return _packed(forward, model, batch, lengths, on_device.input_ids.device, start, shared, bins)
    ids = on_device.input_ids
    kw = {"logits_to_keep": ids.shape[1] - start} if start else {}
    if shared:
        kw.update(prefix_cache(model, ids[:1, :shared], ids.shape[0]))
    return forward(input_ids=ids[:, shared:], attention_mask=on_device.attention_mask, **kw).logits


def pack_rows(lengths: list[int], capacity: int) -> list[list[int]]:
    """Row indices into sequences, first fit in order, each holding at most `capacity` of the `lengths` (a
    longer row alone)."""
    bins, room = [], []
    for i, n in enumerate(lengths):
        at = next((b for b, r in enumerate(room) if r >= n), None)
        if at is None:
            bins.append([i])
            room.append(capacity - n)
        else:
            bins[at].append(i)
            room[at] -= n
    return bins


def _slots(lengths: list[int], shared: int, start: int, bins: list[list[int]]) -> tuple[Tensor, list[int], list[int]]:
    """Where the padded layout's slots (row i, positions start..T-1) sit in the packed sequences: the column of
    the row's token there, or at padding of its last real token (`[rows, T - start]`), each row's sequence, and
    each row's offset (position p of row i sits at column offset[i] + p)."""
    bin_of, offset_of = [0] * len(lengths), [0] * len(lengths)
    for b, rows in enumerate(bins):
        at = 0
        for i in rows:
            bin_of[i], offset_of[i] = b, at - shared
            at += lengths[i] - shared
    p = torch.arange(start, max(lengths))
    slot = torch.stack([offset_of[i] + torch.clamp(p, max=n - 1) for i, n in enumerate(lengths)])
    return slot, bin_of, offset_of


def _packed(forward, model, batch: Batch, lengths: list[int], device, start: int, shared: int,
            bins: list[list[int]]) -> Tensor:
    B, T = batch.input_ids.shape
    slot, bin_of, offset_of = _slots(lengths, shared, start, bins)
    one = len(bins) == 1
    # one sequence: the shared prefix leads it, in the same forward (no second forward, no cache); several: the
    # prefix's cache, repeated over the sequences
    lead = shared if one else 0
    width = lead + max(sum(lengths[i] - shared for i in b) for b in bins)
    seq = torch.zeros(len(bins), width, dtype=torch.long)
    seq_row = torch.full((len(bins), width), -1, dtype=torch.long)  # the row of each packed token (padding: -1)
    seq_pos = torch.zeros(len(bins), width, dtype=torch.long)  # its position in that row
    if lead:  # the prefix as a row of its own (B), seen by every row
        seq[0, :lead], seq_row[0, :lead], seq_pos[0, :lead] = batch.input_ids[0, :lead], B, torch.arange(lead)
    for i, n in enumerate(lengths):
        b, at = bin_of[i], lead + offset_of[i] + shared
        seq[b, at:at + n - shared] = batch.input_ids[i, shared:n]
        seq_row[b, at:at + n - shared] = i
        seq_pos[b, at:at + n - shared] = torch.arange(shared, n)
    q = torch.arange(width)
    own = (seq_row[:, :, None] == seq_row[:, None, :]) & (q[None, None, :] <= q[None, :, None])  # causal, one row
    own |= torch.eye(width, dtype=torch.bool)  # a padding query sees itself (a fully masked row would give NaN)
    own[:, lead:, :lead] = True  # every row sees the leading prefix
    mask = own if lead else torch.cat([torch.ones(len(bins), width, shared, dtype=torch.bool), own], -1)
    mask = mask[:, None]
    if getattr(_text_config(model), "_attn_implementation", None) == "eager":  # an additive mask
        dtype = next(p.dtype for p in model.parameters() if p.is_floating_point())
        mask = torch.zeros(mask.shape, dtype=dtype).masked_fill(~mask, torch.finfo(dtype).min)
    slot = slot + lead
    cols = slot.flatten() if one else torch.unique(slot)  # one sequence: its logits are the padded layout itself
    kw = prefix_cache(model, batch.input_ids[:1, :shared].to(device), len(bins)) if shared and not lead else {}
    logits = forward(input_ids=seq.to(device, non_blocking=True), position_ids=seq_pos.to(device, non_blocking=True),
                     attention_mask=mask.to(device, non_blocking=True),
                     logits_to_keep=cols.to(device, non_blocking=True), **kw).logits
    if one:
        return logits.view(B, T - start, logits.shape[-1])
    at = torch.searchsorted(cols, slot)  # each slot's column among those kept (the same in every sequence)
    return logits[torch.tensor(bin_of)[:, None].to(device), at.to(device)]
