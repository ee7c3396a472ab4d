"""The same finetuning through `transformers.Trainer`, as a throughput reference for the custom loop.

    python benchmarks/bench_hooks.py --steps 20 --rounds 1

`trainer_throughput` trains `model` on tokenized examples (loss on assistant tokens, constant lr,
AdamW without weight decay, like `inoc_mech.train`) and returns non-pad tokens/s over the steps
after the first, plus peak CUDA memory when on a GPU.
"""

from __future__ import annotations

import tempfile
import time

import torch

from inoc_mech.core.data import Example, collate


def trainer_throughput(model, examples: list[Example], pad_id: int, batch_size: int, steps: int,
                       lr: float = 1e-4, bf16: bool = False) -> dict:
    from transformers import Trainer, TrainerCallback, TrainingArguments

    data = [{"input_ids": e.input_ids, "assistant": e.assistant} for e in examples]
    counted = {"tokens": 0}

    def collate_items(items):
        b = collate([Example(x["input_ids"], x["assistant"]) for x in items], pad_id)
        counted["tokens"] += int(b.attention_mask.sum())
        return {"input_ids": b.input_ids, "attention_mask": b.attention_mask, "labels": b.labels}

    clock = {}

    class Clock(TrainerCallback):
        def on_step_end(self, args, state, control, **kw):
            if state.global_step == 1:
                clock["t0"], clock["tokens0"] = time.perf_counter(), counted["tokens"]

    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    with tempfile.TemporaryDirectory() as out:
        args = TrainingArguments(output_dir=out, per_device_train_batch_size=batch_size, max_steps=steps,
                                 learning_rate=lr, lr_scheduler_type="constant", weight_decay=0.0, warmup_steps=0,
                                 logging_steps=10 ** 9, save_strategy="no", report_to=[], bf16=bf16,
                                 use_cpu=not torch.cuda.is_available(), dataloader_num_workers=0,
                                 disable_tqdm=True, seed=0, remove_unused_columns=False)
        Trainer(model=model, args=args, train_dataset=data, data_collator=collate_items, callbacks=[Clock()]).train()
        secs = time.perf_counter() - clock["t0"]
    # the collator ran once more per step than finished steps when prefetching; count tokens per step instead
    per_step = (counted["tokens"] - clock["tokens0"]) / max(steps - 1, 1)
    out = {"tokens_per_s": per_step * (steps - 1) / secs, "seconds": secs}
    if torch.cuda.is_available():
        out["peak_memory_gb"] = torch.cuda.max_memory_allocated() / 2 ** 30
    return out
