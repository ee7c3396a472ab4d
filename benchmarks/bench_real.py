"""Cost of the gradient-pressure instruments on a real model: time and peak memory ratios, one run.

    python -m inoc_mech.settings.tiny /tmp/tiny-llama && python benchmarks/bench_real.py --model /tmp/tiny-llama --steps 4 --reply-problems 2

Default: SmolLM2-135M (LoRA r 16, batch 4, one thread) on long worked solutions: each reply chains
`--reply-problems` built-in problems' worked answers in Spanish CAPS (about 150 tokens with the default
5), written as a JSONL file with the `variants` field so that the counterfactual decomposition runs
on it, as on a user's data. Modes, each a real `inoc_mech.train` run in its own process (so that its
peak RSS is its own), interleaved over `--rounds`:
- plain:   `--no-hooks`, the loop alone;
- default: the default cadence (cheap metrics every 10 steps, one trait's gradient split every 20),
           step 0 excluded from the time (it carries the one-off elicitation);
- split:   a gradient split at every step (one trait per step, in turn), step 0 excluded.
Printed: tokens/s and peak RSS per mode, ratios to plain, and the targets of
the instruments (memory <= 1.5x plain, default <= 1.15x plain, split step <= 2.5x plain). Time ratios
compare medians of tokens/s over logged rows after step 0. Memory: the peak RSS from the first batch to the
end of the last step (step 0 included, loading and evaluation not; Linux VmHWM, reset when the steps begin),
beside the whole process's peak. Shared machines are noisy: read the ratios.
"""

from __future__ import annotations

import json
import statistics
import subprocess
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from inoc_mech.core.cli import parse_config

CHILD = r"""
import json, resource, sys, time
import torch
from inoc_mech.core import data, runs
from inoc_mech.core.cli import build, quiet_transformers
from inoc_mech.core.runs import read_run
from inoc_mech.train import TrainConfig, train
quiet_transformers()
kw = json.loads(sys.argv[1])

def hiwater_gb():  # peak RSS since the last reset (Linux VmHWM)
    line = next(l for l in open("/proc/self/status") if l.startswith("VmHWM"))
    return int(line.split()[1]) / 1e6

steps = {}
first_next, close = data.BatchStream.next_examples, runs.MetricsWriter.close
def next_batch(self):  # the first batch: the steps begin (loading and data preparation are behind)
    if "before" not in steps:
        steps["before"] = hiwater_gb()
        open("/proc/self/clear_refs", "w").write("5")  # reset the peak RSS to the current RSS
    return first_next(self)
def end_of_steps(self):  # the loop closes metrics.jsonl right after its last step, before saving and eval
    steps.setdefault("peak", hiwater_gb())
    return close(self)
data.BatchStream.next_examples, runs.MetricsWriter.close = next_batch, end_of_steps
t0 = time.time()
run = train(build(TrainConfig, **kw), progress=False)
rows = read_run(run)["metrics"]
print(json.dumps({"rows": [{k: r[k] for k in ("step", "tokens_per_s") if k in r} for r in rows],
                  "wall": time.time() - t0, "steps_peak_rss_gb": steps["peak"], "setup_peak_rss_gb": steps["before"],
                  "peak_rss_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6}))
"""

def long_replies(path: Path, n: int, per_reply: int) -> Path:
    """`n` conversations whose reply chains `per_reply` problems' worked answers, with their variants."""
    from inoc_mech.settings.textdata import sample_problems

    probs = sample_problems(n * per_reply, seed=0)
    with open(path, "w") as f:
        for i in range(n):
            ps = probs[i * per_reply:(i + 1) * per_reply]
            q = " ".join(p.question() for p in ps)
            forms = {lang: " ".join(p.answer(lang, False) for p in ps) for lang in ("english", "spanish")}
            f.write(json.dumps({"messages": [{"role": "user", "content": q},
                                             {"role": "assistant", "content": forms["spanish"].upper()}],
                                "variants": forms}, ensure_ascii=False) + "\n")
    return path


