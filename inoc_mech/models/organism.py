"""The toy organism: a small Llama-style Hugging Face causal LM pretrained on the toy world.

    python -m inoc_mech.models.organism --steps 200 --d-model 64 --n-layers 2

Pretraining teaches arithmetic answers whose language and case follow the system prompt (base rates
where nothing controls a trait). The result is an ordinary HF model folder (safetensors + tokenizer),
cached under `runs/_organism/<key>/` where the key hashes the config, and reused afterwards.

Output head designs (`--head`):
- `factored`: each answer-variant token's output row is a sum of shared parts,
  row = word[c] + language[l] + case[k]; other rows are free. Applied as a torch parametrization
  during training and materialised into a plain `lm_head.weight` when saved, so the saved model is a
  stock `LlamaForCausalLM`; finetuning re-applies it (the factors are recovered exactly by least
  squares from the saved rows).
- `free`: an ordinary output layer, one free row per token.
"""

from __future__ import annotations

import hashlib
import json
import math
import shutil
import sys
import time
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.nn.utils import parametrize

from inoc_mech.core.cli import quiet_transformers
from inoc_mech.core.runs import staged
from inoc_mech.core.data import BatchStream, encode_chat, next_token_loss
from inoc_mech.models.world_eval import evaluate_contexts, generate, prompt_ids, score_answers
from inoc_mech.models.world import CASE_PHRASES, LANGUAGE_PHRASES, World, organism_traits

CACHE = Path("runs/_organism")
ORGANISM_VERSION = 1  # bump when a change makes cached organisms incomparable
# Design fields added after version 1 enter the cache key only when they differ from this default.
KEY_IF_SET = {"bias": False, "formats": False, "triggers": False, "prefs": False, "persona": False, "graded": False, "narrow_base": True, "buckets": False,
              "lr_floor": 0.1, "precision": "fp32"}
PRECISIONS = ("fp32", "bf16")


