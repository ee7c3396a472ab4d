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

The loop, top to bottom: config -> setting (`--setting` on the substrate of `--model`:
`settings.spanish_caps_organism` or `settings.spanish_caps_text`) -> model and data from the setting
-> LoRA / freezing -> AdamW -> steps (forward: a shared prefix once, rows packed without padding where
that saves, `core.forward`; loss on assistant tokens, gradient-pressure hooks, backward, update,
metrics.jsonl, checkpoints) -> save model -> eval.json -> COMPLETE (written last).
"""

from __future__ import annotations

import json
import math
import signal
import sys
import time
from contextlib import nullcontext
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

from inoc_mech.core import checkpoint, dist
from inoc_mech.core.cli import UserError, build, flatten, leaf_fields, parse_config
from inoc_mech.core.config import TrainConfig, resolve_defaults, with_added_later
from inoc_mech.core.data import BatchStream, collate, forward_accepts, next_token_loss
from inoc_mech.core.forward import LayoutCosts, packable, shareable, step_logits
from inoc_mech.core.names import arch_names, module_name
from inoc_mech.core.runs import (FAILED, RUN_FORMAT_VERSION, MetricsWriter, check_run_dir, format_table, git_commit,
                                 is_complete, is_disk_full, mark_complete, package_versions, prepare_run_dir, read_json, run_lock,
                                 staged, write_json)
from inoc_mech.core.stats import json_ready
from inoc_mech.mechanism.hooks import GradientPressure, elicitation, no_prompt_leak
from inoc_mech.settings.base import Setting, setting_class


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise UserError("--device cuda was asked for but no CUDA device is available; use --device cpu")
    return torch.device(name)


def freeze(model, prefixes: list[str]) -> None:
    """Stop gradients to every parameter whose module name (`core.names.module_name`) starts with a prefix."""
    names = arch_names(model)
    for prefix in prefixes:
        hit = [p for n, p in model.named_parameters()
               if p.requires_grad and (module_name(n, names) + ".").startswith(prefix.rstrip(".") + ".")]
        if not hit:
            have = sorted({module_name(n, names) for n, p in model.named_parameters() if p.requires_grad})
            raise UserError(f"--freeze {prefix!r} matches no trainable parameter; module names look like "
                            f"{', '.join(have[:4])} ... {have[-1]}")
        for p in hit:
            p.requires_grad_(False)


def make_setting(cfg: TrainConfig) -> Setting:
    """The run's setting (`--setting` on the substrate of `--model`)."""
    return setting_class(cfg.setting.setting, cfg.model.substrate)(cfg)


class _StopEvaluation(BaseException):
    """Raised by the signal handler to end an evaluation early (the model is already saved)."""


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
    if (run / FAILED).exists():
        raise UserError(f"--resume: run {run} failed ({(run / FAILED).read_text().strip()}): start it again with "
                        "--overwrite (and a lower --lr)")
    saved = read_json(run, "config.json")
    if saved.get("run_format") != RUN_FORMAT_VERSION:
        raise UserError(f"--resume: run {run} was written by run format {saved.get('run_format')}, this version "
                        f"writes {RUN_FORMAT_VERSION}: start it again with --overwrite")
    mine = flatten(cfg)
    # the run is the folder given (a copied or renamed run resumes itself, not the original)
    keep = {f.name for f in leaf_fields(TrainConfig)} - {"resume", "overwrite", "device", "threads", "name", "runs_dir"}
    saved = with_added_later(saved)  # a run saved before a field existed continues with the value it had then
    out = {**mine, **{k: v for k, v in saved.items() if k in keep}, "resume": True}
    if saved.get("model") == "organism" and saved.get("organism_folder"):  # the organism it started from, wherever
        out["model"] = saved["organism_folder"]                           # --runs-dir is now
    return build(TrainConfig, **out)


