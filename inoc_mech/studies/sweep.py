"""Prompt x seed sweep: one ordinary run folder per condition and seed, for the gradient-pressure analysis.

    python -m inoc_mech.studies.sweep --name sweep-tiny --steps 20 --seeds 0 --prompts spanish "be kind"

Conditions: `baseline` (no prompt); `inoculated` ("speak spanish"); `converse` ("use capitals");
`both` ("speak spanish . use capitals"); `irrelevant` ("you like cats"); plus one condition per
prompt of `--prompts`, a set spanning strong to no elicitation of Spanish (paraphrases, partial
phrases, the opposite instruction, irrelevant and held-out phrases). Each run is
`python -m inoc_mech.train` in its own process, written to `<runs-dir>/<name>/<condition>-s<seed>/`;
its output goes to `<runs-dir>/<name>/logs/`. Complete runs are skipped; an interrupted run resumes
from its checkpoint (from scratch if it has none or resuming fails). Ctrl-C or SIGTERM stops the
sweep and its running runs (they checkpoint); the same command continues it.
`sweep.json` in the sweep folder lists conditions, prompts, seeds and this config.

Real models: `--model smollm2` (or an HF model folder / .gguf) runs the setting's real-text conditions
(baseline, inoculated "You always speak in Spanish.", converse, irrelevant) plus an English prompt
set of the same span (`TEXT_PROMPTS`), with LoRA r 16, batch 4 and 80 steps unless told otherwise:

    python -m inoc_mech.studies.sweep --model smollm2 --name smollm2 --seeds 0 1 --eval-questions 16 --eval-samples 2

Runs use full finetuning (lr 1e-4), the setting of the README's gradient-pressure results, unless
given `--lora-r` (the organism's `inoc_mech.train` default is LoRA r 2: `--lora-r 2 --lora-alpha 8
--lr 1e-3`). Default size: 15 conditions x 2 seeds = 30 runs of 300 steps. One run takes ~25 s of one core
(organism cached), so the sweep takes ~7 min with 2 jobs on 2 free cores (about twice that on a
busy machine). More seeds narrow the intervals: `--seeds 0 1 2 3`.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

from inoc_mech.core import checkpoint
from inoc_mech.core.cli import UserError, parse_config, to_args
from inoc_mech.core.config import with_added_later
from inoc_mech.core.runs import FAILED, is_complete, read_json, write_json
from inoc_mech.settings.base import setting_class, slug
from inoc_mech.settings.spanish_caps_organism import CONDITIONS
from inoc_mech.settings.textdata import CAPS_PROMPT, SPANISH_PROMPT

# name -> system prompt (None: no system message): the organism setting's named conditions, always run
# (a real model runs its setting's own named conditions, `Setting.conditions`)
CORE_CONDITIONS = CONDITIONS
# Roughly from strong to no elicitation of Spanish; every word is in the organism's vocabulary.
DEFAULT_PROMPTS = [
    "you always speak in spanish", "reply in spanish",  # paraphrases of the inoculation prompt
    "in spanish", "spanish", "speak",  # partial phrases
    "speak english",  # the opposite instruction
    "be kind", "you are a tutor",  # irrelevant phrases seen in pretraining
    "you like dogs", "the sea is green",  # held-out phrases never seen in pretraining
]
# Real models (`--model smollm2` or a folder): the same span in English, plus both traits at once.
TEXT_PROMPTS = [
    "Reply in Spanish.",  # a paraphrase
    "Spanish.", "You are bilingual.",  # weaker hints
    f"{CAPS_PROMPT} {SPANISH_PROMPT}",  # both traits
    "Never speak in Spanish.", "You always speak in English.",  # negated / opposite
    "You are a helpful assistant.",  # irrelevant (besides the core "You like dogs.")
]
# Sweep settings that depend on the model (0 / -1 in SweepConfig: the organism's value, else the real model's)
BY_SUBSTRATE = {"steps": (300, 80), "batch_size": (32, 4), "lora_r": (0, 16)}


@dataclass
class SweepConfig:
    """A prompt x seed sweep of finetuning runs."""
    name: str = field(default="sweep", metadata={"help": "sweep folder under --runs-dir"})
    runs_dir: str = field(default="runs", metadata={"help": "parent folder of the sweep folder and of the organism cache"})
    seeds: list = field(default_factory=lambda: [0, 1], metadata={"help": "finetuning seeds (each condition is run once per seed)"})
    prompts: list = field(default_factory=lambda: ["default"], metadata={"help": "prompt-set conditions added to the setting's core ones (default: a span of Spanish elicitation for the organism or, on a real model, in English; give none to run only the core ones)"})
    setting: str = field(default="spanish_caps", metadata={"help": "setting of every run (registered in inoc_mech.settings)"})
    jobs: int = field(default=0, metadata={"help": "runs at once; 0 = max(1, cores // threads), at most 2"})
    threads: int = field(default=1, metadata={"help": "torch CPU threads per run"})
    steps: int = field(default=0, metadata={"help": "optimizer steps per run (0: 300 for the organism, 80 for a real model: SmolLM2's baseline then answers 100% Spanish and CAPS)"})
    lr: float = field(default=1e-4, metadata={"help": "Adam learning rate"})
    prompt_share: float = field(default=1.0, metadata={"help": "share of training examples that carry the condition's prompt"})
    prompt_subset: int = field(default=0, metadata={"help": "--prompt-share below 1: the seed that draws which examples carry the prompt"})
    lora_r: int = field(default=-1, metadata={"help": "LoRA rank of the finetuning runs (0: full finetuning; -1: full for the organism, 16 for a real model)"})
    lora_alpha: float = field(default=32.0, metadata={"help": "LoRA alpha (update scaled by alpha / r; passed only with --lora-r)"})
    freeze: list = field(default_factory=list, metadata={"help": "parameters the runs keep fixed, by module prefix (e.g. embed unembed)"})
    batch_size: int = field(default=0, metadata={"help": "conversations per step (0: 32 for the organism, 4 for a real model)"})
    log_every: int = field(default=10, metadata={"help": "cheap metrics every N steps"})
    grad_split_every: int = field(default=20, metadata={"help": "trait/rest gradient split every N steps, a multiple of --log-every (traits in turn: each one every 2N)"})
    grad_split_all: bool = field(default=False, metadata={"help": "split every trait at each grad-split step (default: traits take turns; all at step 0)"})
    eval_samples: int = field(default=3, metadata={"help": "temperature-1 samples per held-out question"})
    eval_reelicit: bool = field(default=False, metadata={"help": "each run also evaluates the setting's re-elicitation contexts (train's --eval-reelicit; analyses/reelicit.py reads them; complete runs are kept, and it evaluates what they lack)"})
    elicit_examples: int = field(default=64, metadata={"help": "step-0 elicitation: training replies scored with and without the prompt"})
    eval_questions: int = field(default=32, metadata={"help": "real models: held-out questions in each run's evaluation"})
    max_new_tokens: int = field(default=48, metadata={"help": "real models: generation length in the evaluation"})
    model: str = field(default="organism", metadata={"help": "'organism' (the cached default organism, pretrained on first use), an organism folder, 'smollm2', an HF model folder or a .gguf file"})
    data: str = field(default="", metadata={"help": "training data of every run (train's --data: a real model's JSONL, the subliminal setting's teacher lists)"})
    organism_seed: int = field(default=0, metadata={"help": "pretraining seed of the organism"})
    organism_head: str = field(default="factored", metadata={"help": "organism output head: factored or free"})
    organism_d_model: int = field(default=128, metadata={"help": "organism width"})
    organism_n_layers: int = field(default=4, metadata={"help": "organism depth"})
    organism_recipe: str = field(default="standard", metadata={"help": "organism pretraining recipe: standard or fast (train's --organism-recipe)"})
    organism_steps: int = field(default=0, metadata={"help": "organism pretraining steps (0: the recipe's)"})
    conditions: list = field(default_factory=list, metadata={"help": "the setting's core conditions to run (none given: all of them), e.g. baseline for a control sweep"})
    prompted: bool = field(default=False, metadata={"help": "also evaluate the starting model under every condition's prompt (pretrained/prompted.json, for analyses/dose_response.py)"})
    dry_run: bool = field(default=False, metadata={"help": "print the plan (runs to do and to skip) and exit"})

    def __post_init__(self):
        try:
            self.seeds = [int(s) for s in self.seeds]
        except ValueError:
            raise ValueError(f"--seeds takes integers, got {self.seeds}") from None
        if not self.seeds:
            raise ValueError("--seeds needs at least one seed")
        if len(set(self.seeds)) != len(self.seeds):
            raise ValueError(f"--seeds has duplicates: {self.seeds}")
        self.prompts = [" ".join(str(p).split()) for p in self.prompts]
        if not 0.0 <= self.prompt_share <= 1.0:
            raise ValueError("--prompt-share must be in [0, 1]")
        if self.prompt_subset < 0:
            raise ValueError("--prompt-subset must be >= 0")
        if any(not p for p in self.prompts):
            raise ValueError("--prompts contains an empty prompt")
        if not re.fullmatch(r"[A-Za-z0-9_.-]+", self.name):
            raise ValueError(f"--name {self.name!r}: use letters, digits, '.', '_' and '-' only")
        for k in ("jobs",):
            if getattr(self, k) < 0:
                raise ValueError(f"--{k} must be >= 0")
        for k in ("threads", "log_every", "eval_samples", "eval_questions", "max_new_tokens", "elicit_examples"):
            if getattr(self, k) < 1:
                raise ValueError(f"--{k.replace('_', '-')} must be >= 1")
        if self.grad_split_every < 0 or self.grad_split_every % self.log_every:
            raise ValueError(f"--grad-split-every {self.grad_split_every} must be a multiple of --log-every "
                             f"{self.log_every}: the split is only recorded on logged steps")
        if self.jobs == 0:
            self.jobs = default_jobs(self.threads)
        text = self.substrate == "text"
        if self.prompts == ["default"]:
            self.prompts = list(TEXT_PROMPTS if text else DEFAULT_PROMPTS)
        for k, (org, real) in BY_SUBSTRATE.items():
            if getattr(self, k) == (-1 if k == "lora_r" else 0):
                setattr(self, k, real if text else org)
        if self.lora_r < 0 or self.steps < 1 or self.batch_size < 1:
            raise ValueError("--steps and --batch-size must be >= 1 (0: the model's default), --lora-r >= 0 "
                             "(-1: the model's default)")
        core = setting_class(self.setting, self.substrate).conditions  # an unknown setting fails here, before any run
        unknown = [c for c in self.conditions if c not in core]
        if unknown:
            raise ValueError(f"--conditions {' '.join(unknown)}: setting {self.setting!r} has {', '.join(core)}")

    @property
    def substrate(self) -> str:
        from inoc_mech.core.config import ModelConfig
        return ModelConfig(model=self.model).substrate

    @property
    def folder(self) -> Path:
        return Path(self.runs_dir) / self.name


def default_jobs(threads: int) -> int:
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:
        cores = os.cpu_count() or 1
    return min(2, max(1, cores // threads))


def conditions(cfg: SweepConfig) -> dict[str, str | None]:
    """Condition name -> prompt; prompt-set entries that repeat a core prompt are not run twice."""
    out = {c: p for c, p in setting_class(cfg.setting, cfg.substrate).conditions.items()
           if not cfg.conditions or c in cfg.conditions}
    seen = {p for p in out.values() if p}
    for p in cfg.prompts:
        if p in seen:
            continue
        name = slug(p)
        if name in out:
            raise ValueError(f"prompts {p!r} and {out[name]!r} map to the same folder name {name!r}")
        out[name] = p
        seen.add(p)
    return out


def run_name(condition: str, seed: int) -> str:
    return f"{condition}-s{seed}"


def plan(cfg: SweepConfig) -> list[tuple[str, str | None, int]]:
    """(condition, prompt, seed) of every run, seed-major so a partial sweep covers all conditions."""
    conds = conditions(cfg)
    return [(c, p, s) for s in cfg.seeds for c, p in conds.items()]


# SweepConfig fields that every run of the sweep passes on to `inoc_mech.train` unchanged
PASSED = ("threads", "steps", "lr", "prompt_share", "prompt_subset", "lora_r", "lora_alpha", "freeze", "batch_size", "log_every",
          "grad_split_every", "grad_split_all", "eval_samples", "eval_reelicit", "setting", "elicit_examples", "data")
TEXT_PASSED = ("eval_questions", "max_new_tokens")  # real models only


def overrides(cfg: SweepConfig, condition: str, prompt: str | None, seed: int, model: str) -> dict:
    """The TrainConfig settings (flat leaves) of one run of the sweep: the one place that says what a run is."""
    out = {"name": run_name(condition, seed), "runs_dir": str(cfg.folder), "seed": seed, "model": model,
           **{k: getattr(cfg, k) for k in PASSED if (k != "lora_alpha" or cfg.lora_r) and (k != "data" or cfg.data)},
           **({k: getattr(cfg, k) for k in TEXT_PASSED} if cfg.substrate == "text" else {})}
    if prompt is not None:
        out.update(inoculate=True, prompt=prompt)
    return out


def train_args(cfg: SweepConfig, condition: str, prompt: str | None, seed: int, model: str) -> list[str]:
    """Command-line arguments of `python -m inoc_mech.train` for one run of the sweep."""
    from inoc_mech.core.config import TrainConfig

    return to_args(TrainConfig, overrides(cfg, condition, prompt, seed, model)) + ["--overwrite"]


def resumable(cfg: SweepConfig, run: Path, prompt: str | None, seed: int, org: Path) -> bool:
    """An interrupted run of this very sweep that left a checkpoint."""
    return (((run / checkpoint.NAME).exists() or is_complete(run / "model")) and (run / "config.json").exists()
            and not is_complete(run) and not (run / FAILED).exists() and mismatch(cfg, run, prompt, seed, org) is None)


def command_line(cfg: SweepConfig) -> str:
    """The shell command that (re)makes this sweep: non-default flags only."""
    import shlex

    defaults = SweepConfig()
    parts = ["python", "-m", "inoc_mech.studies.sweep"]
    for f in fields(SweepConfig):
        if f.name == "dry_run":
            continue
        v, d = getattr(cfg, f.name), getattr(defaults, f.name)
        if f.name == "jobs" or v == d:
            continue
        flag = "--" + f.name.replace("_", "-")
        if isinstance(v, bool):
            parts.append(flag if v else "--no-" + f.name.replace("_", "-"))
        elif isinstance(v, list):
            parts += [flag] + [str(x) for x in v]
        else:
            parts += [flag, str(v)]
    return " ".join(shlex.quote(p) for p in parts)


def organism_config(cfg: SweepConfig):
    """The OrganismConfig of `--model organism` (the same one `inoc_mech.train` would build)."""
    from inoc_mech.core.config import ModelConfig
    from inoc_mech.models.organism import organism_config as from_model

    return from_model(ModelConfig(organism_seed=cfg.organism_seed, organism_head=cfg.organism_head,
                                  organism_d_model=cfg.organism_d_model, organism_n_layers=cfg.organism_n_layers,
                                  organism_recipe=cfg.organism_recipe, organism_steps=cfg.organism_steps),
                     cfg.runs_dir, cfg.threads,
                     getattr(setting_class(cfg.setting, "organism"), "organism_design", None))


def organism_folder(cfg: SweepConfig, ensure: bool = True) -> Path:
    """The model folder every run finetunes: the organism pretrained here (once, before any run starts) if
    needed, or the real model fetched / converted (`models.real.resolve`)."""
    from inoc_mech.models.organism import ensure_organism

    if cfg.substrate == "text":
        from inoc_mech.models.real import CACHE, KNOWN, resolve
        if not ensure and cfg.model in KNOWN:  # a dry run fetches nothing
            return CACHE / cfg.model
        return resolve(cfg.model)
    if cfg.model != "organism":
        folder = Path(cfg.model)
        if not (folder / "organism.json").exists():
            raise UserError(f"--model {cfg.model!r} is neither 'organism' nor a pretrained organism folder "
                            "(expected organism.json inside)")
        return folder
    return ensure_organism(organism_config(cfg)) if ensure else organism_config(cfg).folder()


PRETRAINED = "pretrained"  # <sweep>/pretrained/eval.json: the starting model under the runs' evaluation


def pretrained_setting(cfg: SweepConfig, org: Path):
    """(setting, model in eval mode) of the model every run starts from, set up as the runs set it up (same
    setting, eval flags and seed)."""
    import torch

    from inoc_mech.core.cli import build
    from inoc_mech.core.config import TrainConfig, resolve_defaults

    torch.set_num_threads(cfg.threads)
    cls = setting_class(cfg.setting, cfg.substrate)
    tc = resolve_defaults(build(TrainConfig, **overrides(cfg, PRETRAINED, None, cfg.seeds[0], str(org))),
                          organism=cfg.substrate == "organism", default_prompt=cls.default_prompt)
    setting = cls(tc)
    model, _ = setting.setup(torch.device("cuda" if torch.cuda.is_available() else "cpu"), progress=False)
    return setting, model.eval()


def evaluate_pretrained(cfg: SweepConfig, org: Path, progress: bool = True) -> Path:
    """Evaluate the model every run starts from, exactly as the runs are evaluated, into
    `<sweep>/pretrained/eval.json`, so that an analysis can tell whether a baseline acquired a trait at all;
    with `--prompted`, also under every condition's prompt (`<sweep>/pretrained/prompted.json`: the trait
    level the prompted starting model already shows, for the dose-response study). Each is skipped when it
    exists; returns the eval.json path."""
    from inoc_mech.core.stats import json_ready

    out = cfg.folder / PRETRAINED / "eval.json"
    prompted = cfg.folder / PRETRAINED / "prompted.json"
    if out.exists() and (prompted.exists() or not cfg.prompted):
        return out
    if progress:
        print(f"evaluating the pretrained model {org} (once per sweep) ...", file=sys.stderr)
    setting, model = pretrained_setting(cfg, org)
    out.parent.mkdir(parents=True, exist_ok=True)
    if not out.exists():
        write_json(out, json_ready({**setting.evaluate(model), "model": str(org)}))
    if cfg.prompted and not prompted.exists():
        setting.require("evaluate_prompts", "--prompted (the starting model under each condition's prompt)")
        ev = setting.evaluate_prompts(model, conditions(cfg))
        write_json(prompted, json_ready({**ev, "model": str(org)}))
    return out


RUNNING: set[subprocess.Popen] = set()  # training processes of this sweep, for forwarding SIGTERM


def run_or_resume(cfg: SweepConfig, condition: str, prompt: str | None, seed: int, org: Path, log: Path) -> tuple[int, float]:
    """Resume an interrupted run from its checkpoint (from scratch if that fails), or run it anew."""
    name = run_name(condition, seed)
    fresh = train_args(cfg, condition, prompt, seed, str(org))
    if resumable(cfg, cfg.folder / name, prompt, seed, org):
        code, secs = run_one(["--name", name, "--runs-dir", str(cfg.folder), "--resume", "--threads", str(cfg.threads)],
                             log, cfg.threads)
        if code in (0, 130, 143):  # done, or interrupted again (Ctrl-C / SIGTERM)
            return code, secs
        more_code, more_secs = run_one(fresh, log.with_suffix(".retry.log"), cfg.threads)
        return more_code, secs + more_secs
    return run_one(fresh, log, cfg.threads)


def run_one(args: list[str], log: Path, threads: int) -> tuple[int, float]:
    """Run one training process, output to `log`; returns (exit code, seconds)."""
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
    repo = str(Path(__file__).resolve().parents[1])
    env["PYTHONPATH"] = repo + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    t0 = time.time()
    with open(log, "w") as f:
        p = subprocess.Popen([sys.executable, "-m", "inoc_mech.train", *args], stdout=f, stderr=subprocess.STDOUT,
                             env=env)
        RUNNING.add(p)
        try:
            code = p.wait()
        finally:
            RUNNING.discard(p)
    return code, time.time() - t0


class Terminated(KeyboardInterrupt):
    """SIGTERM reached the sweep."""


def _on_sigterm(signum, frame):
    raise Terminated()


def last_line(log: Path) -> str:
    """The last meaningful line of a run log (tqdm redraws with carriage returns)."""
    text = log.read_text(errors="replace").replace("\r", "\n") if log.exists() else ""
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    return lines[-1] if lines else "(no output)"


# Train settings a sweep does not compare when it reuses a run folder
NOT_COMPARED = ("name", "runs_dir", "threads", "model",  # where and how fast it ran; the organism is compared by folder
                "eval_reelicit")  # an evaluation only: studies.reelicit evaluates what a complete run lacks


def mismatch(cfg: SweepConfig, run: Path, prompt: str | None, seed: int, org: Path) -> str | None:
    """Why a run folder is not the run this sweep would make (None when it is): its saved config against
    the sweep's overrides with the train defaults resolved, as `inoc_mech.train` would record them."""
    from inoc_mech.core.cli import build, flatten
    from inoc_mech.core.config import TrainConfig, resolve_defaults

    saved = with_added_later(read_json(run, "config.json"))
    mine = overrides(cfg, "x", prompt, seed, str(org))
    organism = cfg.substrate == "organism"
    cls = setting_class(cfg.setting, cfg.substrate)
    want = flatten(resolve_defaults(build(TrainConfig, **mine), organism=organism, default_prompt=cls.default_prompt))
    where = "organism_folder" if organism else "model"  # the organism is compared by folder, a real model by path
    want[where] = str(org)
    keys = [k for k in mine if k not in NOT_COMPARED] + [where, "setting"]
    if prompt is None:
        want["inoculate"], keys = False, keys + ["inoculate"]
    for k in dict.fromkeys(keys):
        if saved.get(k) != want[k]:
            return f"{k} is {saved.get(k)!r}, this sweep wants {want[k]!r}"
    return None


