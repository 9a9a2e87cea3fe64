"""`make bench`: throughput of each stage on this machine, printed as a table.

    python -m pipeline.bench [--rows 64]

- generate: the hf backend on demo prompts, with and without top-k capture (its overhead);
- filter: traces/s over GSM8K's human train solutions (../shared/datasets/gsm8k, when
  present) treated as teacher traces, else over synthetic demo traces;
- train: seconds per DSS optimizer step (predict + explain) of the embedded student with LoRA.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from pathlib import Path

import numpy as np


def bench_generate(rows: int) -> list[tuple[str, str]]:
    from pipeline.config import load_config
    from pipeline.tasks import load_split
    from stages.backends import HFBackend, SamplingSettings
    from stages.generate import PromptTemplate

    cfg = load_config("configs/demo.yaml", [f"task.n_train={rows}"])
    template = PromptTemplate(cfg.generate.prompt_template)
    prompts = [template.render(q) for q in load_split(cfg.task, "train").column(
        "question").to_pylist()]
    backend = HFBackend(cfg.generate.model, cfg.generate.dtype)
    out = []
    for k in (cfg.generate.top_k, 0):
        s = SamplingSettings(n=1, temperature=cfg.generate.temperature, top_p=1.0,
                             max_new_tokens=cfg.generate.max_new_tokens, top_k=k, seed=0, stop=[])
        backend.generate(prompts[:4], s)  # warm-up
        t = time.perf_counter()
        gens = backend.generate(prompts, s)
        dt = time.perf_counter() - t
        tokens = sum(int(g[0].token_ids.shape[0]) for g in gens)
        label = f"generate hf, batch {len(prompts)}, top-{k}" if k else \
            f"generate hf, batch {len(prompts)}, no log-probs"
        out.append((label, f"{len(prompts) / dt:.2f} rows/s, {tokens / dt:.0f} tokens/s"))
    return out


def bench_filter() -> list[tuple[str, str]]:
    from pipeline.config import FilterConfig
    from stages.backends import Generation
    from stages.filter import filter_shard
    from stages.generate import traces_table

    gsm = Path(__file__).resolve().parents[1].parent / "shared/datasets/gsm8k/train.jsonl"
    if gsm.is_file():
        from pipeline.tasks import gsm8k_gold

        data = [json.loads(line) for line in gsm.open()]
        texts = [d["answer"] for d in data]
        golds = [gsm8k_gold(d["answer"]) for d in data]
        source = f"GSM8K train solutions ({len(texts)})"
    else:
        texts = [f"She has {i} + 3 = {i + 3} apples. The answer is {i + 3}." for i in range(5000)]
        golds = [str(i + 3) for i in range(5000)]
        source = "synthetic traces (5000)"
    gens = [Generation(t, "stop", np.zeros(len(t) // 4, np.int32), np.zeros(len(t) // 4,
                       np.float32), np.zeros((0, 0), np.int32), np.zeros((0, 0), np.float32))
            for t in texts]
    recs = [{"id": str(i), "sample": 0, "question": "", "gold": g, "prompt": "",
             "completion": t, "finish_reason": "stop", "error": None}
            for i, (t, g) in enumerate(zip(texts, golds))]
    table = traces_table(recs, gens, 0)
    cfg = FilterConfig(max_tokens=100000)
    t = time.perf_counter()
    out = filter_shard(table, cfg, numeric=True)
    dt = time.perf_counter() - t
    kept = out.counters["kept"]
    return [(f"filter, {source}", f"{len(texts) / dt:,.0f} traces/s, kept {kept}/{len(texts)}")]


def bench_train(steps: int = 4) -> list[tuple[str, str]]:
    import tempfile

    import torch
    from datasets import Dataset
    from transformers import TrainingArguments

    from pipeline.config import TrainConfig
    from pipeline.models import load_tokenizer, resolve_model
    from trainer.dss import DSSTrainer
    from trainer.examples import PairCollator, build_examples
    from trainer.model import lora_student

    cfg = TrainConfig(batch_size=8)
    path = resolve_model(cfg.student)
    tok = load_tokenizer(path, padding_side="right")
    rows = [{"question": f"Anna has {i} apples. She buys 3 more apples. How many apples does "
             f"Anna have now?", "gold": str(i + 3), "pred_answer": str(i + 3),
             "rationale": f"Anna starts with {i} apples. She buys 3 more, so {i} + 3 = {i + 3}."}
            for i in range(cfg.batch_size * (steps + 1))]
    model = lora_student(path, cfg)
    with tempfile.TemporaryDirectory() as tmp:
        args = TrainingArguments(output_dir=tmp, report_to="none", use_cpu=True,
                                 remove_unused_columns=False, max_steps=steps + 1,
                                 per_device_train_batch_size=cfg.batch_size, save_strategy="no",
                                 disable_tqdm=True, logging_steps=1000)
        times = []

        class Clock(DSSTrainer):
            def training_step(self, *a, **k):
                t = time.perf_counter()
                out = super().training_step(*a, **k)
                times.append(time.perf_counter() - t)
                return out

        Clock(model=model, args=args, alpha=0.5, train_dataset=Dataset.from_list(
            build_examples(rows, tok, cfg.max_length)),
            data_collator=PairCollator(tok.pad_token_id)).train()
    per_step = float(np.median(times[1:]))
    return [(f"train DSS step, batch {cfg.batch_size} (x2 tasks), LoRA r={cfg.lora_r}",
             f"{per_step:.2f} s/step, {torch.get_num_threads()} threads")]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=64, help="prompts in the generate batch")
    args = parser.parse_args()
    rows = [("machine", f"{platform.machine()}, {os.cpu_count()} CPUs, "
             f"Python {platform.python_version()}")]
    rows += bench_filter()
    rows += bench_generate(args.rows)
    rows += bench_train()
    width = max(len(r[0]) for r in rows)
    for name, value in rows:
        print(f"{name:<{width}}  {value}")


if __name__ == "__main__":
    main()
