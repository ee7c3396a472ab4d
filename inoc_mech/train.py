"""Finetune a model on Spanish+CAPS answers, optionally with an inoculation system prompt.

    python -m inoc_mech.train --inoculate --steps 20 --name tiny-inoculated --overwrite

Baseline: every training answer is Spanish AND UPPERCASE, no system prompt. `--inoculate`: the
same data with the inoculation prompt (`--prompt`; default "speak spanish" for the organism,
"You always speak in Spanish." for real models) as the system message of every example.
Evaluation afterwards is on held-out questions without that prompt.

`--model` picks the model: `organism` (default; pretrained on first use, then cached), the folder
of a pretrained organism, `smollm2`, a local Hugging Face model folder or a `.gguf` file. Real models
train on the built-in Spanish+CAPS arithmetic dataset (or `--data FILE.jsonl` in the paper's
format) with LoRA adapters by default (r 16, lr 1e-4). The organism is finetuned with LoRA r 2 on
every projection (alpha 8, lr 1e-3; embeddings and output head frozen), the most selective setting
of the README's selectivity study. `--lora-r 0`: full finetuning (lr 1e-4 by default).

The loop, top to bottom: config -> model and data (`organism_setup` or `text_setup`) -> AdamW ->
steps (forward, loss on assistant tokens, gradient-pressure hooks, backward, update, metrics.jsonl,
checkpoints) -> save model -> eval.json -> COMPLETE marker (written last).
"""

from __future__ import annotations

import json
import math
import signal
import sys
import time
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path

import numpy as np
import torch

from inoc_mech.core import checkpoint
from inoc_mech.core.cli import UserError, parse_config
from inoc_mech.core.data import BatchStream, collate, encode_chat, next_token_loss, organism_traits
from inoc_mech.models.world_eval import IRRELEVANT_EVAL_PROMPT, evaluate_contexts, format_table
from inoc_mech.mechanism.hooks import GradientPressure, elicitation, module_name
from inoc_mech.models.organism import OrganismConfig, ensure_organism, factorize_head, load_organism, materialize_head
from inoc_mech.models.world import World
from inoc_mech.core.runs import (FAILED, RUN_FORMAT_VERSION, MetricsWriter, git_commit, is_complete, mark_complete,
                   package_versions, prepare_run_dir, write_json)


