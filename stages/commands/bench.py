"""`make bench`: throughput of each stage on this machine, printed as a table.

    python -m stages.commands.bench [--rows 64] [--gen-rows 128] [--skip-backends] [--only scale]

- generate backends: the demo's generate stage on the same prompts through the hf backend,
  the vLLM engine and the openai backend against a local vLLM server (each in its own
  process, after a warm-up): rows/s, generated tokens/s, the share of the stage's wall time
  spent outside the engine (or, for openai, outside waiting on the server), bytes per
  generated token of the written shards. vLLM rows are skipped when vllm is not installed;
- generate: the hf backend on demo prompts, with and without top-k capture (its overhead);
- filter: traces/s over GSM8K's human train solutions (../shared/datasets/gsm8k, when
  present) treated as teacher traces, else over synthetic demo traces;
- scale: the generate stage on the hf backend with 2 Ray workers, and with 2 job-array
  processes, vs 1 local worker, one thread each, same rows (checked): the whole stage's wall
  time, start-up included;
- shards: the demo run's generate shards (`--shard-run`, default data/runs/demo) written in
  format 1 (float32 top-k) and format 2 (compact): bytes per generated token, encoding and
  decoding throughput (MB/s of decoded top-k), the trainer's read of either, and the KD loss
  the trainer computes from either (the embedded student under the explain prompt, float32):
  mean absolute difference per trace;
- capture: what asking vLLM for the top-20 costs the engine (tokens/s with logprobs=20 and
  without, same prompts and seeds) and what encoding the shard costs, on the demo's prompts;
- score: the teacher scoring traces (what `distill iterate` asks of it for a student's
  traces) on vLLM, with every prompt read in full and with the few-shot prefix read from the
  engine's prefix cache: seconds each, and that the two give the same numbers;
- students: the loop's sampling, a distilled student (the embedded model with an adapter of
  the training's rank) sampling `explain:` rationales in vLLM, served through vLLM's LoRA
  support and with the adapter merged into the weights (`vllm.students`): tokens/s of each,
  and how many samples the two make alike;
- train: seconds per optimizer step and peak memory of the embedded student with LoRA (same
  traces, batch and sequence length): DSS (predict + explain) without KD, DSS with KD from
  stored top-20 rows, and TRL's GKDTrainer, which runs the teacher at every step (the online
  path that stored log-probabilities replace). Each in its own process.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import time
from pathlib import Path

import numpy as np


def bench_generate(rows: int) -> list[tuple[str, str]]:
    from pipeline.config import load_config
    from pipeline.prompts import PromptTemplate
    from pipeline.tasks import load_split
    from stages.backends.base import SamplingSettings
    from stages.backends.hf import HFBackend

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
    from pipeline.run_folder import RunFolder
    from stages.generate import stage as generate
    from stages.backends.base import SamplingSettings

    over = [f"task.n_train={rows}", f"generate.backend={backend}",
            f"generate.rows_per_shard={min(rows, 64)}"]
    if backend == "openai":
        over += [f"generate.base_url={base_url}", "generate.endpoint=completions",
                 "generate.server_token_ids=true", "generate.tokenizer=smollm2-135m-instruct",
                 "generate.concurrency=64"]
    cfg = load_config("configs/demo.yaml", over)
    made: dict = {}
    with tempfile.TemporaryDirectory() as tmp:
        run = RunFolder(tmp)
        configured = generate.teacher_factory(cfg, run.stage("generate"))

        def warmed():  # the first batch of an engine is slow; keep it out
            teacher = configured()
            prompts = [f"Q: {i} + 1 = ?" for i in range(8)]
            t = time.perf_counter()
            teacher.generate(prompts, SamplingSettings(2, 0.7, 1.0, 16, 20, 1, []))
            made.update(backend=teacher, warm_s=time.perf_counter() - t)
            teacher.stats["engine_s"] = 0.0
            return teacher

        t = time.perf_counter()
        manifest = generate.main(cfg, run, force=True, teacher=warmed)
        wall = time.perf_counter() - t
    b = made["backend"]
    c = manifest["counters"]
    return {"backend": backend, "work_s": wall - b.startup_s - made["warm_s"],
            "startup_s": b.startup_s, "engine_s": b.stats["engine_s"], "rows": c["rows"],
            "traces": c["traces"], "tokens": c["tokens"], "errors": c["errors"],
            "bytes": sum(f["bytes"] for f in manifest["files"]),
            "usable_for_kd": manifest["facts"].get("usable_for_kd", True)}


def _generate_in_child(backend: str, rows: int, base_url: str | None = None) -> dict:
    args = ["--one", backend, "--gen-rows", str(rows)] + (["--base-url", base_url]
                                                          if base_url else [])
    return _in_child(args, f"{backend} generate")


def bench_backends(rows: int) -> list[tuple[str, str]]:
    import importlib.util

    results = [_generate_in_child("hf", rows)]
    if importlib.util.find_spec("vllm") is None:
        skipped = "skipped: vllm is not installed (make setup installs it unless VLLM=)"
        notes = [("generate vllm", skipped), ("generate openai -> local vLLM server", skipped)]
    else:
        from stages.backends.vllm_server import local_vllm_server

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


def scale_once(executor: str, rows: int) -> dict:
    """The generate stage on the hf backend (float32) with the local executor, 2 Ray workers
    or 2 job-array processes, each worker on one thread: wall time of the whole stage (every
    worker's model load included; the local Ray cluster's start-up timed apart) and a digest
    of the rows it wrote."""
    import tempfile

    from pipeline.config import load_config
    from pipeline.run_folder import RunFolder
    from stages.generate import stage as generate

    over = [f"task.n_train={rows}", "generate.backend=hf", "generate.dtype=float32",
            "generate.rows_per_shard=4", "generate.batch_size=8"]
    if executor == "ray":
        over += ["generate.executor=ray", "generate.workers=2", "ray.num_cpus_per_worker=1",
                 "ray.local_cpus=2"]
    cfg = load_config("configs/demo.yaml", over)
    cluster_s = 0.0
    with tempfile.TemporaryDirectory() as tmp:
        t = time.perf_counter()
        if executor == "array":  # two worker processes at once, then --finalize
            import subprocess
            import sys

            cmd = [sys.executable, "-m", "stages.commands.cli", "generate", "--config",
                   "configs/demo.yaml", "--runs-dir", tmp, "--run", "r", *over]
            env = {**os.environ, "OMP_NUM_THREADS": "1"}
            workers = [subprocess.Popen(cmd + ["--num-workers", "2", "--worker-index", str(i)],
                                        env=env, stderr=subprocess.DEVNULL) for i in range(2)]
            if [w.wait() for w in workers] != [0, 0]:
                raise RuntimeError("a job-array worker failed")
            subprocess.run(cmd + ["--finalize"], check=True, stderr=subprocess.DEVNULL)
            run = RunFolder(f"{tmp}/r")
            manifest = run.stage("generate").manifest()
        else:
            if executor == "ray":  # the cluster first, timed on its own; the stage joins it
                import ray

                ray.init(num_cpus=2, include_dashboard=False)
                cluster_s = time.perf_counter() - t
                t = time.perf_counter()
            run = RunFolder(tmp)
            manifest = generate.main(cfg, run, force=True)
            if executor == "ray":
                ray.shutdown()
        wall = time.perf_counter() - t
        folder = run.stage("generate")
        table = folder.read_tables(manifest["files"],
                                   ["id", "sample", "token_ids", "topk_ids"])
    digest = hashlib.sha256(json.dumps(table.to_pylist()).encode()).hexdigest()[:16]
    return {"executor": executor, "wall_s": wall, "cluster_s": cluster_s,
            "rows": manifest["counters"]["rows"],
            "tokens": manifest["counters"]["tokens"], "digest": digest}


def bench_scale(rows: int) -> list[tuple[str, str]]:
    """2 Ray workers vs 1 local worker, same rows, one thread per worker (each in a process of
    its own: OMP_NUM_THREADS=1 for the local one, Ray gives an actor as many threads as CPUs);
    and two job-array processes, the same parallelism without Ray."""
    local = _in_child(["--one-scale", "local", "--gen-rows", str(rows)], "local generate",
                      {"OMP_NUM_THREADS": "1"})
    name = f"generate hf float32, {local['rows']} rows x 2, 1 thread per worker"
    out = [(name + ": 1 local worker", f"{local['tokens'] / local['wall_s']:.1f} tokens/s, "
            f"{local['wall_s']:.0f}s")]
    for executor, label in (("ray", "2 Ray workers"),
                            ("array", "2 job-array processes + --finalize")):
        r = _in_child(["--one-scale", executor, "--gen-rows", str(rows)], f"{executor} generate")
        same = "same rows and token ids" if r["digest"] == local["digest"] else "ROWS DIFFER"
        started = ""
        if r["cluster_s"]:
            with_start = r["wall_s"] + r["cluster_s"]
            started = (f" (+{r['cluster_s']:.0f}s to start the local Ray cluster: "
                       f"{local['wall_s'] / with_start:.2f}x with it)")
        out.append((name + ": " + label, f"{r['tokens'] / r['wall_s']:.1f} tokens/s, "
                    f"{r['wall_s']:.0f}s, {local['wall_s'] / r['wall_s']:.2f}x the local "
                    f"worker{started}; {same}"))
    return out


def bench_filter() -> list[tuple[str, str]]:
    """The full default filter (answers, arithmetic, steps, length, repetition, duplicates) on
    GSM8K's human train solutions taken as teacher traces with their gold answers; one
    process, one thread. Prints the funnel too."""
    from stages.checks.settings import FilterConfig
    from pipeline.schema import traces_table
    from pipeline.stage import Shard
    from stages.backends.base import Generation
    from stages.checks.answers import AnswerChecker
    from stages.filter.stage import FilterSettings, filter_shard, funnel_table

    gsm = Path(__file__).resolve().parents[2].parent / "shared/datasets/gsm8k/train.jsonl"
    if gsm.is_file():
        from pipeline.tasks import gsm8k_gold

        data = [json.loads(line) for line in gsm.open()]
        texts = [d["answer"] for d in data]
        golds = [gsm8k_gold(d["answer"]) for d in data]
        questions = [d["question"] for d in data]
        source = f"GSM8K train solutions ({len(texts)})"
    else:
        texts = [f"She has {i} + 3 = {i + 3} apples. The answer is {i + 3}." for i in range(5000)]
        golds = [str(i + 3) for i in range(5000)]
        questions = [f"She has {i} apples and gets 3 more. How many?" for i in range(5000)]
        source = "synthetic traces (5000)"
    # token counts from the embedded model's tokenizer, as if it had written them
    from pipeline.models import load_tokenizer, resolve_model

    tok = load_tokenizer(resolve_model("smollm2-135m-instruct"))
    ids = tok(texts, add_special_tokens=False)["input_ids"]
    # no top-k (k = 0): an empty row for every token, as a backend asked for none gives
    gens = [Generation(t, "stop", np.asarray(i, np.int32), np.zeros(len(i), np.float32),
                       np.zeros((len(i), 0), np.int32), np.zeros((len(i), 0), np.float32))
            for t, i in zip(texts, ids)]
    recs = [{"id": str(i), "sample": 0, "question": q, "gold": g, "prompt": "",
             "completion": t, "finish_reason": "stop", "error": None}
            for i, (t, g, q) in enumerate(zip(texts, golds, questions))]
    table = traces_table(recs, gens, 0)
    cfg = FilterConfig()
    params = FilterSettings(cfg, AnswerChecker("numeric", cfg.extractors, cfg.tolerance))
    best = float("inf")
    for _ in range(3):  # the best of three: the machine's other work only slows a run down
        t = time.perf_counter()
        out = filter_shard(params, Shard.of("gsm8k", table))
        best = min(best, time.perf_counter() - t)
    kept = out.counters["kept"]
    print(f"filter funnel, {source}, default settings:\n{funnel_table(out.counters)}")
    rejected = out.tables["rejected"].select(["id", "reason", "detail"]).to_pylist()
    for r in rejected:  # each one is explained in the README ("The filter")
        print(f"  rejected row {r['id']}: {r['reason']}" + (f": {r['detail']}" if r["detail"]
                                                           else ""))
    print()
    return [(f"filter, {source}, default settings, 1 thread",
             f"{len(texts) / best:,.0f} traces/s, kept {kept}/{len(texts)} "
             f"({100 * (1 - kept / len(texts)):.2f}% rejected)"),
            verification_cost(recs[:2000], gens[:2000], params)]


def verification_cost(recs: list[dict], gens: list, params) -> tuple[str, str]:
    """What checking a shard against its manifest costs the stage that reads it: the traces
    as a generate shard with top-20 log-probabilities (random values of the real shape, so the
    file is as large as a real one), written to a run folder; then the filter's read of it,
    with and without the sha256 check, and its work on it. Best of three each."""
    import tempfile

    from pipeline.run_folder import RunFolder
    from pipeline.schema import traces_table
    from pipeline.stage import Shard
    from stages.backends.base import Generation
    from stages.filter.stage import filter_shard

    rng = np.random.default_rng(0)
    k = 20
    full = [Generation(g.text, g.finish_reason, g.token_ids,
                       -rng.random(len(g.token_ids), dtype=np.float32),
                       rng.integers(0, 49152, (len(g.token_ids), k), dtype=np.int32),
                       np.sort(-rng.exponential(2.0, (len(g.token_ids), k))
                               .astype(np.float32), axis=1)[:, ::-1].copy())
            for g in gens]
    table = traces_table(recs, full, k, fmt=1)  # float32 top-k: the size the README quotes
    with tempfile.TemporaryDirectory() as tmp:
        folder = RunFolder(tmp).stage("generate")
        entry = folder.write_table("traces-00000.parquet", table, {})

        def best(fn) -> float:
            times = []
            for _ in range(3):
                t = time.perf_counter()
                fn()
                times.append(time.perf_counter() - t)
            return min(times)

        data = Path(folder.path(entry["file"])).read_bytes()
        plain = best(lambda: folder.read_table(entry["file"]))
        checked = best(lambda: folder.read_checked(entry))
        digest = best(lambda: hashlib.sha256(data).hexdigest())
        work = best(lambda: filter_shard(params, Shard.of("x", table)))
    stage = checked + work
    return (f"shard check on read (sha256), {len(recs)} traces with top-{k}, "
            f"{entry['bytes'] / 2**20:.0f} MiB shard",
            f"the sha256 takes {1000 * digest:.0f} ms of the {1000 * stage:.0f} ms the filter "
            f"takes to read and filter the shard: {100 * digest / stage:.1f}% (the checked "
            f"read, bytes read once then hashed and parsed: {1000 * checked:.0f} ms; pyarrow's "
            f"own read, unchecked: {1000 * plain:.0f} ms)")


def _train_rows(tok, n: int, k: int = 20) -> list[dict]:
    """Synthetic kept traces of the demo's shape with random top-k rows (only cost is measured)."""
    rng = np.random.default_rng(0)
    rows = []
    for i in range(n):
        rationale = f"Anna starts with {i} apples. She buys 3 more, so {i} + 3 = {i + 3}."
        completion = f" {rationale} The answer is {i + 3}."
        ids = tok(completion, add_special_tokens=False)["input_ids"]
        lps = np.sort(rng.uniform(-12, 0, (len(ids), k)), axis=1)[:, ::-1]
        rows.append({"question": f"Anna has {i} apples. She buys 3 more apples. How many "
                     "apples does Anna have now?", "gold": str(i + 3), "pred_answer": str(i + 3),
                     "rationale": rationale, "completion": completion, "token_ids": ids,
                     "topk_ids": rng.integers(0, len(tok), (len(ids), k)).tolist(),
                     "topk_logprobs": lps.tolist()})
    return rows


