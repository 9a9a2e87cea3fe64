"""`make bench`: throughput of each stage on this machine, printed as a table.

    python -m pipeline.bench [--rows 64] [--gen-rows 128] [--skip-backends]

- generate backends: the demo's generate stage on the same prompts through the hf backend,
  the vLLM engine and the openai backend against a local vLLM server (each in its own
  process, after a warm-up): rows/s, generated tokens/s, the share of the stage's wall time
  spent outside the engine (or, for openai, outside waiting on the server), bytes per
  generated token of the written shards. vLLM rows are skipped when vllm is not installed;
- generate: the hf backend on demo prompts, with and without top-k capture (its overhead);
- filter: traces/s over GSM8K's human train solutions (../shared/datasets/gsm8k, when
  present) treated as teacher traces, else over synthetic demo traces;
- train: seconds per DSS optimizer step (predict + explain) of the embedded student with LoRA,
  without KD and with KD from stored top-20 rows (same batches).
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


def generate_once(backend: str, rows: int, base_url: str | None = None) -> dict:
    """One warm generate stage run with `backend` (in this process); its timings as a dict."""
    import tempfile

    from pipeline.config import load_config
    from stages import generate
    from stages.backends import SamplingSettings

    over = [f"task.n_train={rows}", f"generate.backend={backend}",
            f"generate.rows_per_shard={min(rows, 64)}"]
    if backend == "openai":
        over += [f"generate.base_url={base_url}", "generate.endpoint=completions",
                 "generate.server_token_ids=true", "generate.tokenizer=smollm2-135m-instruct",
                 "generate.concurrency=64"]
    cfg = load_config("configs/demo.yaml", over)
    made: dict = {}
    real = generate.make_backend

    def warmed(*args, **kwargs):  # the first batch of an engine is slow; keep it out
        backend_ = real(*args, **kwargs)
        prompts = [f"Q: {i} + 1 = ?" for i in range(8)]
        t = time.perf_counter()
        backend_.generate(prompts, SamplingSettings(2, 0.7, 1.0, 16, 20, 1, []))
        made.update(backend=backend_, warm_s=time.perf_counter() - t)
        backend_.stats["engine_s"] = 0.0
        return backend_

    generate.make_backend = warmed
    try:
        with tempfile.TemporaryDirectory() as tmp:
            t = time.perf_counter()
            manifest = generate.main(cfg, Path(tmp), force=True)
            wall = time.perf_counter() - t
            size = sum(f.stat().st_size for f in (Path(tmp) / "generate").glob("traces-*"))
    finally:
        generate.make_backend = real
    b = made["backend"]
    c = manifest["counters"]
    return {"backend": backend, "work_s": wall - b.startup_s - made["warm_s"],
            "startup_s": b.startup_s, "engine_s": b.stats["engine_s"], "rows": c["rows"],
            "traces": c["traces"], "tokens": c["tokens"], "errors": c["errors"],
            "bytes": size, "usable_for_kd": manifest["facts"].get("usable_for_kd", True)}


def _generate_in_child(backend: str, rows: int, base_url: str | None = None) -> dict:
    import subprocess
    import sys

    args = [sys.executable, "-m", "pipeline.bench", "--one", backend, "--gen-rows", str(rows)]
    if base_url:
        args += ["--base-url", base_url]
    done = subprocess.run(args, capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"the {backend} generate run failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def bench_backends(rows: int) -> list[tuple[str, str]]:
    import importlib.util

    results = [_generate_in_child("hf", rows)]
    if importlib.util.find_spec("vllm") is None:
        skipped = "skipped: vllm is not installed (make setup installs it unless VLLM=)"
        notes = [("generate vllm", skipped), ("generate openai -> local vLLM server", skipped)]
    else:
        from stages.vllm_server import local_vllm_server

        notes = []
        results.append(_generate_in_child("vllm", rows))
        with local_vllm_server("smollm2-135m-instruct", kv_cache_gb=4) as server:
            results.append(_generate_in_child("openai", rows, server.base_url))
        results[-1]["server_startup_s"] = server.startup_s
    out = []
    for r in results:
        name = {"hf": "generate hf (transformers, batch 64)", "vllm": "generate vllm (engine)",
                "openai": "generate openai -> local vLLM server (completions, 64 in flight)"}
        outside = 1 - r["engine_s"] / r["work_s"]
        out.append((name[r["backend"]] + f", {r['rows']} rows x 2",
                    f"{r['rows'] / r['work_s']:.2f} rows/s, {r['tokens'] / r['work_s']:.0f} "
                    f"tokens/s, {100 * outside:.1f}% of the time outside the engine "
                    f"({100 * outside / (1 - outside):.1f}% of engine time), "
                    f"{r['bytes'] / max(r['tokens'], 1):.0f} bytes/token, start-up "
                    f"{r['startup_s']:.0f}s"
                    + (f" (+{r['server_startup_s']:.0f}s server)" if "server_startup_s" in r
                       else "")))
    return out + notes


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
    """Seconds per DSS optimizer step without KD and with KD from stored top-20 rows, on the
    same batches (the teacher's top-k here are random: only the cost is measured)."""
    import tempfile

    import torch
    from datasets import Dataset
    from transformers import TrainingArguments
    from transformers.trainer_callback import PrinterCallback

    from pipeline.config import TrainConfig
    from pipeline.models import load_tokenizer, resolve_model
    from trainer.dss import DSSTrainer
    from trainer.examples import PairCollator, build_kd_examples
    from trainer.model import lora_student

    cfg = TrainConfig(batch_size=8)
    path = resolve_model(cfg.student)
    tok = load_tokenizer(path, padding_side="right")
    rng = np.random.default_rng(0)
    rows = []
    for i in range(cfg.batch_size * (steps + 1)):
        rationale = f"Anna starts with {i} apples. She buys 3 more, so {i} + 3 = {i + 3}."
        completion = f" {rationale} The answer is {i + 3}."
        ids = tok(completion, add_special_tokens=False)["input_ids"]
        lps = np.sort(rng.uniform(-12, 0, (len(ids), 20)), axis=1)[:, ::-1]
        rows.append({"question": f"Anna has {i} apples. She buys 3 more apples. How many "
                     "apples does Anna have now?", "gold": str(i + 3), "pred_answer": str(i + 3),
                     "rationale": rationale, "completion": completion, "token_ids": ids,
                     "topk_ids": rng.integers(0, len(tok), (len(ids), 20)).tolist(),
                     "topk_logprobs": lps.tolist()})
    examples = build_kd_examples(rows, tok, cfg.max_length)
    out = []
    for lam in (0.0, 0.5):
        torch.manual_seed(0)
        model = lora_student(path, cfg)
        times = []

        class Clock(DSSTrainer):
            def training_step(self, *a, **k):
                t = time.perf_counter()
                result = super().training_step(*a, **k)
                times.append(time.perf_counter() - t)
                return result

        with tempfile.TemporaryDirectory() as tmp:
            args = TrainingArguments(output_dir=tmp, report_to="none", use_cpu=True,
                                     remove_unused_columns=False, max_steps=steps + 1,
                                     per_device_train_batch_size=cfg.batch_size,
                                     save_strategy="no", disable_tqdm=True, logging_steps=1000)
            clock = Clock(model=model, args=args, alpha=0.5, kd_lam=lam,
                          train_dataset=Dataset.from_list(examples),
                          data_collator=PairCollator(tok.pad_token_id))
            clock.remove_callback(PrinterCallback)  # keep the table the only output
            clock.train()
        out.append((lam, float(np.median(times[1:]))))
    (_, plain), (_, kd) = out
    name = f"train DSS step, batch {cfg.batch_size} (x2 tasks), LoRA r={cfg.lora_r}"
    return [(name + ", no KD", f"{plain:.2f} s/step, {torch.get_num_threads()} threads"),
            (name + ", KD top-20 (lam 0.5)", f"{kd:.2f} s/step, "
             f"{100 * (kd / plain - 1):+.1f}% over no KD")]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=64, help="prompts in the generate batch")
    parser.add_argument("--gen-rows", type=int, default=128,
                        help="task rows for the backend comparison (2 samples each)")
    parser.add_argument("--skip-backends", action="store_true",
                        help="leave out the backend comparison (it takes a few minutes)")
    parser.add_argument("--one", help=argparse.SUPPRESS)        # internal: one backend run
    parser.add_argument("--base-url", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        print(json.dumps(generate_once(args.one, args.gen_rows, args.base_url)))
        return
    rows = [("machine", f"{platform.machine()}, {os.cpu_count()} CPUs, "
             f"Python {platform.python_version()}")]
    rows += bench_filter()
    rows += bench_generate(args.rows)
    if not args.skip_backends:
        rows += bench_backends(args.gen_rows)
    rows += bench_train()
    width = max(len(r[0]) for r in rows)
    for name, value in rows:
        print(f"{name:<{width}}  {value}")


if __name__ == "__main__":
    main()