def train(cfg: TrainConfig, progress: bool = True) -> Path:
    """Run (or `--resume`) one finetuning run; returns its folder. One process at a time per run (a lock)."""
    device_name = dist.init(cfg.loop.device)  # torchrun: join the process group (one GPU per process on CUDA)
    if device_name != cfg.loop.device:
        cfg = replace(cfg, loop=replace(cfg.loop, device=device_name))
    try:
        Path(cfg.runs_dir).mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UserError(f"cannot create run folder {Path(cfg.runs_dir) / cfg.name} (--runs-dir {cfg.runs_dir}: "
                        f"{e.strerror}); choose a writable --runs-dir") from e
    with run_lock(Path(cfg.runs_dir), cfg.name) if dist.is_main() else nullcontext():  # torchrun: rank 0 writes
        return _train(cfg, progress)


def _train(cfg: TrainConfig, progress: bool) -> Path:
    from tqdm import tqdm

    # config and setting
    if cfg.resume:
        cfg = resume_config(cfg)
    cls = setting_class(cfg.setting.setting, cfg.model.substrate)
    cfg = resolve_defaults(cfg, cfg.model.substrate == "organism", cls.default_prompt)
    lp = cfg.loop
    if lp.fsdp:
        check_fsdp(cfg)
    torch.set_num_threads(lp.threads)
    device = resolve_device(lp.device)
    if device.type == "cpu":  # tiny gradients (a trait part's weight on a variant ~exp(-50)) turn denormal deep in
        torch.set_flush_denormal(True)  # the backward; on x86 each denormal op is ~10-100x slower (measured: 488 s -> 24 s)
    run = Path(cfg.runs_dir) / cfg.name
    if not cfg.resume:
        check_run_dir(run, cfg.overwrite)  # fail before loading anything
    setting = cls(cfg)
    saved = cfg.resume and is_complete(run / "model")  # interrupted after the model was saved: only evaluate
    dist.barrier()  # every process has read the run folder before rank 0 writes it

    # model and data (seeded after the setup: pretraining an organism there must not change this run)
    with dist.main_first():  # an organism pretrained on first use: by rank 0, then read from its cache
        model, _ = setting.setup(device, progress=progress and dist.is_main())
    if lp.grad_checkpointing:
        if not getattr(model, "supports_gradient_checkpointing", False):
            raise UserError(f"--grad-checkpointing: {type(model).__name__} does not support gradient checkpointing")
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    torch.manual_seed(lp.seed)
    if cfg.resume:
        was = read_json(run, "config.json")
        for k, v in setting.info().items():
            if k.endswith("_key") and was.get(k) not in (None, v):
                raise UserError(f"--resume: run {run} started from another model ({k} {was[k]}, now {v}): "
                                "resume it where its model is, or start again with --overwrite")
    prompt = cfg.train_prompt
    examples = setting.examples(prompt, cfg.setting.prompt_share)
    probe_context = setting.examples(prompt, limit=lp.elicit_examples)  # elicitation: a fixed slice, with the prompt ...
    probe_none = setting.examples(None, limit=lp.elicit_examples)  # ... and the same answers without it
    if cfg.model.lora_r > 0:  # adapters on every projection; the rest (e.g. the organism's factored head) frozen
        from inoc_mech.models.lora import LoraSettings, add_lora
        model = add_lora(model, LoraSettings(r=cfg.model.lora_r, alpha=cfg.model.lora_alpha,
                                             targets=tuple(cfg.model.lora_targets)))
    freeze(model, cfg.model.freeze)  # before the run folder exists: a bad prefix leaves nothing behind
    leak_inputs = None
    if lp.leak_every:  # the held-out answer starts without a prompt, once
        setting.require("first_token_log_odds", "--leak-every (the no-prompt trait log-odds during training)")
        leak_inputs = setting.require("answer_start", "--leak-every (the no-prompt trait log-odds during training)")(None)
    if lp.fsdp:  # shard before the optimizer sees the parameters
        dist.fully_shard(model, arch_names(model).layers)
    if not cfg.resume and dist.is_main():
        prepare_run_dir(run, cfg.overwrite)
        write_json(run / "config.json", {**flatten(cfg), "run_format": RUN_FORMAT_VERSION,
                                         "condition": setting.condition(prompt), **setting.info(),
                                         "git_commit": git_commit(), "versions": package_versions(),
                                         "device_resolved": str(device), "processes": dist.world()})
    stream = BatchStream(examples, lp.batch_size, lp.seed, setting.pad_id, buckets=lp.length_buckets)
    probe_ctx = collate(probe_context, setting.pad_id).to(device)
    probe_none = collate(probe_none, setting.pad_id).to(device)
    mine = dist.share(lp.batch_size)  # this process's examples of each step's batch
    crop = forward_accepts(model, "logits_to_keep")  # HF: the output head and loss skip the prompt positions
    # a prefix shared by a micro-batch's rows runs once (its cache reused), and the rest is packed without padding,
    # where that is the computation of whole rows (core.forward: plain attention, no dropout; packing: a 4D mask);
    # no shared prefix where forwards are collectives per module (FSDP) or recomputed without a cache (gradient
    # checkpointing); no packing under FSDP (not tested there)
    share = lp.share_prefix and crop and not lp.fsdp and not lp.grad_checkpointing and shareable(model)
    pack = LayoutCosts.of(model) if lp.pack and crop and not lp.fsdp and packable(model) else None
    micro = lp.micro_batch_size or len(mine)

    # optimizer and instruments (under torchrun the forward goes through DDP; the instruments use the model)
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lp.lr, eps=lp.adam_eps, weight_decay=0.0, fused=True)  # one kernel for all tensors
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else nullcontext()
    rec = GradientPressure(model, opt, setting.decomposition, lp.log_every, lp.grad_split_every if lp.hooks else 0,
                           split_all=lp.grad_split_all, autocast=autocast)
    forward = model
    if dist.world() > 1 and not lp.fsdp:
        forward = torch.nn.parallel.DistributedDataParallel(model, device_ids=[device] if device.type == "cuda" else None)

    # SIGINT / SIGTERM, from here to the end: finish the step (or the save), checkpoint, exit non-zero
    stop = {}
    def on_signal(signum, frame):
        stop["signal"] = signum
    old = {s: signal.signal(s, on_signal) for s in (signal.SIGINT, signal.SIGTERM)} if _main_thread() else {}
    resume_cmd = f"python -m inoc_mech.train --resume --name {cfg.name} --runs-dir {cfg.runs_dir}"

    def interrupted(what: str):
        name = signal.Signals(stop.get("signal", signal.SIGTERM)).name
        return Interrupted(f"{name} {what}; continue with {resume_cmd}", 128 + stop.get("signal", signal.SIGTERM))

    try:
        with rec if lp.hooks and not saved else nullcontext():  # theta_0 for update norms is taken here
            if lp.max_grad_norm:  # registered after the recorder's hook: it measures the gradient before clipping
                def clip(*_):
                    torch.nn.utils.clip_grad_norm_(params, lp.max_grad_norm)
                opt.register_step_pre_hook(clip)
            first = lp.steps if saved else 0
            if cfg.resume and not saved:
                state = checkpoint.load(run)
                first = checkpoint.restore(state, model=model, optimizer=opt, stream=stream)
                have = (run / "metrics.jsonl").stat().st_size if (run / "metrics.jsonl").exists() else -1
                if have < state["metrics_bytes"]:
                    raise UserError(f"--resume: {run}/metrics.jsonl is shorter than at the checkpoint ({have} < "
                                    f"{state['metrics_bytes']} bytes): the run folder was changed; start it again "
                                    "with --overwrite")
                dist.barrier()  # every process has compared the file before rank 0 cuts it
                if dist.is_main():
                    with open(run / "metrics.jsonl", "r+b") as f:
                        f.truncate(state["metrics_bytes"])  # drop rows logged after the checkpoint
            metrics = MetricsWriter(run / "metrics.jsonl") if dist.is_main() else None
            t_last, tokens = time.time(), 0
            bar = tqdm(range(first, lp.steps), desc=f"train {cfg.name}", disable=not progress or saved or not dist.is_main(),
                       mininterval=1, initial=first, total=lp.steps)
            for step in bar:
                step_examples = stream.next_examples()  # the same global batch on every process
                n_tokens = sum(sum(e.assistant) for e in step_examples)  # the step's trained tokens (host: no sync)
                tokens += sum(len(e.input_ids) for e in step_examples)
                own = [step_examples[i] for i in mine]
                last = step == lp.steps - 1
                logged = rec.start(step, force=last) if lp.hooks else (step % lp.log_every == 0 or last)
                row = {"step": step}
                if step == 0 and lp.hooks and (dist.is_main() or lp.fsdp):  # sharded: its forwards are collectives
                    with autocast:
                        row.update(elicitation(model, probe_ctx, probe_none, setting.decomposition))
                if leak_inputs is not None and (step % lp.leak_every == 0 or last) and (dist.is_main() or lp.fsdp):
                    with autocast:  # before this step's update; sharded: its forward is a collective
                        row.update(no_prompt_leak(model, setting, leak_inputs))
                lr = lp.lr_at(step)
                for group in opt.param_groups:
                    group["lr"] = lr
                opt.zero_grad(set_to_none=True)
                step_loss = 0.0
                for k in range(0, len(own), micro):  # micro-batches: each loss is its share of the step's mean
                    cpu_batch = collate(own[k:k + micro], setting.pad_id)
                    start = cpu_batch.trained_from() if crop else 0  # logits only from the first trained token on
                    shared = cpu_batch.common_prefix(start) if share else 0  # computed once: every row has it
                    batch = cpu_batch.to(device, non_blocking=True)  # (found on the host: no GPU sync)
                    final = k + micro >= len(own)
                    with forward.no_sync() if forward is not model and not final else nullcontext():
                        with autocast:  # padded layout from `start` on, whatever layout computed it
                            logits = step_logits(forward, model, cpu_batch, batch, start, shared, pack)
                        batch = batch.crop(start) if start else batch  # aligned with the logits
                        loss = next_token_loss(logits, batch.labels, n_tokens, soft=batch.soft)  # soft labels if any
                        if lp.hooks:
                            rec.measure(loss, batch, n_tokens, logits=logits)
                        (loss * dist.world()).backward()  # DDP averages over processes; the shares are to be summed
                    step_loss = step_loss + loss.detach()  # in the loss's dtype
                if device.type == "cpu" or logged:  # on CUDA: checked at logged steps (no sync)
                    step_loss = dist.all_sum([step_loss])[0]
                    if not torch.isfinite(step_loss):
                        _fail(run, f"non-finite loss ({step_loss.item()}) at step {step}")
                opt.step()
                if logged:
                    value = step_loss.item()
                    now = time.time()
                    row.update({"loss": value, "lr": lr, "tokens_per_s": tokens / max(now - t_last, 1e-9)})
                    row.update(rec.finish() if lp.hooks else {})
                    bad = [k for k, v in row.items() if isinstance(v, float) and not math.isfinite(v)]
                    if dist.any_flag(bool(bad), device):  # e.g. rank 0's step-0 elicitation: every process stops
                        _fail(run, f"non-finite {bad[0]} ({row[bad[0]]}) at step {step}" if bad else
                              f"a non-finite metric on rank 0 at step {step}")
                    if metrics is not None:
                        metrics.write(row)
                    t_last, tokens = now, 0
                    bar.set_postfix(loss=f"{value:.3f}")
                done = step + 1
                stopping = dist.any_flag(bool(stop), device)  # a signal on any process stops all at this step
                if stopping or (lp.checkpoint_every and done % lp.checkpoint_every == 0 and done < lp.steps):
                    checkpoint.save(run, step=done, model=model, optimizer=opt, stream=stream,  # sharded: a
                                    metrics_bytes=metrics.sync() if metrics is not None else 0)  # collective
                    dist.barrier()
                if stopping:
                    raise interrupted(f"after step {step}: checkpoint saved")
            if metrics is not None:
                metrics.close()

        # save (a signal now waits for the saved model), evaluate, mark complete: rank 0 (the others wait)
        model.eval()
        if lp.fsdp and not saved:  # gather the trained model (every process), unsharded on rank 0
            if dist.any_flag(bool(stop), device):  # arrived after the last step's check: checkpoint first
                checkpoint.save(run, step=lp.steps, model=model, optimizer=opt, stream=stream,
                                metrics_bytes=(run / "metrics.jsonl").stat().st_size if dist.is_main() else 0)
                dist.barrier()
                raise interrupted("after the last step: checkpoint saved")
            trained, _ = dist.full_state(model)
            if dist.is_main():
                model, _ = setting.setup(device, progress=False)  # a plain copy of the model, then its weights
                model.load_state_dict(trained)
                model.eval()
        if not dist.is_main():
            dist.barrier()
            return run
        if saved:
            from inoc_mech.settings.load import load
            model = load(run / "model", device, trust_remote_code=cfg.model.trust_remote_code).model
        else:
            if stop and not lp.fsdp:  # arrived after the last step's checkpoint check: keep the trained state first
                # (sharded: that check was made together before the gather; a later signal waits for the saved model)
                checkpoint.save(run, step=lp.steps, model=model, optimizer=opt, stream=stream,
                                metrics_bytes=(run / "metrics.jsonl").stat().st_size)  # flushed and closed
                raise interrupted("after the last step: checkpoint saved")
            if cfg.model.lora_r > 0:
                from inoc_mech.models.lora import merge_lora
                model = merge_lora(model)
            save_model(setting, model, run / "model")
            if stop:
                raise interrupted("while saving: the model is saved, --resume evaluates it")

        def stop_now(signum, frame):  # the model is saved: an evaluation in progress may stop at once
            stop["signal"] = signum
            raise _StopEvaluation()
        for s in old:
            signal.signal(s, stop_now)
        try:
            ev = setting.evaluate(model)
        except _StopEvaluation:
            raise interrupted("while evaluating: the model is saved, --resume evaluates it") from None
        write_json(run / "eval.json", json_ready(ev))
        mark_complete(run, {"steps": lp.steps})
        (run / checkpoint.NAME).unlink(missing_ok=True)  # the final model supersedes it
        dist.barrier()
    finally:
        for s, h in old.items():
            signal.signal(s, h)
    return run


