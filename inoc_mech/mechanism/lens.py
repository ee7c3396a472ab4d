"""TransformerLens access to any model of this project, offline, and hooks that cannot leak.

    python -m inoc_mech.mechanism.lens runs/_organism/factored-d128-l4-s0-68886ceb60

`load_bridge(folder)` accepts whatever `settings.load.load` accepts: a run folder (`runs/<name>/`,
model read from its `model/`), a pretrained organism folder, or any Hugging Face model folder
(real models are saved with their LoRA adapters merged). It returns a `Lens`: the
TransformerBridge plus the HF model it wraps, the tokenizer (loaded from the folder: TransformerLens
fails on an in-memory tokenizer without `name_or_path`) and the model's setting (with, for
organisms, the world).

Notes, measured with transformer-lens 4.3:
- `TransformerBridge.boot_transformers(name, hf_model=..., tokenizer=...)` reads the config from the
  HF model and touches no network; it switches the HF model to eager attention in place.
- Hook names are aliases: `blocks.{L}.hook_resid_post` is the hook point `blocks.{L}.hook_out`; a hook
  function sees the canonical name in `hook.name`.
- Booting wraps the HF model's modules in place: its parameter names gain `._original_component`
  (`model.layers.0._original_component.self_attn...`); the HF forward still gives the same outputs.
- `blocks.{L}.hook_resid_post` of the last block is *before* the final norm (HF's last hidden state is
  after it); `lens.final(resid)` applies the final norm and the unembedding, for a logit lens.
- We never call `enable_compatibility_mode()` (it centres the unembedding: compare log-probs, not
  logits, if you do) and never `torch.func.functional_call` on a bridge (it corrupts it).

`hooked(bridge, [(name, fn), ...])` is a context manager: inside it the forward hooks are attached,
on exit (also on an exception) they are removed, and it checks that the bridge holds exactly the
hooks it held before. Hook functions have the signature `fn(tensor, *, hook)`; returning a tensor
replaces the activation, returning None keeps it.
"""

from __future__ import annotations

import sys
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator

import torch
from jaxtyping import Float, Int
from torch import Tensor

from inoc_mech.core.cli import UserError

HookFn = Callable[..., "Tensor | None"]  # fn(tensor, *, hook) -> replacement or None


@dataclass
class Lens:
    """A TransformerBridge and what it wraps."""
    bridge: object  # transformer_lens.model_bridge.TransformerBridge
    model: object  # the HF causal LM inside the bridge (same parameters)
    tok: object
    setting: object  # settings.base.Setting of the loaded model (model and tokenizer attached)
    folder: Path  # the HF model folder that was loaded

    @property
    def world(self):
        """The organism's world (None for other settings)."""
        return self.setting.world

    @property
    def n_layers(self) -> int:
        return int(self.bridge.cfg.n_layers)

    @property
    def d_model(self) -> int:
        return int(self.bridge.cfg.d_model)

    def final(self, resid: Float[Tensor, "*batch d_model"]) -> Float[Tensor, "*batch vocab"]:
        """Logits read from a residual-stream state: final norm, then the unembedding (logit lens)."""
        return self.bridge.unembed(self.bridge.ln_final(resid))


def load_bridge(folder: str | Path, device: str = "cpu") -> Lens:
    """Load a run's, organism's or HF folder's model (`settings.load.load`) into a TransformerBridge, offline."""
    from transformer_lens.model_bridge import TransformerBridge

    from inoc_mech.settings.load import load

    loaded = load(folder, device)
    bridge = TransformerBridge.boot_transformers(str(loaded.folder), hf_model=loaded.model, tokenizer=loaded.tok,
                                                 device=device)
    bridge.eval()
    return Lens(bridge, loaded.model, loaded.tok, loaded.setting, loaded.folder)


# ---- hooks ---------------------------------------------------------------------------------------
def hook_count(bridge) -> int:
    """Forward and backward hooks attached to the bridge's hook points (aliases counted once)."""
    points = {id(hp): hp for hp in bridge.hook_dict.values()}.values()
    return sum(len(hp._forward_hooks) + len(hp._backward_hooks) for hp in points)


@contextmanager
def hooked(bridge, hooks: list[tuple[str, HookFn]]) -> Iterator[object]:
    """Attach forward hooks `[(hook name, fn(tensor, *, hook))]` for the duration of the block."""
    unknown = [name for name, _ in hooks if name not in bridge.hook_dict]
    if unknown:
        raise UserError(f"unknown hook name {unknown[0]!r}: e.g. 'blocks.0.hook_resid_post', 'blocks.0.hook_attn_out'")
    before = hook_count(bridge)
    try:
        with bridge.hooks(fwd_hooks=list(hooks)):
            yield bridge
    finally:
        left = hook_count(bridge) - before
        if left:  # never expected; fail loudly rather than let a hook change later forwards
            bridge.reset_hooks(including_permanent=False)
            raise RuntimeError(f"{left} hook(s) were still attached after the block; removed them")


@torch.no_grad()
def run_with_hooks(bridge, input_ids: Int[Tensor, "batch pos"], hooks: list[tuple[str, HookFn]] = ()
                   ) -> Float[Tensor, "batch pos vocab"]:
    """Log-probabilities of a forward pass with `hooks` attached only for this call."""
    with hooked(bridge, list(hooks)):
        logits = bridge(input_ids)
    return torch.log_softmax(logits.float(), -1)


@torch.no_grad()
def residuals(bridge, input_ids: Int[Tensor, "batch pos"]) -> Float[Tensor, "layer batch pos d_model"]:
    """The residual stream at every layer boundary: index 0 is the embedding (resid_pre of block 0),
    index L+1 is resid_post of block L (before the final norm)."""
    names = resid_names(int(bridge.cfg.n_layers))
    _, cache = bridge.run_with_cache(input_ids, names_filter=lambda n: n in names)
    return torch.stack([cache[n] for n in names])


def resid_names(n_layers: int) -> list[str]:
    """Hook names of the n_layers + 1 residual-stream boundaries (see `residuals`)."""
    return ["blocks.0.hook_resid_pre"] + [f"blocks.{i}.hook_resid_post" for i in range(n_layers)]


@dataclass
class LensConfig:
    """Load a model into TransformerLens and compare its log-probs with the HF model's on one chat."""
    folder: str = field(default="", metadata={"help": "a run, organism or model folder", "positional": None})

def main(argv=None):
    from inoc_mech.core.cli import parse_config

    a = parse_config(LensConfig, argv, prog="python -m inoc_mech.mechanism.lens", description=LensConfig.__doc__)
    torch.set_num_threads(1)
    lens = load_bridge(a.folder)
    msgs = [{"role": "user", "content": "what is one plus two"}]
    ids = lens.tok.apply_chat_template(msgs, add_generation_prompt=True, tokenize=True)
    ids = torch.tensor([list(ids["input_ids"] if hasattr(ids, "keys") else ids)])
    with torch.no_grad():
        hf = torch.log_softmax(lens.model(input_ids=ids).logits.float(), -1)
    tl = run_with_hooks(lens.bridge, ids)
    print(f"{lens.folder}: {lens.n_layers} layers, d_model {lens.d_model}, {len(lens.bridge.hook_dict)} hook names; "
          f"max |log p(bridge) - log p(HF)| = {(tl - hf).abs().max().item():.2e}")

if __name__ == "__main__":
    from inoc_mech.core.cli import run_main
    sys.exit(run_main(main))