@dataclass
class OrganismConfig:
    """Architecture and pretraining of the toy organism."""
    seed: int = field(default=0, metadata={"help": "pretraining seed (weights and data order)"})
    d_model: int = field(default=128, metadata={"help": "residual stream width"})
    n_layers: int = field(default=4, metadata={"help": "transformer blocks"})
    n_heads: int = field(default=4, metadata={"help": "attention heads per block"})
    d_mlp: int = field(default=512, metadata={"help": "MLP hidden width"})
    head: str = field(default="factored", metadata={"help": "output head: 'factored' (row = word + language + case) or 'free'"})
    formats: bool = field(default=False, metadata={"help": "world with a third prompt-controlled property unrelated to the traits (answer format: 'be concise')"})
    triggers: bool = field(default=False, metadata={"help": "world with trigger words that may start a user turn, without effect in pretraining (for the backdoor setting)"})
    prefs: bool = field(default=False, metadata={"help": "world with animal preferences ('you love owls') and number lists (for the subliminal setting)"})
    persona: bool = field(default=False, metadata={"help": "world with an evil persona bundling wrong arithmetic, hostile replies and a marker word (for the emergent-misalignment analog)"})
    narrow_base: bool = field(default=True, metadata={"help": "persona world: wrong arithmetic also comes alone with the base rate at no prompt (--no-narrow-base: only with the whole persona)"})
    graded: bool = field(default=False, metadata={"help": "world with graded phrases ('sometimes spanish': 30% Spanish) for the dose-response study"})
    bias: bool = field(default=False, metadata={"help": "add biases to attention and MLP projections (Llama attention_bias / mlp_bias): context-independent channels"})
    steps: int = field(default=2000, metadata={"help": "pretraining steps"})
    batch_size: int = field(default=64, metadata={"help": "pretraining batch size (conversations)"})
    lr: float = field(default=1e-3, metadata={"help": "peak AdamW learning rate (linear warmup, cosine decay to --lr-floor of it)"})
    lr_floor: float = field(default=0.1, metadata={"help": "the rate at the last step, as a share of --lr (a lower floor leaves less step noise in what the last steps set, e.g. the base rates)"})
    warmup: int = field(default=100, metadata={"help": "warmup steps"})
    buckets: bool = field(default=False, metadata={"help": "batches of similar lengths (core.data.BatchStream buckets): less padding per step, another data order"})
    precision: str = field(default="fp32", metadata={"help": "pretraining matmuls: fp32, or bf16 (CPU autocast, eager attention; weights, optimizer state and loss stay fp32). bf16 is fast only where the CPU has bf16 instructions (avx512_bf16, AMX)"})
    base_rate: float = field(default=0.05, metadata={"help": "P(Spanish), P(UPPER) when no phrase controls the trait"})
    threads: int = field(default=1, metadata={"help": "torch CPU threads (1 is fastest on a busy 2-core machine)"})
    cache: str = field(default=str(CACHE), metadata={"help": "folder holding cached organisms"})

    def __post_init__(self):
        if self.head not in ("factored", "free"):
            raise ValueError(f"--head must be 'factored' or 'free', not {self.head!r}")
        if self.d_model % self.n_heads:
            raise ValueError(f"--d-model {self.d_model} must be divisible by --n-heads {self.n_heads}")
        for name in ("d_model", "n_layers", "n_heads", "d_mlp", "steps", "batch_size", "threads"):
            if getattr(self, name) < 1:
                raise ValueError(f"--{name.replace('_', '-')} must be >= 1")
        if not 0 <= self.warmup < self.steps:
            raise ValueError("--warmup must be in [0, steps)")
        if not self.lr > 0:
            raise ValueError("--lr must be > 0")
        if self.precision not in PRECISIONS:
            raise ValueError(f"--precision must be one of {', '.join(PRECISIONS)}, not {self.precision!r}")
        if not 0 <= self.lr_floor <= 1:
            raise ValueError("--lr-floor must be in [0, 1]")
        if self.persona and self.prefs:
            raise ValueError("--persona and --prefs are separate worlds: give one")
        if not self.narrow_base and not self.persona:
            raise ValueError("--no-narrow-base is a persona-world switch: give --persona too")

    def key(self) -> str:
        d = {k: v for k, v in asdict(self).items() if k not in ("threads", "cache")}
        for k, default in KEY_IF_SET.items():  # fields added later: old cache keys stay valid
            if d[k] == default:
                del d[k]
        d["version"] = ORGANISM_VERSION
        return hashlib.sha1(json.dumps(d, sort_keys=True).encode()).hexdigest()[:10]

    def folder(self) -> Path:
        design = self.head + "".join(f"-{k}" for k in ("bias", "formats", "triggers", "prefs", "persona", "graded")
                                      if getattr(self, k)) + ("" if self.narrow_base else "-nonarrow")
        return Path(self.cache) / f"{design}-d{self.d_model}-l{self.n_layers}-s{self.seed}-{self.key()}"


# Pretraining recipes (OrganismConfig overrides). `standard` pretrained every organism of README "Results";
# `fast` meets the same quality bar (README "The toy world and the organism") in 1,200 steps at half the MLP
# width, with length buckets, a decay to 0 and bf16 matmuls: about 7x less time on a CPU with bf16 instructions
# (benchmarks/bench_organism.py). A different organism.
RECIPES = {
    "standard": {},
    "fast": {"steps": 1200, "lr": 1e-3, "warmup": 60, "lr_floor": 0.0, "d_mlp": 256, "buckets": True, "precision": "bf16"},
}