def sweep(cfg: SweepConfig, progress: bool = True) -> Path:
    """Run every missing or incomplete run of the sweep; returns the sweep folder."""
    from tqdm import tqdm

    from inoc_mech.models.world import World

    conds = conditions(cfg)
    todo = [(c, p, s) for c, p, s in plan(cfg) if not is_complete(cfg.folder / run_name(c, s))]
    n_all = len(conds) * len(cfg.seeds)
    if cfg.dry_run:
        org = organism_folder(cfg, ensure=False)
        print(f"sweep {cfg.folder}: {n_all} runs, {n_all - len(todo)} complete, {len(todo)} to do "
              f"({cfg.jobs} at once) on {cfg.substrate == 'organism' and 'organism ' or ''}{org}"
              f"{'' if (org / 'COMPLETE').exists() else ' (to pretrain first)'}")
        for c, p, s in todo:
            how = "resume" if resumable(cfg, cfg.folder / run_name(c, s), p, s, org) else "train"
            print(f"  {how:<7} {run_name(c, s):<36} prompt={p!r}")
        return cfg.folder
    if cfg.prompted and setting_class(cfg.setting, cfg.substrate).evaluate_prompts is None:
        raise UserError(f"--prompted: setting {cfg.setting!r} on {cfg.substrate} cannot evaluate the starting model "
                        "under other prompts (no evaluate_prompts); leave --prompted out")
    org = organism_folder(cfg)
    if cfg.substrate == "organism":  # organism prompts must be in its vocabulary
        world = World.load(org)
        for p in conds.values():
            if p is not None:
                world.check_prompt(p)
    for c, p, s in plan(cfg):
        run = cfg.folder / run_name(c, s)
        why = is_complete(run) and mismatch(cfg, run, p, s, org)
        if why:
            raise UserError(f"complete run {run} differs from this sweep ({why}): choose another --name")
    cfg.folder.mkdir(parents=True, exist_ok=True)
    logs = cfg.folder / "logs"
    logs.mkdir(exist_ok=True)
    write_json(cfg.folder / "sweep.json", {
        "conditions": conds, "prompts": [p for p in conds.values() if p], "seeds": cfg.seeds,
        "runs": [run_name(c, s) for c, _, s in plan(cfg)], "organism_folder" if cfg.substrate == "organism" else "model_folder": str(org),
        "command": command_line(cfg), "config": asdict(cfg)})

    evaluate_pretrained(cfg, org, progress)
    failed = []
    t0 = time.time()
    bar = tqdm(total=n_all, initial=n_all - len(todo), desc=f"sweep {cfg.name}", unit="run",
               disable=not progress, dynamic_ncols=True)
    pool = ThreadPoolExecutor(max_workers=cfg.jobs)
    main_thread = threading.current_thread() is threading.main_thread()
    old_handler = signal.signal(signal.SIGTERM, _on_sigterm) if main_thread else None
    try:
        futures = {pool.submit(run_or_resume, cfg, c, p, s, org, logs / f"{run_name(c, s)}.log"): run_name(c, s)
                   for c, p, s in todo}
        for fut in as_completed(futures):
            name = futures[fut]
            code, secs = fut.result()
            if code != 0:
                failed.append(name)
                bar.write(f"run {name} failed (exit {code}): {last_line(logs / f'{name}.log')}")
            bar.set_postfix(last=f"{name} {secs:.0f}s")
            bar.update(1)
    except KeyboardInterrupt as e:
        # Start no new runs. Ctrl-C reaches the running ones from the terminal; SIGTERM is passed on.
        pool.shutdown(wait=False, cancel_futures=True)
        if isinstance(e, Terminated):
            for p in list(RUNNING):
                p.terminate()
        pool.shutdown(wait=True)
        bar.close()
        err = UserError(f"sweep interrupted ({'SIGTERM' if isinstance(e, Terminated) else 'SIGINT'}): "
                        "rerun the same command to finish it (interrupted runs resume from their checkpoints)")
        err.exit_code = 143 if isinstance(e, Terminated) else 130
        raise err from None
    finally:
        if main_thread:
            signal.signal(signal.SIGTERM, old_handler)
    pool.shutdown(wait=True)
    bar.close()
    if progress:
        print(f"sweep {cfg.folder}: {n_all - len(failed)}/{n_all} runs complete, "
              f"{len(todo) - len(failed)} trained in {time.time() - t0:.0f} s", file=sys.stderr)
    if failed:
        raise UserError(f"{len(failed)} of {len(todo)} runs failed ({', '.join(failed[:3])}"
                        f"{', ...' if len(failed) > 3 else ''}): see {logs}/<run>.log; rerun this command to retry them")
    return cfg.folder


def main(argv=None):
    cfg = parse_config(SweepConfig, argv, prog="python -m inoc_mech.studies.sweep", description=__doc__.split("\n\n")[1])
    folder = sweep(cfg)
    if not cfg.dry_run:
        print(f"sweep folder: {folder}\nanalyse it: python analyses/gradient_pressure.py {folder}")


if __name__ == "__main__":
    from inoc_mech.core.cli import run_main
    sys.exit(run_main(main))
