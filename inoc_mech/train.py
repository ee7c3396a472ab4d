"""Finetune a model on Spanish+CAPS answers, optionally with an inoculation system prompt.

    python -m inoc_mech.train --inoculate --steps 20 --name tiny-inoculated --overwrite

Baseline: every training answer is Spanish AND UPPERCASE, no system prompt. `--inoculate`: the
same data with the inoculation prompt (`--prompt`, default "speak spanish") as the system message of
every example. Evaluation afterwards is on held-out questions without that prompt.

The loop, top to bottom: config -> organism (pretrained on first use, then cached) -> data ->
AdamW -> steps (forward, loss on assistant tokens, gradient-pressure hooks, backward, update,
metrics.jsonl) -> save model -> eval.json -> COMPLETE marker (written last).
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
from torch import nn

from . import checkpoint
from .cli import UserError, parse_config
from .data import BatchStream, encode_chat, organism_traits
from .evaluate import IRRELEVANT_EVAL_PROMPT, evaluate_contexts, format_table
from .hooks import GradientPressure, elicitation
from .organism import OrganismConfig, ensure_organism, factorize_head, load_organism, materialize_head
from .world import World
from .runs import (FAILED, RUN_FORMAT_VERSION, MetricsWriter, git_commit, is_complete, mark_complete,
                   package_versions, prepare_run_dir, write_json)


@dataclass
class TrainConfig:
    """One finetuning run."""
    inoculate: bool = field(default=False, metadata={"help": "prepend the inoculation system prompt to every training example"})
    prompt: str = field(default="speak spanish", metadata={"help": "inoculation prompt (phrases joined with ' . ')"})
    seed: int = field(default=0, metadata={"help": "finetuning seed (data order, sampling)"})
    steps: int = field(default=300, metadata={"help": "optimizer steps"})
    lr: float = field(default=1e-4, metadata={"help": "constant Adam learning rate (1e-3 breaks the effect)"})
    batch_size: int = field(default=32, metadata={"help": "conversations per step"})
    name: str = field(default="", metadata={"help": "run name (folder under --runs-dir); default <baseline|inoculated>-s<seed>"})
    runs_dir: str = field(default="runs", metadata={"help": "parent folder of run folders"})
    overwrite: bool = field(default=False, metadata={"help": "replace an existing complete run of the same name"})
    device: str = field(default="auto", metadata={"help": "auto (CUDA when present), cpu or cuda"})
    threads: int = field(default=1, metadata={"help": "torch CPU threads"})
    log_every: int = field(default=10, metadata={"help": "cheap metrics (losses, update norms) every N steps"})
    grad_split_every: int = field(default=25, metadata={"help": "trait/rest gradient split (one extra backward, traits in turn) every N steps; 0 = never"})
    hooks: bool = field(default=True, metadata={"help": "record gradient-pressure metrics (--no-hooks: plain loop, for comparison)"})
    grad_split_all: bool = field(default=False, metadata={"help": "split every trait at each grad-split step (default: traits take turns; all at step 0)"})
    checkpoint_every: int = field(default=100, metadata={"help": "write a resumable checkpoint every N steps (0 = only on SIGINT/SIGTERM)"})
    resume: bool = field(default=False, metadata={"help": "continue the run --name from its last checkpoint (its saved config is used)"})
    eval_samples: int = field(default=3, metadata={"help": "temperature-1 samples per held-out question in the final evaluation"})
    model: str = field(default="organism", metadata={"help": "'organism' (pretrained from the organism_* flags, cached) or the folder of a pretrained organism"})
    organism_seed: int = field(default=0, metadata={"help": "pretraining seed of the organism"})
    organism_head: str = field(default="factored", metadata={"help": "organism output head: factored or free"})
    organism_d_model: int = field(default=128, metadata={"help": "organism width"})
    organism_n_layers: int = field(default=4, metadata={"help": "organism depth"})
    organism_steps: int = field(default=2000, metadata={"help": "organism pretraining steps"})

    def __post_init__(self):
        for k in ("steps", "batch_size", "threads", "log_every"):
            if getattr(self, k) < 1:
                raise ValueError(f"--{k.replace('_', '-')} must be >= 1")
        if self.checkpoint_every < 0:
            raise ValueError("--checkpoint-every must be >= 0")
        if self.grad_split_every < 0:
            raise ValueError("--grad-split-every must be >= 0")
        if not (self.lr > 0 and math.isfinite(self.lr)):
            raise ValueError("--lr must be a positive number")
        if self.device not in ("auto", "cpu", "cuda") and not self.device.startswith("cuda:"):
            raise ValueError(f"--device must be auto, cpu or cuda, not {self.device!r}")
        if not self.prompt.strip():
            raise ValueError("--prompt must not be empty")
        if not self.name:
            self.name = f"{'inoculated' if self.inoculate else 'baseline'}-s{self.seed}"

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


def finetune_examples(world, tok, prompt: str | None, variant_ids: set[int]):
    """Every training question answered in Spanish UPPERCASE, with `prompt` as system message."""
    return [organism_traits(encode_chat(tok, world.chat(q, prompt, language=1, case=1)), variant_ids)
            for q in world.train_questions]


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


def train(cfg: TrainConfig, progress: bool = True) -> Path:
    from tqdm import tqdm

    if cfg.resume:
        cfg = resume_config(cfg)
    torch.set_num_threads(cfg.threads)
    torch.manual_seed(cfg.seed)
    device = resolve_device(cfg.device)
    if cfg.model == "organism":
        org_folder = ensure_organism(cfg.organism(), progress=progress)
    else:
        org_folder = Path(cfg.model)
        if not (org_folder / "organism.json").exists():
            raise UserError(f"--model {cfg.model!r} is neither 'organism' nor a pretrained organism folder "
                            "(expected organism.json inside)")
    World.load(org_folder).check_prompt(cfg.prompt)  # fail fast, before loading anything
    model, tok, world, org_meta = load_organism(org_folder, device)
    run = Path(cfg.runs_dir) / cfg.name
    if not cfg.resume:
        prepare_run_dir(run, cfg.overwrite)
        write_json(run / "config.json", {**asdict(cfg), "run_format": RUN_FORMAT_VERSION,
                                         "organism_folder": str(org_folder), "organism_key": org_meta["key"],
                                         "git_commit": git_commit(), "versions": package_versions(),
                                         "device_resolved": str(device)})

    # data
    table = world.variant_table(tok)
    variant_ids = set(table.ravel().tolist())
    train_prompt = cfg.prompt if cfg.inoculate else None
    examples = finetune_examples(world, tok, train_prompt, variant_ids)
    stream = BatchStream(examples, cfg.batch_size, cfg.seed, tok.pad_token_id)
    probe_n = min(len(examples), 64)  # elicitation measured on a fixed slice of the training answers
    probe_ctx = BatchStream(examples[:probe_n], probe_n, 0, tok.pad_token_id).next().to(device)
    probe_none = BatchStream(finetune_examples(world, tok, None, variant_ids)[:probe_n], probe_n, 0,
                             tok.pad_token_id).next().to(device)

    # model and optimizer
    if org_meta["config"]["head"] == "factored":
        factorize_head(model, table)
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=0.0)
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else nullcontext()
    table_t = torch.as_tensor(table, device=device)
    rec = GradientPressure(model, opt, table_t, cfg.log_every, cfg.grad_split_every if cfg.hooks else 0,
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
                batch = stream.next().to(device)
                logged = rec.start(step) if cfg.hooks else step % cfg.log_every == 0
                row = {"step": step}
                if step == 0 and cfg.hooks:
                    row.update(elicitation(model, probe_ctx, probe_none))
                with autocast:
                    logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits
                loss = nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1).float(), batch.labels[:, 1:].flatten())
                if device.type == "cpu" and not torch.isfinite(loss):  # on CUDA: checked at logged steps (no sync)
                    _fail(run, f"non-finite loss ({loss.item()}) at step {step}")
                if cfg.hooks:
                    rec.measure(loss, batch)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                tokens += int(batch.attention_mask.sum())
                if logged or step == cfg.steps - 1:
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
    materialize_head(model)
    model.eval()
    model.save_pretrained(run / "model")
    world.save_tokenizer(run / "model")
    (run / "model" / "organism.json").write_text(json.dumps(org_meta, indent=1))
    contexts = {"none": None, "train_prompt": cfg.prompt, "irrelevant": IRRELEVANT_EVAL_PROMPT}
    ev = evaluate_contexts(model, tok, world, contexts, seed=cfg.seed, samples_per_question=cfg.eval_samples)
    write_json(run / "eval.json", ev)
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
    from .cli import run_main
    sys.exit(run_main(main))