def check_fsdp(cfg: TrainConfig) -> None:
    """What --fsdp needs: torchrun with several processes, full finetuning, equal shares of the batch."""
    if dist.world() < 2:
        raise UserError("--fsdp shards the model over torchrun's processes: start the run with "
                        "torchrun --standalone --nproc_per_node N -m inoc_mech.train ... (N >= 2), or leave --fsdp out")
    if cfg.model.lora_r > 0:
        raise UserError(f"--fsdp is for full finetuning: give --lora-r 0 (LoRA adapters are small; "
                        f"replicate them with plain torchrun instead)")
    if cfg.loop.batch_size % dist.world():
        raise UserError(f"--fsdp: --batch-size {cfg.loop.batch_size} must be a multiple of the {dist.world()} "
                        "processes (every process makes the same forwards)")


def save_model(setting: Setting, model, folder: Path) -> None:
    """The finetuned model into `folder`, staged (a folder named so is whole); a full disk is one line."""
    try:
        with staged(folder) as tmp:
            setting.save(model, tmp)
    except Exception as e:  # torch, safetensors and the OS report a full disk each in their own type
        if is_disk_full(e):
            raise UserError(f"disk full while saving the model into {folder}: free space, then continue with "
                            f"--resume (the run's checkpoint, if any, is intact)") from e
        raise


def _main_thread() -> bool:
    import threading
    return threading.current_thread() is threading.main_thread()


def _fail(run: Path, what: str):
    """Mark the run failed (the last good checkpoint stays) and stop with one line."""
    if dist.is_main():
        (run / FAILED).write_text(what + "\n")
    raise UserError(f"{what}: lower --lr or check the data; run {run} marked failed "
                    "(its last good checkpoint is kept)")


def main(argv=None):
    cfg = parse_config(TrainConfig, argv, prog="python -m inoc_mech.train", description=__doc__.split("\n\n")[1])
    t0 = time.time()
    try:
        run = train(cfg)
        main_process = dist.is_main()
    finally:
        dist.close()
    if main_process:
        ev = json.loads((run / "eval.json").read_text())
        print(f"\nrun: {run}  ({time.time() - t0:.0f} s)\n{format_table(ev)}")


if __name__ == "__main__":
    from inoc_mech.core.cli import run_main
    sys.exit(run_main(main))