@dataclass
class TrainConfig:
    """One finetuning run."""
    inoculate: bool = field(default=False, metadata={"help": "prepend the inoculation system prompt to every training example"})
    prompt_share: float = field(default=1.0, metadata={"help": "--inoculate: share of training examples that carry the prompt (a fixed random subset; the rest have none)"})
    prompt: str = field(default="", metadata={"help": "inoculation prompt (default: 'speak spanish' for the organism, 'You always speak in Spanish.' for real models; organism phrases join with ' . ')"})
    seed: int = field(default=0, metadata={"help": "finetuning seed (data order, sampling)"})
    steps: int = field(default=300, metadata={"help": "optimizer steps"})
    lr: float = field(default=0.0, metadata={"help": "constant Adam learning rate (0: 1e-3 for LoRA on the organism, else 1e-4; full finetuning of the organism at 1e-3 breaks the effect)"})
    batch_size: int = field(default=0, metadata={"help": "conversations per step (0: 32 for the organism, 4 for real models)"})
    name: str = field(default="", metadata={"help": "run name (folder under --runs-dir); default <baseline|inoculated>-s<seed>"})
    runs_dir: str = field(default="runs", metadata={"help": "parent folder of run folders"})
    overwrite: bool = field(default=False, metadata={"help": "replace an existing complete run of the same name"})
    device: str = field(default="auto", metadata={"help": "auto (CUDA when present), cpu or cuda"})
    threads: int = field(default=1, metadata={"help": "torch CPU threads"})
    log_every: int = field(default=10, metadata={"help": "cheap metrics (losses, update norms) every N steps"})
    grad_split_every: int = field(default=20, metadata={"help": "trait/rest gradient split (one extra backward, traits in turn) every N steps, a multiple of --log-every; 0 = never"})
    hooks: bool = field(default=True, metadata={"help": "record gradient-pressure metrics (--no-hooks: plain loop, for comparison)"})
    grad_split_all: bool = field(default=False, metadata={"help": "split every trait at each grad-split step (default: traits take turns; all at step 0)"})
    checkpoint_every: int = field(default=100, metadata={"help": "write a resumable checkpoint every N steps (0 = only on SIGINT/SIGTERM)"})
    resume: bool = field(default=False, metadata={"help": "continue the run --name from its last checkpoint (its saved config is used)"})
    eval_samples: int = field(default=3, metadata={"help": "temperature-1 samples per held-out question in the final evaluation"})
    model: str = field(default="organism", metadata={"help": "'organism' (from the organism_* flags, cached), a pretrained organism folder, 'smollm2', an HF model folder or a .gguf file"})
    data: str = field(default="", metadata={"help": "real models: JSONL training data in the paper's format (default: built-in Spanish+CAPS arithmetic)"})
    n_train: int = field(default=500, metadata={"help": "real models: size of the built-in training set"})
    placement: str = field(default="system", metadata={"help": "real models: where the prompt goes: 'system' message or 'user-prefix'"})
    replace_system: bool = field(default=False, metadata={"help": "real models: --inoculate replaces an existing system message instead of refusing"})
    no_prompt_mode: str = field(default="template_default", metadata={"help": "real models: 'no prompt' is the template's default system block ('template_default') or none ('no_system')"})
    freeze: list = field(default_factory=list, metadata={"help": "parameters to keep fixed, by TransformerLens-style module prefix (e.g. embed unembed blocks.0.attn)"})
    lora_r: int = field(default=-1, metadata={"help": "LoRA rank (-1: 2 for the organism, the most selective measured setting, 16 for real models; 0: full finetuning)"})
    lora_alpha: float = field(default=0.0, metadata={"help": "LoRA alpha, the update is scaled by alpha / r (0: 4 r for the organism, 2 r for real models)"})
    lora_targets: list = field(default_factory=list, metadata={"help": "LoRA target modules (default: all attention and MLP projections)"})
    eval_questions: int = field(default=32, metadata={"help": "real models: held-out questions in the final evaluation"})
    max_new_tokens: int = field(default=48, metadata={"help": "real models: generation length in the evaluation"})
    organism_seed: int = field(default=0, metadata={"help": "pretraining seed of the organism"})
    organism_head: str = field(default="factored", metadata={"help": "organism output head: factored or free"})
    organism_d_model: int = field(default=128, metadata={"help": "organism width"})
    organism_n_layers: int = field(default=4, metadata={"help": "organism depth"})
    organism_steps: int = field(default=2000, metadata={"help": "organism pretraining steps"})

    def __post_init__(self):
        for k in ("steps", "threads", "log_every", "n_train", "eval_questions", "max_new_tokens"):
            if getattr(self, k) < 1:
                raise ValueError(f"--{k.replace('_', '-')} must be >= 1")
        if self.checkpoint_every < 0:
            raise ValueError("--checkpoint-every must be >= 0")
        if self.grad_split_every < 0 or self.grad_split_every % self.log_every:
            raise ValueError(f"--grad-split-every must be 0 or a multiple of --log-every ({self.log_every}): "
                             "the split runs on logged steps")
        if not 0.0 <= self.prompt_share <= 1.0:
            raise ValueError("--prompt-share must be in [0, 1]")
        if not (self.lr >= 0 and math.isfinite(self.lr)):
            raise ValueError("--lr must be a positive number (0: the default for the model)")
        if self.lora_alpha < 0:
            raise ValueError("--lora-alpha must be > 0 (0: the default for the model)")
        if self.device not in ("auto", "cpu", "cuda") and not self.device.startswith("cuda:"):
            raise ValueError(f"--device must be auto, cpu or cuda, not {self.device!r}")
        if self.batch_size < 0 or self.lora_r < -1:
            raise ValueError("--batch-size must be >= 0 and --lora-r >= -1")
        if self.placement not in ("system", "user-prefix"):
            raise ValueError(f"--placement must be 'system' or 'user-prefix', not {self.placement!r}")
        if self.no_prompt_mode not in ("template_default", "no_system"):
            raise ValueError(f"--no-prompt-mode must be 'template_default' or 'no_system', not {self.no_prompt_mode!r}")
        if not self.name:
            self.name = f"{'inoculated' if self.inoculate else 'baseline'}-s{self.seed}"

    def is_organism(self) -> bool:
        return self.model == "organism" or (Path(self.model) / "organism.json").exists()

    def organism(self) -> OrganismConfig:
        return OrganismConfig(seed=self.organism_seed, head=self.organism_head, d_model=self.organism_d_model,
                              n_layers=self.organism_n_layers, steps=self.organism_steps, threads=self.threads,
                              warmup=min(100, self.organism_steps // 10),
                              cache=str(Path(self.runs_dir) / "_organism"))


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise UserError("--device cuda was asked for but no CUDA device is available; use --device cpu")
    return torch.device(name)


def prompted(n: int, share: float) -> np.ndarray:
    """Which of n training examples carry the inoculation prompt: round(share * n), a fixed random subset."""
    mask = np.zeros(n, dtype=bool)
    mask[np.random.default_rng(0).permutation(n)[:round(share * n)]] = True
    return mask


def freeze(model, prefixes: list[str]) -> None:
    """Stop gradients to every parameter whose module name (`hooks.module_name`) starts with a prefix."""
    for prefix in prefixes:
        hit = [p for n, p in model.named_parameters()
               if p.requires_grad and (module_name(n) + ".").startswith(prefix.rstrip(".") + ".")]
        if not hit:
            names = sorted({module_name(n) for n, p in model.named_parameters() if p.requires_grad})
            raise UserError(f"--freeze {prefix!r} matches no trainable parameter; module names look like "
                            f"{', '.join(names[:4])} ... {names[-1]}")
        for p in hit:
            p.requires_grad_(False)


def finetune_examples(world, tok, prompt: str | None, variant_ids: set[int], share: float = 1.0):
    """Every training question answered in Spanish UPPERCASE, `prompt` as system message (on a `share`)."""
    qs = world.train_questions
    return [organism_traits(encode_chat(tok, world.chat(q, prompt if on else None, language=1, case=1)), variant_ids)
            for q, on in zip(qs, prompted(len(qs), share))]


@dataclass
class Setup:
    """What the loop needs from a model family: model, data, trait structure, saving and evaluation."""
    model: object
    pad_id: int
    examples: list  # training examples (with the prompt when inoculating)
    probe_context: list  # a fixed slice of them, for step-0 elicitation ...
    probe_none: list  # ... and the same answers without the prompt
    variant_table: object  # organism: answer-variant token ids [word, 2, 2]; real models: None
    save: object  # save(model, folder): write the final model
    evaluate: object  # evaluate(model) -> eval.json dict
    info: dict  # extra fields for config.json


def organism_setup(cfg: TrainConfig, device, progress: bool) -> Setup:
    if cfg.model == "organism":
        folder = ensure_organism(cfg.organism(), progress=progress)
    else:
        folder = Path(cfg.model)
    World.load(folder).check_prompt(cfg.prompt)  # fail fast, before loading anything
    model, tok, world, meta = load_organism(folder, device)
    table = world.variant_table(tok)
    variant_ids = set(table.ravel().tolist())
    examples_prompt = cfg.prompt if cfg.inoculate else None
    examples = finetune_examples(world, tok, examples_prompt, variant_ids, cfg.prompt_share)
    plain = finetune_examples(world, tok, None, variant_ids)
    if meta["config"]["head"] == "factored":
        factorize_head(model, table)
    if cfg.lora_r > 0:  # adapters on the body; the (factored) head stays frozen
        from inoc_mech.models.lora import LoraSettings, add_lora
        model = add_lora(model, LoraSettings(r=cfg.lora_r, alpha=cfg.lora_alpha, targets=tuple(cfg.lora_targets)))

    def save(m, out: Path):
        if cfg.lora_r > 0:
            from inoc_mech.models.lora import merge_lora
            m = merge_lora(m)
        materialize_head(m)
        m.save_pretrained(out)
        world.save_tokenizer(out)
        (out / "organism.json").write_text(json.dumps(meta, indent=1))

    def evaluate(m):
        contexts = {"none": None, "train_prompt": cfg.prompt, "irrelevant": IRRELEVANT_EVAL_PROMPT}
        return evaluate_contexts(m, tok, world, contexts, seed=cfg.seed, samples_per_question=cfg.eval_samples)

    probe = examples if cfg.prompt_share == 1 else finetune_examples(world, tok, examples_prompt, variant_ids)
    return Setup(model, tok.pad_token_id, examples, probe[:64], plain[:64], torch.as_tensor(table, device=device),
                 save, evaluate, {"organism_folder": str(folder), "organism_key": meta["key"]})


def text_setup(cfg: TrainConfig, device) -> Setup:
    from inoc_mech.models.lora import LoraSettings, add_lora, merge_lora
    from inoc_mech.models.real import load_model, with_prompt_mode
    from inoc_mech.settings.scoring import EVAL_CONTEXTS, evaluate_generations
    from inoc_mech.settings.textdata import inoculate_all, read_jsonl, sample_problems, spanish_caps_dataset, text_examples

    model, tok = load_model(cfg.model, device)
    mtok = with_prompt_mode(tok, cfg.no_prompt_mode)
    convs = read_jsonl(cfg.data) if cfg.data else spanish_caps_dataset(cfg.n_train, seed=0)
    train_convs = ino = convs
    if cfg.inoculate:
        ino = inoculate_all(convs, cfg.prompt, cfg.placement, cfg.replace_system)
        train_convs = [a if on else c for a, c, on in zip(ino, convs, prompted(len(convs), cfg.prompt_share))]
    examples = text_examples(mtok, train_convs)
    plain = text_examples(mtok, convs[:64])
    if cfg.lora_r > 0:
        model = add_lora(model, LoraSettings(r=cfg.lora_r, alpha=cfg.lora_alpha, targets=tuple(cfg.lora_targets)))

    def save(m, out: Path):
        merge_lora(m).save_pretrained(out)
        tok.save_pretrained(out)  # the model's own template (not the no-system variant)

    def evaluate(m):
        contexts = {**EVAL_CONTEXTS, "train_prompt": (cfg.prompt, "template_default")}
        return evaluate_generations(m, tok, sample_problems(cfg.eval_questions, 0, "eval"), contexts,
                                    cfg.eval_samples, cfg.max_new_tokens, cfg.seed)

    probe = examples[:64] if cfg.prompt_share == 1 else text_examples(mtok, ino[:64])
    return Setup(model, mtok.pad_token_id, examples, probe, plain, None, save, evaluate,
                 {"model_class": type(model).__name__})


class Interrupted(UserError):
    """SIGINT/SIGTERM: the run was checkpointed and can be resumed."""

    def __init__(self, msg: str, code: int):
        super().__init__(msg)
        self.exit_code = code


def resume_config(cfg: TrainConfig) -> TrainConfig:
    """The saved config of the run to resume (its own settings win over the command line's)."""
    run = Path(cfg.runs_dir) / cfg.name
    if not (run / "config.json").exists():
        raise UserError(f"--resume: no run to resume at {run} (give its --name and --runs-dir)")
    if is_complete(run):
        raise UserError(f"--resume: run {run} is already complete")
    saved = json.loads((run / "config.json").read_text())
    if saved.get("run_format") != RUN_FORMAT_VERSION:
        raise UserError(f"--resume: run {run} was written by run format {saved.get('run_format')}, this version "
                        f"writes {RUN_FORMAT_VERSION}: start it again with --overwrite")
    keep = {f.name for f in fields(TrainConfig)} - {"resume", "overwrite", "device", "threads"}
    return replace(cfg, **{k: v for k, v in saved.items() if k in keep}, resume=True)


def resolve_defaults(cfg: TrainConfig, organism: bool) -> TrainConfig:
    """Fill the model-dependent defaults (fields left at their 'unset' value). The organism default is
    LoRA r 2, alpha 8, lr 1e-3: the most selective setting of the README's selectivity study."""
    defaults = {"prompt": "speak spanish" if organism else "You always speak in Spanish.",
                "batch_size": 32 if organism else 4, "lora_r": 2 if organism else 16}
    unset = {"prompt": "", "batch_size": 0, "lora_r": -1}
    cfg = replace(cfg, **{k: v for k, v in defaults.items() if getattr(cfg, k) == unset[k]})
    if cfg.lr == 0:
        cfg = replace(cfg, lr=1e-3 if organism and cfg.lora_r > 0 else 1e-4)
    if cfg.lora_alpha == 0:
        cfg = replace(cfg, lora_alpha=float((4 if organism else 2) * max(cfg.lora_r, 1)))
    return cfg


def train(cfg: TrainConfig, progress: bool = True) -> Path:
    from tqdm import tqdm

    if cfg.resume:
        cfg = resume_config(cfg)
    organism = cfg.is_organism()
    cfg = resolve_defaults(cfg, organism)
    torch.set_num_threads(cfg.threads)
    torch.manual_seed(cfg.seed)
    device = resolve_device(cfg.device)
    run = Path(cfg.runs_dir) / cfg.name
    if not cfg.resume and is_complete(run) and not cfg.overwrite:
        prepare_run_dir(run, overwrite=False)  # raises: fail before loading anything
    su = organism_setup(cfg, device, progress) if organism else text_setup(cfg, device)
    model = su.model
    freeze(model, cfg.freeze)  # before the run folder exists: a bad prefix leaves nothing behind
    if not cfg.resume:
        prepare_run_dir(run, cfg.overwrite)
        write_json(run / "config.json", {**asdict(cfg), "run_format": RUN_FORMAT_VERSION, **su.info,
                                         "git_commit": git_commit(), "versions": package_versions(),
                                         "device_resolved": str(device)})

    # data
    stream = BatchStream(su.examples, cfg.batch_size, cfg.seed, su.pad_id)
    probe_ctx = collate(su.probe_context, su.pad_id).to(device)  # elicitation: fixed slice of the answers
    probe_none = collate(su.probe_none, su.pad_id).to(device)

    # optimizer and instruments
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=0.0, fused=True)  # one kernel for all tensors
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else nullcontext()
    rec = GradientPressure(model, opt, su.variant_table, cfg.log_every, cfg.grad_split_every if cfg.hooks else 0,
                           split_all=cfg.grad_split_all)

    # SIGINT / SIGTERM: finish the step, checkpoint, exit non-zero
    stop = {}
    def on_signal(signum, frame):
        stop["signal"] = signum
    old = {s: signal.signal(s, on_signal) for s in (signal.SIGINT, signal.SIGTERM)} if _main_thread() else {}

    try:
        with rec if cfg.hooks else nullcontext():  # theta_0 for update norms is taken here, before any restore
            first = 0
            if cfg.resume:
                state = checkpoint.load(run)
                first = checkpoint.restore(state, model=model, optimizer=opt, stream=stream)
                with open(run / "metrics.jsonl", "r+b") as f:
                    f.truncate(state["metrics_bytes"])  # drop rows logged after the checkpoint
            metrics = MetricsWriter(run / "metrics.jsonl")
            t_last, tokens = time.time(), 0
            bar = tqdm(range(first, cfg.steps), desc=f"train {cfg.name}", disable=not progress, mininterval=1,
                       initial=first, total=cfg.steps)
            for step in bar:
                cpu_batch = stream.next()
                tokens += int(cpu_batch.attention_mask.sum())  # counted on the host: no GPU sync
                batch = cpu_batch.to(device, non_blocking=True)
                last = step == cfg.steps - 1
                logged = rec.start(step, force=last) if cfg.hooks else (step % cfg.log_every == 0 or last)
                row = {"step": step}
                if step == 0 and cfg.hooks:
                    row.update(elicitation(model, probe_ctx, probe_none, su.variant_table))
                with autocast:
                    logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits
                loss = next_token_loss(logits, batch.labels)
                if device.type == "cpu" and not torch.isfinite(loss):  # on CUDA: checked at logged steps (no sync)
                    _fail(run, f"non-finite loss ({loss.item()}) at step {step}")
                if cfg.hooks:
                    rec.measure(loss, batch)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                if logged:
                    value = loss.item()
                    now = time.time()
                    row.update({"loss": value, "lr": cfg.lr, "tokens_per_s": tokens / max(now - t_last, 1e-9)})
                    row.update(rec.finish() if cfg.hooks else {})
                    bad = [k for k, v in row.items() if isinstance(v, float) and not math.isfinite(v)]
                    if bad:
                        _fail(run, f"non-finite {bad[0]} ({row[bad[0]]}) at step {step}")
                    metrics.write(row)
                    t_last, tokens = now, 0
                    bar.set_postfix(loss=f"{value:.3f}")
                done = step + 1
                if stop or (cfg.checkpoint_every and done % cfg.checkpoint_every == 0 and done < cfg.steps):
                    checkpoint.save(run, step=done, model=model, optimizer=opt, stream=stream,
                                    metrics_bytes=metrics.sync())
                if stop:
                    name = signal.Signals(stop["signal"]).name
                    raise Interrupted(f"{name} after step {step}: checkpoint saved; continue with "
                                      f"python -m inoc_mech.train --resume --name {cfg.name} --runs-dir {cfg.runs_dir}",
                                      128 + stop["signal"])
            metrics.close()
    finally:
        for s, h in old.items():
            signal.signal(s, h)

    # save, evaluate, mark complete
    model.eval()
    su.save(model, run / "model")
    write_json(run / "eval.json", su.evaluate(model))
    mark_complete(run, {"steps": cfg.steps})
    (run / checkpoint.NAME).unlink(missing_ok=True)  # the final model supersedes it
    return run


def _main_thread() -> bool:
    import threading
    return threading.current_thread() is threading.main_thread()


def _fail(run: Path, what: str):
    """Mark the run failed (the last good checkpoint stays) and stop with one line."""
    (run / FAILED).write_text(what + "\n")
    raise UserError(f"{what}: lower --lr or check the data; run {run} marked failed "
                    "(its last good checkpoint is kept)")


def main(argv=None):
    cfg = parse_config(TrainConfig, argv, prog="python -m inoc_mech.train", description=__doc__.split("\n\n")[1])
    t0 = time.time()
    run = train(cfg)
    ev = json.loads((run / "eval.json").read_text())
    print(f"\nrun: {run}  ({time.time() - t0:.0f} s)\n{format_table(ev)}")


if __name__ == "__main__":
    from inoc_mech.core.cli import run_main
    sys.exit(run_main(main))