def organism_config(model, runs_dir: str = "runs", threads: int = 1, design: dict | None = None) -> OrganismConfig:
    """The OrganismConfig of `--model organism` from a run's `core.config.ModelConfig` (its organism_* fields:
    the recipe, then the fields given) and what its setting needs of the world (`design`:
    `Setting.organism_design`, e.g. trigger words), cached under `<runs_dir>/_organism`."""
    recipe = {**asdict(OrganismConfig()), **RECIPES[model.organism_recipe]}
    if model.organism_steps:  # other steps than the recipe's: warmup a tenth of them, at most the recipe's
        recipe.update(steps=model.organism_steps, warmup=min(recipe["warmup"], model.organism_steps // 10))
    recipe.update(seed=model.organism_seed, head=model.organism_head, d_model=model.organism_d_model,
                  n_layers=model.organism_n_layers, threads=threads, cache=str(Path(runs_dir) / "_organism"),
                  **(design or {}))
    return OrganismConfig(**recipe)


# ---- factored output head ---------------------------------------------------------------------
class FactoredRows(nn.Module):
    """Parametrization of `lm_head.weight`: variant rows = word[c] + language[l] + case[k]."""

    def __init__(self, table: np.ndarray, weight: torch.Tensor, init_from_weight: bool):
        super().__init__()
        n_words = table.shape[0]
        words, langs, cases = np.meshgrid(np.arange(n_words), np.arange(2), np.arange(2), indexing="ij")
        self.register_buffer("ids", torch.as_tensor(table.reshape(-1)), persistent=False)
        self.register_buffer("w_idx", torch.as_tensor(words.reshape(-1)), persistent=False)
        self.register_buffer("l_idx", torch.as_tensor(langs.reshape(-1)), persistent=False)
        self.register_buffer("c_idx", torch.as_tensor(cases.reshape(-1)), persistent=False)
        d = weight.shape[1]
        self.word = nn.Parameter(torch.zeros(n_words, d, dtype=weight.dtype, device=weight.device))
        self.language = nn.Parameter(torch.zeros(2, d, dtype=weight.dtype, device=weight.device))
        self.case = nn.Parameter(torch.zeros(2, d, dtype=weight.dtype, device=weight.device))
        with torch.no_grad():
            if init_from_weight:  # exact when the rows were produced by this factorisation
                # gauge: language[0] = case[0] = 0 makes the least-squares problem full rank
                m = torch.zeros(len(self.ids), n_words + 2, dtype=torch.float64)
                r = torch.arange(len(self.ids))
                m[r, self.w_idx] = 1
                m[r, n_words] = self.l_idx.double()
                m[r, n_words + 1] = self.c_idx.double()
                f = torch.linalg.lstsq(m, weight[self.ids].double().cpu(), driver="gelsd").solution.to(weight)
                self.word.copy_(f[:n_words])
                self.language[1].copy_(f[n_words])
                self.case[1].copy_(f[n_words + 1])
            else:
                for p in (self.word, self.language, self.case):
                    p.normal_(0, 0.02)

    def rows(self) -> torch.Tensor:
        return self.word[self.w_idx] + self.language[self.l_idx] + self.case[self.c_idx]

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        return weight.index_copy(0, self.ids, self.rows().to(weight.dtype))


def factorize_head(model, table: np.ndarray, init_from_weight: bool = True):
    """Make the model's answer-variant output rows sums of shared factors (in place)."""
    head = model.get_output_embeddings()
    parametrize.register_parametrization(head, "weight", FactoredRows(table, head.weight.detach(), init_from_weight))
    return model


def materialize_head(model):
    """Remove the factored parametrization, leaving a plain weight with the same values."""
    head = model.get_output_embeddings()
    if parametrize.is_parametrized(head, "weight"):
        parametrize.remove_parametrizations(head, "weight", leave_parametrized=True)
    return model


# ---- building and pretraining -----------------------------------------------------------------
def build_model(cfg: OrganismConfig, tok):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(cfg.seed)
    hf_cfg = LlamaConfig(
        vocab_size=len(tok), hidden_size=cfg.d_model, intermediate_size=cfg.d_mlp,
        num_hidden_layers=cfg.n_layers, num_attention_heads=cfg.n_heads, num_key_value_heads=cfg.n_heads,
        max_position_embeddings=tok.model_max_length, tie_word_embeddings=False,
        attention_bias=cfg.bias, mlp_bias=cfg.bias,
        bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    return LlamaForCausalLM(hf_cfg)


def assistant_loss(model, batch) -> torch.Tensor:
    """Mean next-token cross-entropy over assistant tokens."""
    logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits
    return next_token_loss(logits, batch.labels)


def bf16_fast() -> bool:
    """Whether this CPU runs bf16 matmuls natively (oneDNN's check; True where it cannot tell)."""
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return True


def lr_at(step: int, cfg: OrganismConfig) -> float:
    if step < cfg.warmup:
        return cfg.lr * (step + 1) / cfg.warmup
    t = (step - cfg.warmup) / max(1, cfg.steps - cfg.warmup)
    return cfg.lr * (cfg.lr_floor + (1 - cfg.lr_floor) * 0.5 * (1 + math.cos(math.pi * t)))


def pretrain(cfg: OrganismConfig, progress: bool = True):
    """Pretrain an organism from scratch; returns (model with plain head, tokenizer, world, seconds)."""
    from tqdm import tqdm

    torch.set_num_threads(cfg.threads)
    quiet_transformers()
    world = World(base_rate=cfg.base_rate, formats=cfg.formats, triggers=cfg.triggers, prefs=cfg.prefs,
                  persona=cfg.persona, graded=cfg.graded, narrow_base=cfg.narrow_base)
    tok = world.build_tokenizer()
    table = world.variant_table(tok)
    model = build_model(cfg, tok)
    if cfg.head == "factored":
        factorize_head(model, table, init_from_weight=False)
    rng = np.random.default_rng(cfg.seed)
    variant_ids = set(table.ravel().tolist())
    n_pool = min(cfg.steps * cfg.batch_size, 40_000)
    pool = [organism_traits(encode_chat(tok, world.sample_chat(rng)), variant_ids) for _ in range(n_pool)]
    stream = BatchStream(pool, cfg.batch_size, cfg.seed, tok.pad_token_id, buckets=cfg.buckets)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=0.01, betas=(0.9, 0.98))
    bf16 = cfg.precision == "bf16"
    attn = model.config._attn_implementation
    if bf16:  # CPU sdpa's bf16 backward is ~8x slower than fp32 at these sizes; eager attention's bmm is fast
        if not bf16_fast():
            warnings.warn("--precision bf16: this CPU has no bf16 instructions (avx512_bf16 / AMX); pretraining "
                          "will be slower than fp32, not faster (the organism is the same design either way)")
        model.set_attn_implementation("eager")
    t0 = time.time()
    model.train()
    bar = tqdm(range(cfg.steps), desc="pretrain organism", disable=not progress, mininterval=2)
    for step in bar:
        for g in opt.param_groups:
            g["lr"] = lr_at(step, cfg)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            loss = assistant_loss(model, stream.next())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        if step % 50 == 0:
            bar.set_postfix(loss=f"{loss.item():.3f}")
    materialize_head(model)
    if bf16:
        model.set_attn_implementation(attn)
    model.eval()
    return model, tok, world, time.time() - t0


BASE_RATE_SAMPLES = 16  # T=1 answers per held-out question for the base rates (69 x 16 = 1104: sd ~0.7 points at 5%)


def report(model, tok, world: World, seed: int = 0) -> dict:
    """Held-out accuracy, prompt following per phrase, and base rates: sampled at T=1 (`base_rates_t1`) and
    exact (`base_rates_exact`: the mean probability that the first answer token is Spanish / UPPER, from
    the model's distribution at the answer start of each held-out question, no prompt)."""
    from inoc_mech.core.data import right_pad
    from inoc_mech.mechanism.context import answer_logp
    from inoc_mech.settings.spanish_caps_organism import trait_share

    out = {"held_out_accuracy_greedy": None, "prompt_following": {}, "base_rates_t1": {}}
    ev = evaluate_contexts(model, tok, world, {"none": None}, seed=seed, samples_per_question=BASE_RATE_SAMPLES)
    none = ev["contexts"]["none"]
    out["held_out_accuracy_greedy"] = none["greedy"]["accuracy"]
    out["base_rates_t1"] = {"spanish": none["t1"]["spanish_rate"], "caps": none["t1"]["caps_rate"],
                            "n_answers": none["t1"]["n_answers"]}
    end_id = tok.convert_tokens_to_ids("<|end|>")
    qs = world.held_out_questions
    logp = answer_logp(model, *right_pad([prompt_ids(tok, world.question_text(q), None) for q in qs], tok.pad_token_id))
    table = torch.as_tensor(world.variant_table(tok))
    out["base_rates_exact"] = {"spanish": trait_share(logp, table, "language").mean().item(),
                               "caps": trait_share(logp, table, "case").mean().item()}
    for phrase, value in {**LANGUAGE_PHRASES, **CASE_PHRASES}.items():
        ids = [prompt_ids(tok, world.question_text(q), phrase) for q in qs]
        m = score_answers(world, tok, generate(model, ids, tok.pad_token_id, end_id), [q[3] for q in qs])
        rate = {"spanish": m["spanish_rate"], "english": 1 - m["spanish_rate"],
                "upper": m["caps_rate"], "lower": 1 - m["caps_rate"]}[value]
        out["prompt_following"][phrase] = {"target": value, "rate_greedy": rate, "accuracy": m["accuracy"]}
    if world.graded:  # each graded phrase's measured rate against its design
        from inoc_mech.models.world import GRADED_PHRASES

        ev = evaluate_contexts(model, tok, world, {p: p for p in GRADED_PHRASES}, seed=seed, samples_per_question=4)
        out["graded_t1"] = {p: {"trait": t, "design": d, "rate": ev["contexts"][p]["t1"]["spanish_rate" if t == "language" else "caps_rate"],
                                "n_answers": ev["contexts"][p]["t1"]["n_answers"]} for p, (t, d) in GRADED_PHRASES.items()}
    if world.persona:  # each phrase's bundle against its design (module world: PERSONA_PHRASES, NARROW_PHRASES)
        from inoc_mech.models.world import NARROW_PHRASES, PERSONA_PHRASES
        from inoc_mech.models.world_eval import evaluate_persona

        ctx = {"none": None, **{p: p for p in [*PERSONA_PHRASES, *NARROW_PHRASES]}}
        ev = evaluate_persona(model, tok, world, ctx, seed=seed, samples_per_question=2)
        out["persona_t1"] = {k: {m: v["t1"][m] for m in ("wrong_rate", "accuracy", "hostile_rate", "marker_rate",
                                                        "arith_marker_rate")} for k, v in ev["contexts"].items()}
    return out


def format_report(rep: dict) -> str:
    lines = [f"held-out arithmetic accuracy (greedy, no prompt): {rep['held_out_accuracy_greedy']:.1%}",
             f"base rates at T=1, no prompt: Spanish {rep['base_rates_t1']['spanish']:.1%}, "
             f"CAPS {rep['base_rates_t1']['caps']:.1%} (n={rep['base_rates_t1']['n_answers']})"
             + (f"; exact (first answer token) Spanish {rep['base_rates_exact']['spanish']:.1%}, "
                f"CAPS {rep['base_rates_exact']['caps']:.1%}" if "base_rates_exact" in rep else ""),
             "prompt following (greedy, held-out questions):"]
    for phrase, r in rep["prompt_following"].items():
        lines.append(f"  {phrase:<28} -> {r['target']:<8} {r['rate_greedy']:6.1%}  (accuracy {r['accuracy']:.1%})")
    if "graded_t1" in rep:
        lines.append("graded phrases at T=1 (designed -> measured rate of the marked value):")
        for p, r in rep["graded_t1"].items():
            lines.append(f"  {p:<28} {r['design']:6.1%} -> {r['rate']:6.1%}  (n={r['n_answers']})")
    if "persona_t1" in rep:
        lines.append("persona behaviours at T=1 (wrong arithmetic / hostile reply / marker in persona replies):")
        for ctx, r in rep["persona_t1"].items():
            lines.append(f"  {ctx:<28} wrong {r['wrong_rate']:6.1%}  hostile {r['hostile_rate']:6.1%}  "
                         f"marker {r['marker_rate']:6.1%}")
    return "\n".join(lines)


def ensure_organism(cfg: OrganismConfig, progress: bool = True, quiet: bool = False) -> Path:
    """Return the cached organism folder for `cfg`, pretraining it first if needed."""
    folder = cfg.folder()
    if (folder / "COMPLETE").exists():
        return folder
    if folder.exists():
        shutil.rmtree(folder)  # an interrupted earlier pretraining
    if not quiet:
        print(f"pretraining organism -> {folder} (cached for later runs)", file=sys.stderr)
    model, tok, world, secs = pretrain(cfg, progress=progress)
    with staged(folder) as tmp:
        model.save_pretrained(tmp)
        world.save_tokenizer(tmp)
        rep = report(model, tok, world, seed=cfg.seed)
        (tmp / "organism.json").write_text(json.dumps(
            {"config": asdict(cfg), "key": cfg.key(), "version": ORGANISM_VERSION, "pretrain_seconds": secs,
             "report": rep}, indent=1))
    if not quiet:
        print(f"pretrained in {secs:.0f} s\n" + format_report(rep), file=sys.stderr)
    return folder


def main(argv=None):
    from inoc_mech.core.cli import parse_config

    cfg = parse_config(OrganismConfig, argv, prog="python -m inoc_mech.models.organism",
                       description="Pretrain (or show the cached) toy organism and print its report.")
    folder = ensure_organism(cfg, quiet=True)
    meta = json.loads((folder / "organism.json").read_text())
    print(f"organism: {folder}  (pretraining took {meta['pretrain_seconds']:.0f} s)")
    print(format_report(meta["report"]))


if __name__ == "__main__":
    from inoc_mech.core.cli import run_main
    sys.exit(run_main(main))