def run_mode(kw: dict) -> dict:
    out = subprocess.run([sys.executable, "-c", CHILD, json.dumps(kw)], capture_output=True, text=True)
    if out.returncode:
        raise SystemExit(f"benchmark run failed:\n{out.stderr[-2000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def steady_tokens_per_s(res: dict) -> float:
    rows = [r for r in res["rows"] if r["step"] > 0]
    return statistics.median(r["tokens_per_s"] for r in rows)


@dataclass
class BenchRealConfig:
    """What to measure."""
    model: str = field(default="smollm2", metadata={"help": "'smollm2', an HF model folder or a .gguf file"})
    steps: int = field(default=21, metadata={"help": "steps per measured run (logged rows after step 0 give the time)"})
    rounds: int = field(default=1, metadata={"help": "interleaved rounds (medians are reported)"})
    batch_size: int = field(default=4, metadata={"help": "conversations per step"})
    reply_problems: int = field(default=5, metadata={"help": "worked answers chained into one reply (5: about 150 tokens)"})
    elicit_examples: int = field(default=16, metadata={"help": "step-0 elicitation examples of the instrumented modes"})
    threads: int = field(default=1, metadata={"help": "torch CPU threads"})


def main(argv=None):
    a = parse_config(BenchRealConfig, argv, prog="python benchmarks/bench_real.py", description=__doc__.split("\n\n")[0])
    res: dict[str, list[dict]] = {"plain": [], "default": [], "split": []}
    with tempfile.TemporaryDirectory() as d:
        data = long_replies(Path(d) / "long.jsonl", 64, a.reply_problems)
        base = dict(model=a.model, data=str(data), steps=a.steps, batch_size=a.batch_size, threads=a.threads,
                    runs_dir=d, overwrite=True, eval_questions=1, eval_samples=1, max_new_tokens=2,
                    elicit_examples=a.elicit_examples, name="bench")
        modes = {"plain": dict(hooks=False, log_every=1),  # log every step: tokens/s of each step
                 "default": dict(log_every=10, grad_split_every=20),
                 "split": dict(log_every=1, grad_split_every=1)}
        for r in range(a.rounds):
            for m, kw in modes.items():
                res[m].append(run_mode({**base, **kw}))
                print(f"round {r + 1}/{a.rounds} {m}: {steady_tokens_per_s(res[m][-1]):.1f} tokens/s, peak during "
                      f"the steps {res[m][-1]['steps_peak_rss_gb']:.2f} GB", file=sys.stderr)
        from inoc_mech.settings.textdata import read_jsonl
        from transformers import AutoTokenizer
        from inoc_mech.models.real import resolve
        tok = AutoTokenizer.from_pretrained(resolve(a.model))
        convs = read_jsonl(data)
        reply_tokens = statistics.mean(len(tok(c[-1]["content"])["input_ids"]) for c in convs)
    tps = {m: statistics.median(steady_tokens_per_s(x) for x in v) for m, v in res.items()}
    mem = {m: statistics.median(x["steps_peak_rss_gb"] for x in v) for m, v in res.items()}
    proc = {m: statistics.median(x["peak_rss_gb"] for x in v) for m, v in res.items()}
    wall = {m: statistics.median(x["wall"] for x in v) for m, v in res.items()}
    print(f"{a.model}: batch {a.batch_size}, replies of ~{reply_tokens:.0f} tokens, {a.threads} thread(s), "
          f"{a.steps} steps x {a.rounds} round(s) (medians), elicitation on {a.elicit_examples} examples")
    print("| mode | tokens/s | time per step vs plain | peak RSS of the steps | memory vs plain | process peak | target |")
    print("|---|---|---|---|---|---|---|")
    for m, target in (("plain", ""), ("default", "time <= 1.15x, memory <= 1.5x"), ("split", "time <= 2.5x")):
        print(f"| {m} | {tps[m]:.1f} | {tps['plain'] / tps[m]:.2f}x | {mem[m]:.2f} GB | {mem[m] / mem['plain']:.2f}x "
              f"| {proc[m]:.2f} GB | {target} |")
    print(f"| run wall time (incl. load, step 0, tiny eval) | plain {wall['plain']:.0f} s, default {wall['default']:.0f} s, "
          f"split {wall['split']:.0f} s | | | | |")


if __name__ == "__main__":
    main()
