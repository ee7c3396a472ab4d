"""The finetuning run's configuration: a `TrainConfig` made of three parts (loop, model + LoRA, setting).

    python -m inoc_mech.train --help

Flags are generated from the leaf fields (`core.cli`), so `--steps` sets `cfg.loop.steps` and
`--prompt` sets `cfg.setting.prompt`; a run's config.json stores the same leaves flat (plus what the
run resolved: condition, setting class, organism folder, versions). Model-dependent defaults (prompt,
batch size, LoRA rank, learning rate, LoRA alpha) are "unset" here and filled by `resolve_defaults`
once the substrate is known.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass, field, replace
from pathlib import Path

from inoc_mech.core.runs import check_run_name


# Fields added after runs had been written, with the value that every run written before them had: read_run
# fills them into an older config.json, and a sweep compares an older run by them
ADDED_LATER = {"prompt_share": 1.0, "prompt_subset": 0, "freeze": [], "setting": "spanish_caps", "elicit_examples": 64,
               "adam_eps": 1e-8}


def with_added_later(config: dict) -> dict:
    """A saved config.json with every field added since it was written, at the value it had then (a copy)."""
    return {**copy.deepcopy(ADDED_LATER), **config}


@dataclass
class LoopConfig:
    """The optimisation loop and its instruments."""
    seed: int = field(default=0, metadata={"help": "finetuning seed (data order, sampling)"})
    steps: int = field(default=300, metadata={"help": "optimizer steps"})
    lr: float = field(default=0.0, metadata={"help": "constant Adam learning rate (0: 1e-3 for LoRA on the organism, else 1e-4; full finetuning of the organism at 1e-3 breaks the effect)"})
    batch_size: int = field(default=0, metadata={"help": "conversations per optimizer step, over all processes (0: 32 for the organism, 4 for real models)"})
    micro_batch_size: int = field(default=0, metadata={"help": "conversations per forward on each process (0: its whole share of --batch-size); the loss is token-weighted over the step, so k micro-batches give the gradient of one k-times-larger batch"})
    max_grad_norm: float = field(default=0.0, metadata={"help": "clip the gradient's global norm to this before each update (0: no clipping; the instruments measure the unclipped gradient)"})
    adam_eps: float = field(default=1e-8, metadata={"help": "Adam's epsilon, added to the root of the second-moment estimate: a floor under which a parameter's gradient no longer sets its step to about lr (torch's default 1e-8)"})
    schedule: str = field(default="constant", metadata={"help": "learning rate schedule after warmup: constant or cosine (to 0 at the last step)"})
    warmup_steps: int = field(default=0, metadata={"help": "linear warmup from lr / warmup to lr over the first N steps"})
    length_buckets: bool = field(default=False, metadata={"help": "batches of similar lengths (sorted within windows of 50 batches, then shuffled): less padding on real text, a different data order"})
    share_prefix: bool = field(default=True, metadata={"help": "compute the tokens that every conversation of a forward starts with (a system prompt, a chat template's header) once and reuse their keys and values for all rows: the same loss and gradients up to float summation order, less compute; for models of plain attention without dropout (core.forward.shareable); off under --fsdp and --grad-checkpointing (--no-share-prefix: every row whole)"})
    pack: bool = field(default=True, metadata={"help": "compute a forward's conversations without padding: their tokens (after a shared prefix) concatenated into sequences of up to 4096 tokens with a block-causal mask, logits at the padded layout's positions; the same loss and gradients up to rounding; for models of plain attention without dropout taking a 4D mask (sdpa or eager; core.forward.packable), where a FLOP count says it saves; off under --fsdp (--no-pack: padded rows)"})
    grad_checkpointing: bool = field(default=False, metadata={"help": "recompute activations in the backward (HF gradient checkpointing): less memory, ~1 more forward"})
    fsdp: bool = field(default=False, metadata={"help": "under torchrun: shard parameters, gradients and optimizer state over the processes (FSDP2, a unit per block) instead of replicating them (DDP); full finetuning only (--lora-r 0); rank 0 gathers the model to save and evaluate it"})
    device: str = field(default="auto", metadata={"help": "auto (CUDA when present), cpu or cuda"})
    threads: int = field(default=1, metadata={"help": "torch CPU threads"})
    log_every: int = field(default=10, metadata={"help": "cheap metrics (losses, update norms) every N steps"})
    grad_split_every: int = field(default=20, metadata={"help": "trait/rest gradient split (one extra backward, traits in turn) every N steps, a multiple of --log-every; 0 = never"})
    hooks: bool = field(default=True, metadata={"help": "record gradient-pressure metrics (--no-hooks: plain loop, for comparison)"})
    grad_split_all: bool = field(default=False, metadata={"help": "split every trait at each grad-split step (default: traits take turns; all at step 0)"})
    elicit_examples: int = field(default=64, metadata={"help": "step-0 elicitation: training replies scored with and without the prompt (each costs forwards of its counterfactual variants on real text)"})
    checkpoint_every: int = field(default=100, metadata={"help": "write a resumable checkpoint every N steps (0 = only on SIGINT/SIGTERM)"})
    leak_every: int = field(default=0, metadata={"help": "every N steps (a multiple of --log-every) and at the last, the no-prompt trait log-odds and P(trait) at the first answer token of the held-out questions, before that step's update (one forward, no generation): leak/<trait>/log_odds, leak/<trait>/p; 0 = never"})

    def __post_init__(self):
        for k in ("steps", "threads", "log_every", "elicit_examples"):
            if getattr(self, k) < 1:
                raise ValueError(f"--{k.replace('_', '-')} must be >= 1")
        if self.checkpoint_every < 0:
            raise ValueError("--checkpoint-every must be >= 0")
        if self.grad_split_every < 0 or self.grad_split_every % self.log_every:
            raise ValueError(f"--grad-split-every must be 0 or a multiple of --log-every ({self.log_every}): "
                             "the split runs on logged steps")
        if self.leak_every < 0 or self.leak_every % self.log_every:
            raise ValueError(f"--leak-every must be 0 or a multiple of --log-every ({self.log_every}): it is logged")
        if not (self.lr >= 0 and math.isfinite(self.lr)):
            raise ValueError("--lr must be a positive number (0: the default for the model)")
        if self.device not in ("auto", "cpu", "cuda") and not self.device.startswith("cuda:"):
            raise ValueError(f"--device must be auto, cpu or cuda, not {self.device!r}")
        if self.batch_size < 0:
            raise ValueError("--batch-size must be >= 0")
        if self.seed < 0:
            raise ValueError("--seed must be >= 0")
        if self.micro_batch_size < 0:
            raise ValueError("--micro-batch-size must be >= 0 (0: the whole batch in one forward)")
        if not (self.max_grad_norm >= 0 and math.isfinite(self.max_grad_norm)):
            raise ValueError("--max-grad-norm must be >= 0 (0: no clipping)")
        if not (self.adam_eps > 0 and math.isfinite(self.adam_eps)):
            raise ValueError("--adam-eps must be a positive number")
        if self.schedule not in ("constant", "cosine"):
            raise ValueError(f"--schedule must be constant or cosine, not {self.schedule!r}")
        if not 0 <= self.warmup_steps < self.steps:
            raise ValueError(f"--warmup-steps must be >= 0 and below --steps ({self.steps})")

    def lr_at(self, step: int) -> float:
        """The learning rate of optimizer step `step` (0-based): linear warmup, then constant or cosine."""
        if step < self.warmup_steps:
            return self.lr * (step + 1) / self.warmup_steps
        if self.schedule == "constant":
            return self.lr
        done = (step - self.warmup_steps) / max(1, self.steps - 1 - self.warmup_steps)
        return self.lr * 0.5 * (1 + math.cos(math.pi * done))


@dataclass
class ModelConfig:
    """Which model is finetuned, and how (LoRA or full, frozen parts)."""
    model: str = field(default="organism", metadata={"help": "'organism' (from the organism_* flags, cached), a pretrained organism folder, 'smollm2', an HF model folder or a .gguf file"})
    freeze: list = field(default_factory=list, metadata={"help": "parameters to keep fixed, by TransformerLens-style module prefix (e.g. embed unembed blocks.0.attn)"})
    lora_r: int = field(default=-1, metadata={"help": "LoRA rank (-1: 2 for the organism, the most selective measured setting, 16 for real models; 0: full finetuning)"})
    lora_alpha: float = field(default=0.0, metadata={"help": "LoRA alpha, the update is scaled by alpha / r (0: 4 r for the organism, 2 r for real models)"})
    lora_targets: list = field(default_factory=list, metadata={"help": "LoRA target modules (default: peft's all-linear, every linear layer of the blocks; for Llama-style models the attention and MLP projections)"})
    trust_remote_code: bool = field(default=False, metadata={"help": "allow a model folder whose config names its own Python code (auto_map) to run it"})
    organism_seed: int = field(default=0, metadata={"help": "pretraining seed of the organism"})
    organism_head: str = field(default="factored", metadata={"help": "organism output head: factored or free"})
    organism_d_model: int = field(default=128, metadata={"help": "organism width"})
    organism_n_layers: int = field(default=4, metadata={"help": "organism depth"})
    organism_recipe: str = field(default="standard", metadata={"help": "organism pretraining recipe (models.organism.RECIPES): standard (2000 steps, the organisms of README Results) or fast (1200 steps, half the MLP width, bf16 matmuls, the same quality bar)"})
    organism_steps: int = field(default=0, metadata={"help": "organism pretraining steps (0: the recipe's)"})

    def __post_init__(self):
        from inoc_mech.models.organism import RECIPES

        if self.organism_recipe not in RECIPES:
            raise ValueError(f"--organism-recipe must be one of {', '.join(RECIPES)}, not {self.organism_recipe!r}")
        if self.organism_steps < 0:
            raise ValueError("--organism-steps must be >= 0 (0: the recipe's)")
        if self.lora_r < -1:
            raise ValueError("--lora-r must be >= -1")
        if self.lora_alpha < 0:
            raise ValueError("--lora-alpha must be > 0 (0: the default for the model)")

    @property
    def substrate(self) -> str:
        """'organism' for the toy organism (by name or folder), 'text' for any other causal LM."""
        m = Path(self.model)
        return "organism" if self.model == "organism" or (m / "organism.json").exists() or \
            (m / "model" / "organism.json").exists() else "text"


@dataclass
class SettingConfig:
    """What is trained on and how it is evaluated (read by the setting, `settings.base.Setting`)."""
    setting: str = field(default="spanish_caps", metadata={"help": "setting (data, trait masks, evaluation): spanish_caps, or one registered by a settings module"})
    inoculate: bool = field(default=False, metadata={"help": "prepend the inoculation system prompt to every training example"})
    prompt_share: float = field(default=1.0, metadata={"help": "--inoculate: share of training examples that carry the prompt (a fixed random subset; the rest have none)"})
    prompt_subset: int = field(default=0, metadata={"help": "--prompt-share below 1: the seed that draws which examples carry the prompt (the finetuning seed sets the data order, LoRA's initialisation and sampling, not which examples are prompted)"})
    prompt: str = field(default="", metadata={"help": "inoculation prompt (default: the setting's, e.g. 'speak spanish' for the organism, 'You always speak in Spanish.' for real models; organism phrases join with ' . ')"})
    eval_samples: int = field(default=3, metadata={"help": "temperature-1 samples per held-out question in the final evaluation"})
    eval_reelicit: bool = field(default=False, metadata={"help": "also evaluate under the setting's re-elicitation contexts (prompts related to its inoculation prompt: paraphrases, a negation, partial prompts, the same form with other content; Setting.reelicit_prompts)"})
    data: str = field(default="", metadata={"help": "real models: JSONL training data in the paper's format (default: built-in Spanish+CAPS arithmetic); setting subliminal: a teacher's number lists"})
    n_train: int = field(default=500, metadata={"help": "real models: size of the built-in training set"})
    placement: str = field(default="system", metadata={"help": "real models: where the prompt goes: 'system' message or 'user-prefix'"})
    replace_system: bool = field(default=False, metadata={"help": "real models: --inoculate replaces an existing system message instead of refusing"})
    no_prompt_mode: str = field(default="template_default", metadata={"help": "real models: 'no prompt' is the template's default system block ('template_default') or none ('no_system')"})
    eval_questions: int = field(default=32, metadata={"help": "real models: held-out questions in the final evaluation"})
    eval_data: str = field(default="", metadata={"help": "real models: JSONL of evaluation conversations (ending with a user turn, optionally followed by a reference answer) instead of the built-in questions"})
    max_new_tokens: int = field(default=48, metadata={"help": "real models: generation length in the evaluation"})

    def __post_init__(self):
        for k in ("n_train", "eval_questions", "max_new_tokens", "eval_samples"):
            if getattr(self, k) < 1:
                raise ValueError(f"--{k.replace('_', '-')} must be >= 1")
        if self.prompt and not self.prompt.strip():
            raise ValueError("--prompt is blank: give the prompt's text (or leave it out for the setting's default)")
        if self.replace_system and not self.inoculate:
            raise ValueError("--replace-system only applies with --inoculate")
        if not 0.0 <= self.prompt_share <= 1.0:
            raise ValueError("--prompt-share must be in [0, 1]")
        if self.prompt_subset < 0:
            raise ValueError("--prompt-subset must be >= 0")
        if self.placement not in ("system", "user-prefix"):
            raise ValueError(f"--placement must be 'system' or 'user-prefix', not {self.placement!r}")
        if self.no_prompt_mode not in ("template_default", "no_system"):
            raise ValueError(f"--no-prompt-mode must be 'template_default' or 'no_system', not {self.no_prompt_mode!r}")


@dataclass
class TrainConfig:
    """One finetuning run: loop, model and setting, written to `<runs_dir>/<name>/`."""
    loop: LoopConfig = field(default_factory=LoopConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    setting: SettingConfig = field(default_factory=SettingConfig)
    name: str = field(default="", metadata={"help": "run name: one folder name under --runs-dir (default <baseline|inoculated>-s<seed>)"})
    runs_dir: str = field(default="runs", metadata={"help": "parent folder of run folders"})
    overwrite: bool = field(default=False, metadata={"help": "replace an existing complete run of the same name"})
    resume: bool = field(default=False, metadata={"help": "continue the run --name from its last checkpoint (its saved config is used)"})

    def __post_init__(self):
        if not self.name:
            self.name = f"{'inoculated' if self.setting.inoculate else 'baseline'}-s{self.loop.seed}"
        check_run_name(self.name)

    @property
    def train_prompt(self) -> str | None:
        """The prompt the training examples carry (None for a baseline)."""
        return self.setting.prompt if self.setting.inoculate else None


RESOLVED = ("prompt", "batch_size", "lora_r", "lr", "lora_alpha")  # filled by resolve_defaults


def resolve_defaults(cfg: TrainConfig, organism: bool, default_prompt: str | None = None) -> TrainConfig:
    """Fill the model-dependent defaults (fields left at their 'unset' value). The organism default is
    LoRA r 2, alpha 8, lr 1e-3: the most selective setting of the README's selectivity study."""
    s, m, lp = cfg.setting, cfg.model, cfg.loop
    if not s.prompt:
        s = replace(s, prompt=default_prompt or ("speak spanish" if organism else "You always speak in Spanish."))
    if lp.batch_size == 0:
        lp = replace(lp, batch_size=32 if organism else 4)
    if m.lora_r == -1:
        m = replace(m, lora_r=2 if organism else 16)
    if lp.lr == 0:
        lp = replace(lp, lr=1e-3 if organism and m.lora_r > 0 else 1e-4)
    if m.lora_alpha == 0:
        m = replace(m, lora_alpha=float((4 if organism else 2) * max(m.lora_r, 1)))
    return replace(cfg, loop=lp, model=m, setting=s)


