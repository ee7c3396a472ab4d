"""LoRA adapters via peft: add to any HF causal LM, list the adapter parameters, merge for analysis.

    python -c "from inoc_mech.models.lora import demo; demo()"

`add_lora(model, LoraSettings(r=16, alpha=32))` freezes the base weights and wraps the target linear
layers (default: peft's `all-linear`, every linear layer of the blocks but not the output head, for any
architecture peft supports; for Llama-style models exactly the attention and MLP projections). Only `lora_A` / `lora_B` are
trainable; `lora_B` starts at zero, so the wrapped model first computes exactly the base model.
`merge_lora` folds the adapters into the base weights (`merge_and_unload`) and returns a plain HF
model for TransformerLens and the analyses.

Parameter names inside a peft model look like
`base_model.model.model.layers.3.self_attn.q_proj.lora_A.default.weight`; `hooks.module_name` maps
them to `blocks.3.attn.W_Q.lora_A`, so gradient and update norms are reported per adapted module.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from inoc_mech.core.cli import UserError

ALL_LINEAR = "all-linear"  # peft's own choice per architecture: every linear layer except the output head


@dataclass
class LoraSettings:
    """LoRA hyperparameters (the training loop exposes them as --lora-r, --lora-alpha, --lora-targets)."""
    r: int = field(default=16, metadata={"help": "LoRA rank (0: full finetuning, no adapters)"})
    alpha: float = field(default=32.0, metadata={"help": "LoRA alpha (the update is scaled by alpha / r)"})
    targets: tuple[str, ...] = field(default=(), metadata={"help": "module names to adapt (empty: the architecture's default)"})
    dropout: float = field(default=0.0, metadata={"help": "LoRA dropout"})

    def __post_init__(self):
        if self.r < 0:
            raise UserError("--lora-r must be >= 0 (0 turns LoRA off)")
        if not self.alpha > 0:
            raise UserError("--lora-alpha must be > 0")
        if not 0 <= self.dropout < 1:
            raise UserError("--lora-dropout must be in [0, 1)")


def linear_module_names(model) -> list[str]:
    """Distinct last-name components of the model's linear layers (candidate LoRA targets; GPT-2's Conv1D too)."""
    from transformers.pytorch_utils import Conv1D

    names = {n.rsplit(".", 1)[-1] for n, m in model.named_modules() if isinstance(m, (torch.nn.Linear, Conv1D))}
    return sorted(names)


def add_lora(model, settings: LoraSettings):
    """Wrap `model` in a peft LoRA model (base weights frozen). Returns the PeftModel."""
    from peft import LoraConfig, get_peft_model

    if settings.r == 0:
        raise UserError("LoRA rank 0 means no adapters: train the model directly instead of calling add_lora")
    targets = list(settings.targets) or ALL_LINEAR
    if targets != ALL_LINEAR:
        available = set(linear_module_names(model))
        missing = [t for t in targets if t not in available]
        if missing:
            raise UserError(f"--lora-targets {', '.join(missing)} not found in this model; its linear modules are "
                            f"{', '.join(sorted(available))}")
    cfg = LoraConfig(r=settings.r, lora_alpha=settings.alpha, lora_dropout=settings.dropout,
                     target_modules=targets, bias="none", task_type="CAUSAL_LM")
    return get_peft_model(model, cfg)


def adapter_parameters(model) -> list[tuple[str, torch.nn.Parameter]]:
    """The trainable (adapter) parameters, by name."""
    return [(n, p) for n, p in model.named_parameters() if p.requires_grad]


def merge_lora(model):
    """A plain HF model with the adapters folded into the base weights (returns non-peft models unchanged)."""
    from peft import PeftModel

    if isinstance(model, PeftModel):
        return model.merge_and_unload()
    return model


def demo():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    tiny = LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                        num_attention_heads=4, num_key_value_heads=2))
    model = add_lora(tiny, LoraSettings(r=4, alpha=8))
    model.print_trainable_parameters()
    for n, p in adapter_parameters(model)[:4]:
        print(n, tuple(p.shape))