def _peak_mb() -> float:
    import resource
    import sys

    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 2**20 if sys.platform == "darwin" else peak / 1024  # bytes on macOS, KiB else


# our trainer's variants: the settings each adds to DSS (alpha 0.5)
TRAIN_SETTINGS = {"dss": {}, "dss-kd": {"kd_lam": 0.5},
                  "dss-answer-kd": {"answer_kd_lam": 0.5},
                  "dss-cosine": {"rationale_loss": "cosine"},
                  "dss-consistency": {"consistency_lam": 0.5}}


def train_once(variant: str, steps: int) -> dict:
    """One training variant in this process: median seconds per optimizer step after the first,
    and peak memory (process RSS; on a GPU also torch's peak allocation).

    `dss` and `dss-kd` are our trainer without KD and with KD from stored top-20 rows; `trl` is
    TRL's GKDTrainer with lmbda=0 (the dataset's completions, no student sampling) and beta=0
    (forward KL), whose teacher, the embedded model itself, runs at every step. All three see the
    same 8 traces per step: 8 predict + 8 explain sequences (TRL: one batch of those 16).
    """
    import tempfile

    import torch
    from datasets import Dataset
    from transformers.trainer_callback import PrinterCallback

    from trainer.settings import TrainConfig
    from pipeline.models import load_tokenizer, resolve_model
    from trainer.examples import DSSCollator, build_examples
    from trainer.lora import lora_student
    from trainer.losses import terms_from_settings
    from trainer.students import student_for

    cfg = TrainConfig(batch_size=8, **TRAIN_SETTINGS.get(variant, {}))
    path = resolve_model(cfg.student)
    student = student_for(path)
    tok = load_tokenizer(path, padding_side="right")
    terms = terms_from_settings(cfg)
    topk = {term.part for term in terms if "topk" in term.needs}
    examples = build_examples(_train_rows(tok, cfg.batch_size * (steps + 1)), tok, student,
                              cfg.max_length, teacher_tokens=True, with_topk="explain" in topk,
                              answer_tokens="predict" in topk)
    torch.manual_seed(0)
    model = lora_student(path, cfg, student)
    cuda = torch.cuda.is_available()
    times: list[float] = []

    common = dict(report_to="none", use_cpu=not cuda, remove_unused_columns=False,
                  max_steps=steps + 1, save_strategy="no", disable_tqdm=True,
                  logging_steps=1000, dataloader_num_workers=0, seed=0)
    with tempfile.TemporaryDirectory() as tmp:
        if variant in TRAIN_SETTINGS:
            from trl import SFTConfig

            from trainer.dss import DSSTrainer

            args = SFTConfig(output_dir=tmp, per_device_train_batch_size=cfg.batch_size,
                             bf16=False, gradient_checkpointing=False,
                             dataset_kwargs={"skip_prepare_dataset": True}, **common)
            trainer = _clocked(DSSTrainer, times)(
                model=model, args=args, terms=terms, student=student, processing_class=tok,
                train_dataset=Dataset.from_list(examples),
                data_collator=DSSCollator(student, tok.pad_token_id))
        elif variant == "trl":
            trainer = _gkd_trainer(times, model, path, cfg, examples, tok,
                                   dict(output_dir=tmp, **common))
        else:
            raise ValueError(f"unknown training variant {variant!r}")
        trainer.remove_callback(PrinterCallback)
        loaded_mb = _peak_mb()
        if cuda:
            torch.cuda.reset_peak_memory_stats()
        trainer.train()
    out = {"variant": variant, "s_per_step": float(np.median(times[1:])), "steps": len(times),
           "peak_rss_mb": _peak_mb(), "loaded_rss_mb": loaded_mb,
           "threads": torch.get_num_threads()}
    if cuda:
        out["cuda_peak_mb"] = torch.cuda.max_memory_allocated() / 2**20
    return out


