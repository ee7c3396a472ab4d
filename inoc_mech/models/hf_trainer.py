"""The same finetuning through `transformers.Trainer`, as a throughput reference for the custom loop.

    python benchmarks/bench_hooks.py --steps 20 --rounds 1

`trainer_throughput` trains `model` on tokenized examples (loss on assistant tokens, constant lr,
AdamW without weight decay and without gradient clipping, like `inoc_mech.train` by default) and returns
tokens/s over the steps after the first (non-pad tokens; the median of the per-step rates, as the loop's
`tokens_per_s` rows give it, and the total's), plus peak CUDA memory when on a GPU. `in_order`: the examples
in the order given, batch after batch (to train on exactly the loop's batches); `group_by_length`: Trainer's
own length grouping (batches of similar lengths), the counterpart of the loop's `--length-buckets`.
"""

from __future__ import annotations

import statistics
import tempfile
import time

import torch

from inoc_mech.core.data import Example, collate


def trainer_throughput(model, examples: list[Example], pad_id: int, batch_size: int, steps: int,
                       lr: float = 1e-4, bf16: bool = False, group_by_length: bool = False,
                       in_order: bool = False) -> dict:
    from transformers import Trainer, TrainerCallback, TrainingArguments

    data = [{"input_ids": e.input_ids, "assistant": e.assistant} for e in examples]
    tokens = []  # per collated batch, in step order

    def collate_items(items):
        b = collate([Example(x["input_ids"], x["assistant"]) for x in items], pad_id)
        tokens.append(int(b.attention_mask.sum()))
        return {"input_ids": b.input_ids, "attention_mask": b.attention_mask, "labels": b.labels}

    ends = []

    class Clock(TrainerCallback):
        def on_step_end(self, args, state, control, **kw):
            ends.append(time.perf_counter())

    class InOrder(Trainer):
        def _get_train_sampler(self, *args, **kwargs):
            return torch.utils.data.SequentialSampler(self.train_dataset)

    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    grouped = {}
    if group_by_length:  # renamed in transformers 5
        fields = TrainingArguments.__dataclass_fields__
        grouped = ({"train_sampling_strategy": "group_by_length"} if "train_sampling_strategy" in fields
                   else {"group_by_length": True})
    with tempfile.TemporaryDirectory() as out:
        args = TrainingArguments(output_dir=out, per_device_train_batch_size=batch_size, max_steps=steps,
                                 learning_rate=lr, lr_scheduler_type="constant", weight_decay=0.0, warmup_steps=0,
                                 max_grad_norm=0.0, logging_steps=10 ** 9, save_strategy="no", report_to=[], bf16=bf16,
                                 use_cpu=not torch.cuda.is_available(), dataloader_num_workers=0,
                                 disable_tqdm=True, seed=0, remove_unused_columns=False, **grouped)
        (InOrder if in_order else Trainer)(model=model, args=args, train_dataset=data, data_collator=collate_items,
                                           callbacks=[Clock()]).train()
    # step i (from 1) took ends[i] - ends[i - 1] and trained batch i (the collator runs in step order)
    rates = [tokens[i] / (ends[i] - ends[i - 1]) for i in range(1, min(len(ends), steps))]
    secs = ends[-1] - ends[0]
    out = {"tokens_per_s": statistics.median(rates), "tokens_per_s_total": sum(tokens[1:len(ends)]) / secs,
           "seconds": secs}
    if torch.cuda.is_available():
        out["peak_memory_gb"] = torch.cuda.max_memory_allocated() / 2 ** 30
    return out
