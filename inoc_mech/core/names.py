"""Architecture naming as data: HF parameter names -> TransformerLens-style module names, one table per architecture.

    python -c "from inoc_mech.core.names import module_name; print(module_name('model.layers.3.self_attn.q_proj.weight'))"

Every instrument that reports per-module numbers (gradient and update norms in `mechanism.hooks`,
`--freeze` in the loop, output-side matrices in `mechanism.weight_diff`) names modules through
`module_name`, which reads the table of the model's architecture (`config.model_type`):
- `layers`: the HF path of the block list (`model.layers`); a block `i` becomes `blocks.{i}`;
- `block`: HF module path inside a block -> TransformerLens name inside `blocks.{i}` (`self_attn.q_proj`
  -> `attn.W_Q`); the first component of the TL name (`attn`, `mlp`, `ln1`, `ln2`) is the module group;
- `top`: HF module path outside the blocks -> TL name (`model.embed_tokens` -> `embed.W_E`);
- `outputs`: the TL names (inside a block) of the matrices that write into the residual stream.
Wrappers are peeled first: peft (`base_model.model.`, `.lora_A.default`), TransformerBridge
(`._original_component`), and the organism's factored head (`lm_head.parametrizations.weight.0.case`
-> `unembed.factor_case`). An architecture without a table keeps its HF module path as the name, so
every model still gets per-module numbers; add a table here to give it TransformerLens names.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field


@dataclass(frozen=True)
class ArchNames:
    """Where one architecture keeps its parts (HF module paths) and their TransformerLens names."""
    layers: str  # HF path of the list of blocks
    block: dict[str, str]  # HF module path inside a block -> TL name inside blocks.{i}
    top: dict[str, str]  # HF module path outside the blocks -> TL name
    outputs: tuple[str, ...] = ()  # TL names inside a block of the matrices that write into the residual stream
    group_of: dict[str, str] = field(default_factory=lambda: {"ln1": "attn", "ln2": "mlp"})  # norm -> the group it feeds


_LLAMA_BLOCK = {"self_attn.q_proj": "attn.W_Q", "self_attn.k_proj": "attn.W_K", "self_attn.v_proj": "attn.W_V",
                "self_attn.o_proj": "attn.W_O", "mlp.gate_proj": "mlp.W_gate", "mlp.up_proj": "mlp.W_in",
                "mlp.down_proj": "mlp.W_out", "input_layernorm": "ln1.w", "post_attention_layernorm": "ln2.w"}
_LLAMA_TOP = {"model.embed_tokens": "embed.W_E", "model.norm": "ln_final.w", "lm_head": "unembed.W_U"}
LLAMA = ArchNames("model.layers", _LLAMA_BLOCK, _LLAMA_TOP, ("attn.W_O", "mlp.W_out"))
QWEN3 = ArchNames("model.layers", {**_LLAMA_BLOCK, "self_attn.q_norm": "attn.ln_q.w", "self_attn.k_norm": "attn.ln_k.w"},
                  _LLAMA_TOP, ("attn.W_O", "mlp.W_out"))
GEMMA2 = ArchNames("model.layers", {**_LLAMA_BLOCK, "pre_feedforward_layernorm": "ln2.w",
                                    "post_attention_layernorm": "ln1_post.w", "post_feedforward_layernorm": "ln2_post.w"},
                   _LLAMA_TOP, ("attn.W_O", "mlp.W_out"), {"ln1": "attn", "ln1_post": "attn", "ln2": "mlp", "ln2_post": "mlp"})
GPT2 = ArchNames("transformer.h", {"attn.c_attn": "attn.W_QKV", "attn.c_proj": "attn.W_O", "mlp.c_fc": "mlp.W_in",
                                   "mlp.c_proj": "mlp.W_out", "ln_1": "ln1", "ln_2": "ln2"},
                 {"transformer.wte": "embed.W_E", "transformer.wpe": "pos_embed.W_pos", "transformer.ln_f": "ln_final",
                  "lm_head": "unembed.W_U"}, ("attn.W_O", "mlp.W_out"))
GENERIC = ArchNames("", {}, {})  # no table: HF module paths are the names

TABLES = {"llama": LLAMA, "mistral": LLAMA, "qwen2": LLAMA, "qwen3": QWEN3, "olmo2": LLAMA, "gemma2": GEMMA2,
          "gpt2": GPT2}

_WRAPPERS = [(re.compile(r"^base_model\.model\."), ""), (re.compile(r"\._original_component(?=\.|$)"), ""),
             (re.compile(r"\.default(?=\.|$)"), ""),  # peft adapter name
             (re.compile(r"\.parametrizations\.weight\.original$"), ".weight"),
             (re.compile(r"\.parametrizations\.weight\.0\."), ".factor_")]


def arch_names(model_or_type) -> ArchNames:
    """The naming table of a model (anything with `.config.model_type`) or of a model type string."""
    kind = model_or_type if isinstance(model_or_type, str) else getattr(getattr(model_or_type, "config", None),
                                                                        "model_type", "")
    return TABLES.get(kind, GENERIC)


def _peel(name: str) -> str:
    for pattern, repl in _WRAPPERS:
        name = pattern.sub(repl, name)
    return name


def _lookup(path: str, table: dict[str, str]) -> tuple[str, str] | None:
    """(TL name, the rest of the path after the matched HF module) for the longest matching prefix."""
    for hf in sorted(table, key=len, reverse=True):
        if path == hf or path.startswith(hf + "."):
            return table[hf], path[len(hf):]
    return None


def module_name(param_name: str, names: ArchNames = LLAMA) -> str:
    """TransformerLens-style name of a parameter's (or module's) module, e.g. `blocks.3.attn.W_Q`."""
    n = _peel(param_name)
    if names.layers and n.startswith(names.layers + "."):
        i, _, inner = n[len(names.layers) + 1:].partition(".")
        hit = _lookup(inner, names.block)
        if hit:
            tl, rest = hit
            return f"blocks.{i}.{tl}" + _strip_param(rest)
        return f"blocks.{i}.{_strip_param('.' + inner).lstrip('.')}"
    hit = _lookup(n, names.top)
    if hit:
        tl, rest = hit
        rest = _strip_param(rest)
        if tl.startswith("unembed") and rest:  # factored head parts: unembed.factor_case
            return "unembed" + rest
        return tl + rest
    return _strip_param("." + n).lstrip(".")


def _strip_param(rest: str) -> str:
    """Drop the trailing `.weight` / `.bias` of a parameter path (keep adapter parts like `.lora_A`)."""
    return re.sub(r"\.(weight|bias)$", "", rest)


def group_name(param_name: str, names: ArchNames = LLAMA) -> str:
    """Coarse module group: `embed`, `blocks.{i}.attn`, `blocks.{i}.mlp`, or `final` (norm and head)."""
    m = module_name(param_name, names)
    b = re.match(r"blocks\.(\d+)\.(\w+)", m)
    if b:
        part = b.group(2)
        return f"blocks.{b.group(1)}.{names.group_of.get(part, part)}"
    if m.startswith(("embed", "pos_embed")):
        return "embed"
    if m.startswith(("unembed", "ln_final")):
        return "final"
    return m


def block_index(tl_name: str) -> int | None:
    """The block of a TL name (`blocks.3.attn.W_O` -> 3), None outside the blocks."""
    m = re.match(r"blocks\.(\d+)\.", tl_name)
    return int(m.group(1)) if m else None


def is_output_matrix(tl_name: str, names: ArchNames) -> bool:
    """Whether a TL module name is one of the block matrices that write into the residual stream."""
    i = block_index(tl_name)
    return i is not None and tl_name[len(f"blocks.{i}."):] in names.outputs