def _clocked(cls, times: list[float]):
    """A trainer class that appends the seconds of each optimizer step to `times`."""
    import torch

    cuda = torch.cuda.is_available()

    class Clock(cls):
        def training_step(self, *a, **k):
            if cuda:
                torch.cuda.synchronize()
            t = time.perf_counter()
            result = super().training_step(*a, **k)
            if cuda:
                torch.cuda.synchronize()
            times.append(time.perf_counter() - t)
            return result
    return Clock


def _gkd_trainer(times: list[float], model, path, cfg, examples: list[dict], tok, common: dict):
    """TRL's GKDTrainer on the same records (lmbda=0, beta=0: forward KL on the dataset's
    completions), its teacher the embedded model itself."""
    import warnings

    import torch
    from transformers import AutoModelForCausalLM

    os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
    from trl.experimental.gkd import GKDConfig, GKDTrainer

    teacher = AutoModelForCausalLM.from_pretrained(path, dtype=getattr(torch, cfg.dtype))
    flat = [{"input_ids": ex[p]["input_ids"], "labels": ex[p]["labels"]}
            for ex in examples for p in ("predict", "explain")]

    def collate(features):
        width = max(len(f["input_ids"]) for f in features)
        pad = lambda xs, v: xs + [v] * (width - len(xs))  # noqa: E731
        return {"input_ids": torch.tensor([pad(f["input_ids"], tok.pad_token_id)
                                           for f in features]),
                "labels": torch.tensor([pad(f["labels"], -100) for f in features]),
                "attention_mask": torch.tensor([pad([1] * len(f["input_ids"]), 0)
                                                for f in features])}

    args = GKDConfig(per_device_train_batch_size=2 * cfg.batch_size,
                     lmbda=0.0, beta=0.0, temperature=1.0, seq_kd=False, bf16=False,
                     gradient_checkpointing=False, max_length=cfg.max_length,
                     learning_rate=cfg.learning_rate, shuffle_dataset=False, **common)
    from datasets import Dataset

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return _clocked(GKDTrainer, times)(model=model, teacher_model=teacher, args=args,
                                           train_dataset=Dataset.from_list(flat),
                                           data_collator=collate, processing_class=tok)


def _in_child(args: list[str], what: str, env: dict | None = None) -> dict:
    import subprocess
    import sys

    done = subprocess.run([sys.executable, "-m", "stages.commands.bench", *args],
                          capture_output=True, text=True, env={**os.environ, **(env or {})})
    if done.returncode != 0:
        raise RuntimeError(f"the {what} run failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def bench_train(steps: int = 8) -> list[tuple[str, str]]:
    """Seconds per optimizer step and peak memory: DSS without KD, with KD from stored top-20
    rows, and TRL's online distillation (teacher forward at every step); each in its own
    process so that memory peaks do not mix."""
    import importlib.util

    variants = list(TRAIN_SETTINGS) + (["trl"] if importlib.util.find_spec("trl") else [])
    res = {v: _in_child(["--one-train", v, "--train-steps", str(steps)], f"{v} training")
           for v in variants}
    plain = res["dss"]["s_per_step"]

    def mem(r: dict) -> str:
        text = f"peak RSS {r['peak_rss_mb']:,.0f} MB ({r['peak_rss_mb'] - r['loaded_rss_mb']:+,.0f} " \
               "MB in training)"
        return text + (f", GPU peak {r['cuda_peak_mb']:,.0f} MB" if "cuda_peak_mb" in r else "")

    name = "train step, 8 traces (8 predict + 8 explain sequences), LoRA r=16"
    out = [(name + ": DSS, no KD", f"{plain:.2f} s/step, {mem(res['dss'])}, "
            f"{res['dss']['threads']} threads"),
           (name + ": DSS + KD from stored top-20", f"{res['dss-kd']['s_per_step']:.2f} s/step "
            f"({100 * (res['dss-kd']['s_per_step'] / plain - 1):+.1f}%), {mem(res['dss-kd'])}")]
    for v, what in (("dss-answer-kd", "DSS + answer KD (answer_kd_lam 0.5)"),
                    ("dss-cosine", "DSS, margin cosine rationale loss"),
                    ("dss-consistency", "DSS + consistency (a second predict: forward)")):
        out.append((f"{name}: {what}", f"{res[v]['s_per_step']:.2f} s/step "
                    f"({100 * (res[v]['s_per_step'] / plain - 1):+.1f}%), {mem(res[v])}"))
    if "trl" in res:
        out.append((name + ": TRL GKDTrainer, online teacher (lmbda=0)",
                    f"{res['trl']['s_per_step']:.2f} s/step "
                    f"({100 * (res['trl']['s_per_step'] / plain - 1):+.1f}%), {mem(res['trl'])}"))
    else:
        out.append((name + ": TRL GKDTrainer", "skipped: trl is not installed"))
    return out


def _shard_tables(run_dir: str):
    """The finished generate shards of `run_dir`, read as stored, with the tokens they hold."""
    from pipeline.run_folder import RunFolder

    folder = RunFolder(run_dir).stage("generate")
    manifest = folder.manifest()
    if manifest is None:
        return None, 0
    tables = [folder.read_checked(e) for e in manifest["files"]]
    tokens = sum(int(pc_sum(t)) for t in tables)
    return tables, tokens


def _column_bytes(paths: list[str]) -> dict[str, int]:
    """Compressed bytes per top-level column over Parquet files (from their footers)."""
    import pyarrow.parquet as pq

    out: dict[str, int] = {}
    for path in paths:
        meta = pq.ParquetFile(path).metadata
        for g in range(meta.num_row_groups):
            for c in range(meta.num_columns):
                col = meta.row_group(g).column(c)
                name = col.path_in_schema.split(".")[0]
                out[name] = out.get(name, 0) + col.total_compressed_size
    return out


def _manifest_files(run_dir: str) -> list[dict]:
    from pipeline.run_folder import RunFolder

    return RunFolder(run_dir).stage("generate").manifest()["files"]


def pc_sum(table) -> int:
    import pyarrow.compute as pc

    return pc.sum(pc.list_value_length(table.column("token_ids"))).as_py() or 0


def bench_shards(run_dir: str, kd_traces: int) -> list[tuple[str, str]]:
    """Format 1 vs format 2 on a run's generate shards (see the module docstring)."""
    import tempfile

    import pyarrow as pa
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    from pipeline.run_folder import parquet_options
    from pipeline.schema import as_format, logical, topk_columns

    tables, tokens = _shard_tables(run_dir)
    if not tables:
        return [("shards", f"skipped: {run_dir} has no finished generate stage (`make demo` "
                 "makes one)")]
    plain = [logical(t.replace_schema_metadata(None)) for t in tables]
    stored = sum(e["bytes"] for e in _manifest_files(run_dir))
    k = max((len(r[0]) for r in plain[0].column("topk_ids").to_pylist() if r), default=0)
    decoded_mb = tokens * k * 8 / 1e6  # int32 id + float32 log-probability per entry
    timings: dict = {(fmt, key): [] for fmt in (1, 2) for key in ("write", "read", "decode")}
    sizes, columns = {}, {}
    with tempfile.TemporaryDirectory() as tmp:
        for rep in range(5):  # the two formats in turn, medians: the machine's noise is shared
            for fmt in (1, 2):
                t0 = time.perf_counter()
                converted = [as_format(t, fmt) for t in plain]
                paths = [f"{tmp}/f{fmt}-{i}.parquet" for i in range(len(converted))]
                for t, path in zip(converted, paths):
                    pq.write_table(t, path, **parquet_options(t))
                t1 = time.perf_counter()
                for path in paths:  # the trainer's read: its columns, float32 top-k, rows
                    f = pq.ParquetFile(path)
                    logical(f.read(columns=["completion", "token_ids"]
                                   + topk_columns(f.schema_arrow))).select(
                        ["completion", "token_ids", "topk_ids", "topk_logprobs"]).to_pylist()
                t2 = time.perf_counter()
                for t in converted:
                    logical(t)
                timings[fmt, "write"].append(t1 - t0)
                timings[fmt, "read"].append(t2 - t1)
                timings[fmt, "decode"].append(time.perf_counter() - t2)
                sizes[fmt] = sum(os.path.getsize(p) for p in paths)
                columns[fmt] = _column_bytes(paths)
        # two choices not taken, by what they would save: zstd 19, and a 1/16-nat grid
        variants = {}
        for name, step_exp, level in (("zstd level 19", 5, 19), ("a 1/16-nat grid", 4, 9)):
            t0, total = time.perf_counter(), 0
            for i, t in enumerate(plain):
                t2 = as_format(t, 2, step_exp)
                path = f"{tmp}/v-{i}.parquet"
                pq.write_table(t2, path, **{**parquet_options(t2), "compression_level": level})
                total += os.path.getsize(path)
            variants[name] = (total, time.perf_counter() - t0)
    med = {key: float(np.median(v)) for key, v in timings.items()}
    anchors = pa.concat_tables([as_format(t, 2) for t in plain]).column("topk_anchor")
    top1_sampled = float(pc.mean(pc.equal(pc.list_flatten(anchors), 0.0)).as_py())
    per = {fmt: sizes[fmt] / tokens for fmt in sizes}
    return [
        (f"shards: {run_dir} generate, {tokens:,} generated tokens, k={k}",
         f"as stored: {stored / tokens:.1f} bytes/token ({stored:,} B); rewritten: format 1 "
         f"{per[1]:.1f}, format 2 {per[2]:.1f} bytes/token ({sizes[2]:,} B), "
         f"{stored / sizes[2]:.2f}x smaller than stored"),
        *[(f"shards: format {fmt}, bytes/token by column",
           ", ".join(f"{name} {size / tokens:.1f}" for name, size in sorted(
               columns[fmt].items(), key=lambda c: -c[1]) if size / tokens >= 0.05)
           + f"; Parquet pages and footer {(sizes[fmt] - sum(columns[fmt].values())) / tokens:.1f}")
          for fmt in (1, 2)],
        ("shards: format 2, choices not taken",
         "; ".join(f"{name}: {size / tokens:.1f} bytes/token, write {decoded_mb / secs:.0f} MB/s"
                   for name, (size, secs) in variants.items())
         + f"; positions whose sampled token is the top-1 (anchor 0): {100 * top1_sampled:.1f}%"),
        ("shards: write (convert + Parquet), median of 5",
         f"format 1: {decoded_mb / med[1, 'write']:.0f} MB/s; format 2: "
         f"{decoded_mb / med[2, 'write']:.0f} MB/s of decoded top-k"),
        ("shards: decode format 2 to float32 top-k (in memory)",
         f"{decoded_mb / med[2, 'decode']:.0f} MB/s of decoded top-k"),
        ("shards: the trainer's read of all shards (Parquet, top-k, Python rows)",
         f"format 1: {med[1, 'read'] * 1000:.0f} ms; format 2: {med[2, 'read'] * 1000:.0f} ms "
         f"(ratio {med[2, 'read'] / med[1, 'read']:.2f})"),
    ] + (kd_difference(pa.concat_tables(plain), pa.concat_tables(
        [logical(as_format(t, 2)) for t in plain]), kd_traces) if kd_traces else [])


def kd_difference(v1, v2, limit: int) -> list[tuple[str, str]]:
    """The KD loss per token the trainer computes (bucket tail, T = 1 and 2) for each trace,
    from float32 rows and from format 2's: the embedded student (float32) reads `explain:
    <question>` and the teacher's tokens, as in training."""
    import torch

    from pipeline.models import load_causal_lm, load_tokenizer, resolve_model
    from trainer.examples import EXPLAIN, task_prompt
    from trainer.losses.topk_kd import topk_kd_loss

    path = resolve_model("smollm2-135m-instruct")
    tok = load_tokenizer(path)
    model = load_causal_lm(path, "float32").eval()
    rows1 = [r for r in v1.select(["question", "token_ids", "topk_ids", "topk_logprobs"])
             .to_pylist() if r["token_ids"]][:limit]
    rows2 = [r for r in v2.select(["question", "token_ids", "topk_ids", "topk_logprobs"])
             .to_pylist() if r["token_ids"]][:limit]
    diffs: dict[float, list[float]] = {1.0: [], 2.0: []}
    losses: dict[float, list[float]] = {1.0: [], 2.0: []}
    t0 = time.perf_counter()
    with torch.no_grad():
        for a, b in zip(rows1, rows2):
            prompt = tok(task_prompt(EXPLAIN, a["question"]), add_special_tokens=False)[
                "input_ids"]
            ids = torch.tensor([prompt + list(a["token_ids"])])
            logits = model(ids).logits[0, len(prompt) - 1:-1].float()
            for temp in diffs:
                la = topk_kd_loss(logits, torch.tensor(a["topk_ids"]),
                                  torch.tensor(a["topk_logprobs"]), temp)
                lb = topk_kd_loss(logits, torch.tensor(b["topk_ids"]),
                                  torch.tensor(b["topk_logprobs"]), temp)
                diffs[temp].append(abs(la.item() - lb.item()))
                losses[temp].append(la.item())
    n = len(rows1)
    return [(f"shards: KD loss per token, format 2 vs float32, {n} traces "
             f"({time.perf_counter() - t0:.0f}s)",
             "; ".join(f"T={temp:g}: mean |difference| {np.mean(d):.1e} nats (max "
                       f"{np.max(d):.1e}) on a mean loss of {np.mean(losses[temp]):.3f}"
                       for temp, d in diffs.items()))]


def capture_once(rows: int, dtype: str) -> dict:
    """vLLM tokens/s with logprobs=20 and without on the demo's prompts (same seeds), each
    four times in turn after a warm-up, and the time to write the shard in either format."""
    import tempfile

    import pyarrow.parquet as pq

    from pipeline.config import load_config
    from pipeline.prompts import PromptTemplate
    from pipeline.run_folder import parquet_options
    from pipeline.schema import traces_table
    from pipeline.tasks import load_split
    from stages.backends.base import SamplingSettings
    from stages.backends.vllm_engine import VLLMBackend

    cfg = load_config("configs/demo.yaml", [f"task.n_train={rows}", f"generate.dtype={dtype}"])
    g = cfg.generate
    template = PromptTemplate(g.prompt_template)
    questions = load_split(cfg.task, "train").column("question").to_pylist()
    prompts = [template.render(q) for q in questions]
    backend = VLLMBackend(g, cfg.vllm, top_k=g.top_k)

    def settings(k):
        return SamplingSettings(n=g.n_samples, temperature=g.temperature, top_p=g.top_p,
                                max_new_tokens=g.max_new_tokens, top_k=k, seed=0,
                                stop=list(g.stop))
    backend.generate(prompts[:8], settings(g.top_k))
    backend.generate(prompts[:8], settings(0))
    runs: dict[int, list[float]] = {g.top_k: [], 0: []}
    tokens, texts, gens = {}, {}, None
    for rep in range(4):  # in turn, the order swapped each time; medians
        for k in ((g.top_k, 0) if rep % 2 == 0 else (0, g.top_k)):
            before = dict(backend.stats)
            t = time.perf_counter()
            out = backend.generate(prompts, settings(k))
            runs[k].append(time.perf_counter() - t)
            tokens[k] = sum(int(x.token_ids.shape[0]) for row in out for x in row)
            texts[k] = [x.text for row in out for x in row]
            if k:
                gens = out
                convert = backend.stats["convert_s"] - before.get("convert_s", 0.0)
    backend.close()
    records = [{"id": str(i), "sample": j, "question": q, "gold": None, "prompt": p,
                "completion": x.text, "finish_reason": x.finish_reason, "error": None}
               for i, (q, p, row) in enumerate(zip(questions, prompts, gens))
               for j, x in enumerate(row)]
    flat = [x for row in gens for x in row]
    write = {}
    with tempfile.TemporaryDirectory() as tmp:
        for fmt in (1, 2):
            best = float("inf")
            for _ in range(3):
                t = time.perf_counter()
                table = traces_table(records, flat, g.top_k, fmt)
                pq.write_table(table, f"{tmp}/s.parquet", **parquet_options(table))
                best = min(best, time.perf_counter() - t)
            write[fmt] = best
    return {"rows": rows, "dtype": dtype, "k": g.top_k, "tokens": tokens,
            "s_topk": float(np.median(runs[g.top_k])), "s_plain": float(np.median(runs[0])),
            "same_text": texts[g.top_k] == texts[0], "convert_s": convert,
            "write_s": write}


def bench_capture(rows: int, dtype: str) -> list[tuple[str, str]]:
    import importlib.util

    if importlib.util.find_spec("vllm") is None:
        return [("capture", "skipped: vllm is not installed")]
    r = _in_child(["--one-capture", str(rows), "--capture-dtype", dtype], "vLLM capture")
    k = r["k"]
    with_k, plain = r["tokens"][str(k)] / r["s_topk"], r["tokens"]["0"] / r["s_plain"]
    gen_s = r["s_topk"]
    return [
        (f"capture: vLLM engine, {r['rows']} demo prompts x 2, {dtype}, same seeds",
         f"logprobs={k}: {with_k:.0f} tokens/s; none: {plain:.0f} tokens/s "
         f"({100 * (1 - with_k / plain):+.1f}% cost; same texts: {r['same_text']})"),
        ("capture: our share on top of the engine",
         f"reading vLLM's top-{k} into arrays {100 * r['convert_s'] / gen_s:.1f}%, writing the "
         f"shard: format 1 {100 * r['write_s']['1'] / gen_s:.1f}%, format 2 "
         f"{100 * r['write_s']['2'] / gen_s:.1f}% of the generation time")]


def score_once(rows: int, dtype: str) -> dict:
    """The teacher's scoring of traces (what `distill iterate` asks of it for a student's
    traces): the demo's prompts, 2 sampled traces each, scored with every prompt read in full
    and with the few-shot prefix read from vLLM's prefix cache, in turn, twice each."""
    from pipeline.config import load_config
    from pipeline.prompts import PromptTemplate
    from pipeline.tasks import load_split
    from stages.backends.base import SamplingSettings
    from stages.backends.vllm_engine import VLLMBackend

    cfg = load_config("configs/demo.yaml", [f"task.n_train={rows}", f"generate.dtype={dtype}"])
    g = cfg.generate
    template = PromptTemplate(g.prompt_template)
    prompts = [template.render(q) for q in load_split(cfg.task, "train").column("question")
               .to_pylist()]
    backend = VLLMBackend(g, cfg.vllm, top_k=g.top_k)
    made = backend.generate(prompts, SamplingSettings(
        n=2, temperature=0.7, top_p=g.top_p, max_new_tokens=g.max_new_tokens, top_k=0, seed=0,
        stop=list(g.stop)))
    pairs = [(p, x.token_ids) for p, row in zip(prompts, made) for x in row]
    traces = [p for p, _ in pairs], [ids for _, ids in pairs]
    backend.score(traces[0][:8], traces[1][:8], g.top_k, reuse_prefix=False)  # warm-up
    seconds: dict[bool, list[float]] = {False: [], True: []}
    scored = {}
    for rep in range(2):
        for reuse in ((False, True) if rep == 0 else (True, False)):
            cached_before = backend.stats.get("score_cached_tokens", 0)
            t = time.perf_counter()
            scored[reuse] = backend.score(*traces, g.top_k, reuse_prefix=reuse)
            seconds[reuse].append(time.perf_counter() - t)
            if reuse:
                cached = backend.stats.get("score_cached_tokens", 0) - cached_before
    backend.close()
    diff = max(float(np.abs(a.topk_logprobs - b.topk_logprobs).max(initial=0.0))
               for a, b in zip(scored[False], scored[True]))
    same_ids = float(np.mean([(a.topk_ids == b.topk_ids).mean() for a, b in
                              zip(scored[False], scored[True]) if a.topk_ids.size]))
    prompt_tokens = sum(len(backend.tokenizer(p, add_special_tokens=False)["input_ids"])
                        for p in traces[0])
    return {"traces": len(pairs), "trace_tokens": int(sum(len(t) for t in traces[1])),
            "prompt_tokens": prompt_tokens, "cached_tokens": int(cached),
            "scored_again": int(backend.stats.get("scored_again", 0)), "dtype": dtype,
            "s_full": min(seconds[False]), "s_cached": min(seconds[True]),
            "max_diff": diff, "same_ids": same_ids}


def bench_score(rows: int, dtype: str) -> list[tuple[str, str]]:
    import importlib.util

    if importlib.util.find_spec("vllm") is None:
        return [("score", "skipped: vllm is not installed")]
    r = _in_child(["--one-score", str(rows), "--capture-dtype", dtype], "vLLM scoring")
    return [
        (f"score: the teacher scores {r['traces']} traces ({r['trace_tokens']:,} tokens) after "
         f"the demo's few-shot prompts ({r['prompt_tokens']:,} tokens), vLLM, {dtype}",
         f"every prompt read in full {r['s_full']:.1f}s; the prefix from vLLM's cache "
         f"{r['s_cached']:.1f}s ({r['s_cached'] / r['s_full']:.2f}x the time; "
         f"{r['cached_tokens']:,} prompt tokens read from the cache, "
         f"{r['scored_again']} traces scored again)"),
        ("score: the two give the same numbers",
         f"largest top-k log-probability difference {r['max_diff']:.2g}, same top-k ids "
         f"{100 * r['same_ids']:.1f}%")]


def students_once(mode: str, rows: int, dtype: str, adapter: str) -> dict:
    """The loop's sampling (`distill iterate`): the embedded student with a LoRA adapter
    samples 4 `explain:` rationales for each of `rows` demo questions in vLLM's engine, served
    as `mode` (`vllm.students`: `lora` or `merged`), after a warm-up."""
    from pipeline.config import load_config
    from pipeline.models import resolve_model
    from pipeline.tasks import load_split
    from stages.backends.base import SamplingSettings
    from stages.backends.vllm_engine import _student_engine
    from trainer.examples import EXPLAIN, task_prompt
    from trainer.lora import save_merged
    from trainer.students import student_for

    cfg = load_config("configs/demo.yaml", [f"task.n_train={rows}", f"eval.dtype={dtype}",
                                            f"vllm.students={mode}"])
    path = resolve_model(cfg.train.student)
    t = time.perf_counter()
    engine = _student_engine(cfg, cfg.train.student, cfg.train.lora_r, lambda a, out: save_merged(
        path, a, dtype, student_for(path), out))
    engine.use_adapter("bench", adapter)
    prompts = [task_prompt(EXPLAIN, q) for q in load_split(cfg.task, "train").column(
        "question").to_pylist()]
    # no stop string: the untrained adapter would often stop at once; each sample runs to its
    # end of sequence or max_new_tokens, as long as a trained student's rationale or longer
    settings = SamplingSettings(n=4, temperature=0.7, top_p=cfg.generate.top_p,
                                max_new_tokens=cfg.eval.max_new_tokens, top_k=0, seed=0,
                                stop=[])
    engine.generate(prompts[:4], settings)  # warm-up (the LoRA engine loads the adapter here)
    ready = time.perf_counter() - t
    t = time.perf_counter()
    made = engine.generate(prompts, settings)
    seconds = time.perf_counter() - t
    engine.close()
    return {"mode": mode, "ready_s": ready, "seconds": seconds, "traces": 4 * len(prompts),
            "tokens": int(sum(len(x.token_ids) for row in made for x in row)),
            "texts": [x.text for row in made for x in row]}


def bench_students(rows: int, dtype: str) -> list[tuple[str, str]]:
    import importlib.util
    import tempfile

    if importlib.util.find_spec("vllm") is None:
        return [("students", "skipped: vllm is not installed")]
    import torch
    from peft import LoraConfig, get_peft_model

    from pipeline.config import load_config
    from pipeline.models import load_tokenizer, resolve_model
    from trainer.lora import lora_targets
    from trainer.students import student_for

    cfg = load_config("configs/demo.yaml")
    path = resolve_model(cfg.train.student)
    student = student_for(path)
    with tempfile.TemporaryDirectory(prefix="bench-adapter-") as adapter:
        # an adapter of the training's shape and rank whose B is not zero (a trained one's
        # values do not change the cost)
        model = get_peft_model(student.load(path, "float32"), LoraConfig(
            r=cfg.train.lora_r, lora_alpha=cfg.train.lora_alpha,
            target_modules=lora_targets(cfg.train, student), task_type=student.task_type))
        torch.manual_seed(0)
        for name, p in model.named_parameters():
            if "lora_B" in name:
                torch.nn.init.normal_(p, std=0.002)
        model.save_pretrained(adapter)
        load_tokenizer(path).save_pretrained(adapter)
        del model
        r = {m: _in_child(["--one-students", m, "--student-rows", str(rows), "--capture-dtype",
                           dtype, "--student-adapter", adapter], f"vLLM student ({m})")
             for m in ("lora", "merged")}
    same = np.mean([a == b for a, b in zip(r["lora"]["texts"], r["merged"]["texts"])])
    rate = {m: r[m]["tokens"] / r[m]["seconds"] for m in r}
    return [
        (f"students: the embedded student with a rank-{cfg.train.lora_r} adapter samples "
         f"{r['lora']['traces']} explain: rationales in vLLM, {dtype}",
         "; ".join(f"{m}: {rate[m]:.0f} tokens/s ({r[m]['seconds']:.1f}s, ready in "
                   f"{r[m]['ready_s']:.1f}s)" for m in ("lora", "merged"))
         + f"; merged {rate['merged'] / rate['lora']:.2f}x the tokens a second"),
        ("students: merged and LoRA give the same samples",
         f"{100 * same:.0f}% of the {len(r['lora']['texts'])} samples identical (the same seeds; "
         "rounding alone differs)")]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=64, help="prompts in the generate batch")
    parser.add_argument("--gen-rows", type=int, default=128,
                        help="task rows for the backend comparison (2 samples each)")
    parser.add_argument("--skip-backends", action="store_true",
                        help="leave out the backend comparison (it takes a few minutes)")
    parser.add_argument("--one", help=argparse.SUPPRESS)        # internal: one backend run
    parser.add_argument("--base-url", help=argparse.SUPPRESS)
    parser.add_argument("--one-train", help=argparse.SUPPRESS)  # internal: one training run
    parser.add_argument("--one-scale", help=argparse.SUPPRESS)  # internal: one executor run
    parser.add_argument("--scale-rows", type=int, default=48,
                        help="task rows for the Ray vs local comparison (2 samples each)")
    parser.add_argument("--train-steps", type=int, default=8,
                        help="timed optimizer steps per training variant (after one warm-up)")
    parser.add_argument("--only", choices=["filter", "generate", "backends", "scale", "train",
                                           "shards", "capture", "score", "students"],
                        help="run one part of the benchmark")
    parser.add_argument("--shard-run", default="data/runs/demo",
                        help="the run whose generate shards the shards part measures")
    parser.add_argument("--kd-traces", type=int, default=100_000,
                        help="traces for the KD-loss comparison of the shards part (0: none)")
    parser.add_argument("--capture-rows", type=int, default=32,
                        help="demo rows (2 samples each) for the vLLM capture cost")
    parser.add_argument("--capture-dtype", default="float32",
                        help="engine dtype for the capture part (bfloat16 is slow on a CPU "
                        "without AVX-512-bf16)")
    parser.add_argument("--one-capture", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--score-rows", type=int, default=128,
                        help="demo rows (2 traces each) the teacher scores in the score part")
    parser.add_argument("--one-score", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--student-rows", type=int, default=16,
                        help="demo rows (4 samples each) the student samples in the students "
                        "part")
    parser.add_argument("--one-students", help=argparse.SUPPRESS)
    parser.add_argument("--student-adapter", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one_students:
        print(json.dumps(students_once(args.one_students, args.student_rows, args.capture_dtype,
                                       args.student_adapter)))
        return
    if args.one_train:
        print(json.dumps(train_once(args.one_train, args.train_steps)))
        return
    if args.one:
        print(json.dumps(generate_once(args.one, args.gen_rows, args.base_url)))
        return
    if args.one_scale:
        print(json.dumps(scale_once(args.one_scale, args.gen_rows)))
        return
    if args.one_capture:
        print(json.dumps(capture_once(args.one_capture, args.capture_dtype)))
        return
    if args.one_score:
        print(json.dumps(score_once(args.one_score, args.capture_dtype)))
        return
    rows = [("machine", f"{platform.machine()}, {os.cpu_count()} CPUs, "
             f"Python {platform.python_version()}")]
    part = args.only
    if part in (None, "filter"):
        rows += bench_filter()
    if part in (None, "generate"):
        rows += bench_generate(args.rows)
    if part == "backends" or (part is None and not args.skip_backends):
        rows += bench_backends(args.gen_rows)
    if part in (None, "scale"):
        rows += bench_scale(args.scale_rows)
    if part in (None, "shards"):
        rows += bench_shards(args.shard_run, args.kd_traces)
    if part in (None, "capture"):
        rows += bench_capture(args.capture_rows, args.capture_dtype)
    if part in (None, "score"):
        rows += bench_score(args.score_rows, args.capture_dtype)
    if part in (None, "students"):
        rows += bench_students(args.student_rows, args.capture_dtype)
    if part in (None, "train"):
        rows += bench_train(args.train_steps)
    width = max(len(r[0]) for r in rows)
    for name, value in rows:
        print(f"{name:<{width}}  {value}")


if __name__ == "__main__":
    main()
