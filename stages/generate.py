"""Stage 1, generate: chain-of-thought traces and per-token top-k log-probabilities.

The task's train rows are cut into input shards of `rows_per_shard`; each becomes one output
shard `traces-NNNNN.parquet` with one row per (task row, sample). The teacher is loaded only
when a shard actually has to be generated.
"""

from __future__ import annotations

import hashlib
import time
import traceback
from pathlib import Path

import numpy as np
import pyarrow as pa
from tqdm import tqdm

from pipeline import store
from pipeline.config import Config
from pipeline.runner import ShardInput, ShardOutput, log, run_shard_stage
from pipeline.tasks import load_split
from stages.backends import Generation, SamplingSettings, make_backend

SCHEMA_VERSION = 1
TRACE_SCHEMA = pa.schema([
    ("id", pa.string()), ("sample", pa.int32()), ("question", pa.string()),
    ("gold", pa.string()), ("prompt", pa.string()), ("completion", pa.string()),
    ("finish_reason", pa.string()), ("token_ids", pa.list_(pa.int32())),
    ("token_logprobs", pa.list_(pa.float32())),
    ("topk_ids", pa.list_(pa.list_(pa.int32()))),
    ("topk_logprobs", pa.list_(pa.list_(pa.float32()))),
    ("error", pa.string()),
])
# Settings that do not change what is asked of the teacher, so changing them keeps the shards.
_NOT_FINGERPRINTED = {"batch_size", "concurrency", "max_retries", "request_timeout",
                      "backoff_max", "api_key_env"}
_OPENAI_ONLY = {"base_url", "endpoint", "server_token_ids", "tokenizer"}
# vLLM engine settings that change speed or memory, not the distribution sampled from.
_VLLM_NOT_FINGERPRINTED = {"tensor_parallel_size", "gpu_memory_utilization", "enforce_eager",
                           "max_num_seqs", "in_process", "cpu_kvcache_gb", "cpu_threads"}


class PromptTemplate:
    """A few-shot prompt kept in a file; `{question}` marks where the question goes."""

    def __init__(self, path: str):
        p = Path(path)
        if not p.is_file():
            raise FileNotFoundError(f"prompt template '{path}' does not exist; the shipped ones "
                                    "are in data/prompts/")
        self.path = p
        self.text = p.read_text().rstrip("\n")
        if "{question}" not in self.text:
            raise ValueError(f"prompt template '{path}' has no {{question}} placeholder")
        self.sha256 = hashlib.sha256(self.text.encode()).hexdigest()[:16]

    def render(self, question: str) -> str:
        return self.text.replace("{question}", question)


def generate_settings(cfg: Config) -> dict:
    """What decides the traces: the settings that go into the fingerprint."""
    backend = cfg.generate.backend
    skip = _NOT_FINGERPRINTED | (set() if backend == "openai" else _OPENAI_ONLY)
    if backend == "openai":
        skip = skip | {"dtype"}  # the server decides
    section = {k: v for k, v in cfg.section("generate").items() if k not in skip}
    template = PromptTemplate(cfg.generate.prompt_template)
    settings = {"generate": section, "template_sha256": template.sha256,
                "schema_version": SCHEMA_VERSION}
    if backend == "vllm":
        settings["vllm"] = {k: v for k, v in cfg.section("vllm").items()
                            if k not in _VLLM_NOT_FINGERPRINTED}
    return settings


def task_shards(cfg: Config) -> list[ShardInput]:
    """The train split cut into input shards, each with a checksum of its rows."""
    rows = load_split(cfg.task, "train")
    size = cfg.generate.rows_per_shard
    shards = []
    for start in range(0, rows.num_rows, size):
        part = rows.slice(start, size)
        digest = hashlib.sha256()
        for col in ("id", "question", "gold"):
            digest.update("\x1f".join("" if v is None else v for v in
                                      part.column(col).to_pylist()).encode())
            digest.update(b"\x1e")
        shards.append(ShardInput(name=f"{start // size:05d}", checksum=digest.hexdigest()[:16],
                                 load=lambda part=part: part))
    return shards


def _nested(values: list[np.ndarray], dtype) -> pa.Array:
    """list<list<x>> from per-row [T, k] arrays, without per-token Python work."""
    lengths = np.array([v.shape[0] for v in values], dtype=np.int64)
    k = values[0].shape[1] if values and values[0].ndim == 2 else 0
    flat = (np.concatenate([v.reshape(-1) for v in values]) if values
            else np.zeros(0)).astype(dtype.to_pandas_dtype())
    inner_offsets = np.arange(0, lengths.sum() * k + 1, k if k else 1, dtype=np.int32)[
        : int(lengths.sum()) + 1]
    inner = pa.ListArray.from_arrays(pa.array(inner_offsets), pa.array(flat, type=dtype))
    outer_offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int32)
    return pa.ListArray.from_arrays(pa.array(outer_offsets), inner)


def _flat(values: list[np.ndarray], dtype) -> pa.Array:
    lengths = np.array([v.shape[0] for v in values], dtype=np.int64)
    flat = (np.concatenate(values) if values else np.zeros(0)).astype(dtype.to_pandas_dtype())
    offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int32)
    return pa.ListArray.from_arrays(pa.array(offsets), pa.array(flat, type=dtype))


def traces_table(records: list[dict], gens: list[Generation | None], k: int) -> pa.Table:
    """Assemble the shard: `records` hold the scalar columns, `gens` the token arrays."""
    empty2 = np.zeros((0, k))
    cols = {name: [r[name] for r in records] for name in
            ("id", "sample", "question", "gold", "prompt", "completion", "finish_reason",
             "error")}
    token_ids = [g.token_ids if g else np.zeros(0) for g in gens]
    token_lp = [g.token_logprobs if g else np.zeros(0) for g in gens]
    topk_ids = [g.topk_ids if g else empty2 for g in gens]
    topk_lp = [g.topk_logprobs if g else empty2 for g in gens]
    arrays = {
        **{n: pa.array(cols[n], type=TRACE_SCHEMA.field(n).type) for n in cols},
        "token_ids": _flat(token_ids, pa.int32()),
        "token_logprobs": _flat(token_lp, pa.float32()),
        "topk_ids": _nested(topk_ids, pa.int32()),
        "topk_logprobs": _nested(topk_lp, pa.float32()),
    }
    return pa.table({f.name: arrays[f.name] for f in TRACE_SCHEMA}, schema=TRACE_SCHEMA)


def _shard_seed(base: int, shard: str, batch: int) -> int:
    h = hashlib.sha256(f"{base}:{shard}:{batch}".encode()).digest()
    return int.from_bytes(h[:4], "little")


def main(cfg: Config, run_dir: Path, force: bool = False) -> dict:
    g = cfg.generate
    settings = generate_settings(cfg)
    fp = store.fingerprint(settings)
    template = PromptTemplate(g.prompt_template)
    inputs = task_shards(cfg)
    n_rows = sum(s.load().num_rows for s in inputs)
    facts: dict = {"k": g.top_k, "schema_version": SCHEMA_VERSION, "template":
                   g.prompt_template, "template_sha256": template.sha256, "sampling": {
                       "n": g.n_samples, "temperature": g.temperature, "top_p": g.top_p,
                       "max_new_tokens": g.max_new_tokens, "seed": g.seed, "stop": g.stop}}
    state: dict = {"backend": None, "tokens": 0, "errors": 0, "t0": None, "bar": None}

    def bar() -> tqdm:  # created on first use, so an up-to-date run prints no empty bar
        if state["bar"] is None:
            state["bar"] = tqdm(total=n_rows, desc="generate", unit="row", dynamic_ncols=True,
                                mininterval=1.0)
        return state["bar"]

    def process(inp: ShardInput, rows: pa.Table) -> ShardOutput:
        if state["backend"] is None:
            log("generate", f"loading teacher {g.model} ({g.backend}, {g.dtype})")
            state["backend"] = make_backend(g, run_dir / "generate", cfg.vllm)
            facts.update(state["backend"].facts())
            if getattr(state["backend"], "startup_s", None):
                log("generate", f"teacher ready in {state['backend'].startup_s:.0f}s")
            state["t0"] = time.time()
            bar()
        backend = state["backend"]
        sampling = SamplingSettings(n=g.n_samples, temperature=g.temperature, top_p=g.top_p,
                                    max_new_tokens=g.max_new_tokens, top_k=g.top_k, seed=0,
                                    stop=list(g.stop))
        # Engines that schedule requests themselves get the whole shard at once.
        data = rows.to_pylist()
        per_batch = (len(data) if getattr(backend, "whole_shards", False)
                     else max(1, g.batch_size // g.n_samples))
        records: list[dict] = []
        gens: list[Generation | None] = []
        counters = {"rows": len(data), "traces": 0, "errors": 0, "tokens": 0, "truncated": 0}
        kd_before = dict(getattr(backend, "kd_check", {}))
        for b, start in enumerate(range(0, len(data), per_batch)):
            batch = data[start:start + per_batch]
            prompts = [template.render(r["question"]) for r in batch]
            sampling.seed = _shard_seed(g.seed, inp.name, b)
            try:
                outs = backend.generate(prompts, sampling)
            except Exception:  # one bad row must not sink the batch: retry one by one
                outs = []
                for p in prompts:
                    try:
                        outs.append(backend.generate([p], sampling)[0])
                    except Exception as e:  # recorded on the row; the run goes on
                        outs.append(f"{type(e).__name__}: {e}\n"
                                    f"{traceback.format_exc(limit=3)}")
            for row, prompt, out in zip(batch, prompts, outs):
                for s in range(g.n_samples):
                    gen = out[s] if isinstance(out, list) else None
                    records.append({"id": row["id"], "sample": s, "question": row["question"],
                                    "gold": row["gold"], "prompt": prompt,
                                    "completion": gen.text if gen else "",
                                    "finish_reason": gen.finish_reason if gen else "error",
                                    "error": None if gen else str(out)})
                    gens.append(gen)
                    if gen is None:
                        counters["errors"] += 1
                        state["errors"] += 1
                        continue
                    n_tokens = int(gen.token_ids.shape[0])
                    counters["traces"] += 1
                    counters["tokens"] += n_tokens
                    counters["truncated"] += gen.finish_reason == "length"
                    state["tokens"] += n_tokens
            elapsed = max(time.time() - state["t0"], 1e-9)
            bar().update(len(batch))
            postfix = f"{state['tokens'] / elapsed:.0f} tok/s, errors {state['errors']}"
            stats = getattr(backend, "stats", None) or {}
            if "retries" in stats:  # API backends count their requests
                postfix += (f", {stats['requests'] / elapsed:.1f} req/s, "
                            f"{stats['retries']} retries, {stats['cache_hits']} cached")
            bar().set_postfix_str(postfix, refresh=False)
        facts.update(backend.facts())
        # API backends check every response's ids; the counts travel with the shard
        for key, value in getattr(backend, "kd_check", {}).items():
            counters[f"kd_{key}"] = value - kd_before.get(key, 0)
        return ShardOutput({"traces": traces_table(records, gens, g.top_k)}, counters)

    def kd_usability(totals: dict, facts: dict) -> None:
        """Whether the log-probabilities of all shards can be used for KD, and why not."""
        if "kd_tokens" not in totals:  # local engines: ids straight from the model
            facts["usable_for_kd"] = True
            return
        check = {k[3:]: v for k, v in totals.items() if k.startswith("kd_")}
        problems = []
        if check["sampled_unmapped"]:
            problems.append(f"{check['sampled_unmapped']} sampled tokens have no id (set "
                            "generate.tokenizer, or generate.server_token_ids with vLLM)")
        if check["text_mismatch"]:
            problems.append(f"{check['text_mismatch']} traces' ids do not spell their text")
        if not check["tokens"]:
            problems.append("no generated tokens")
        facts["usable_for_kd"] = not problems
        facts["kd_check"] = check
        if problems:
            facts["kd_unusable_because"] = "; ".join(problems)
        else:
            facts.pop("kd_unusable_because", None)

    def progress(inp: ShardInput, result: ShardOutput | None) -> None:
        if result is None:
            bar().update(inp.load().num_rows)

    try:
        manifest = run_shard_stage(
            "generate", run_dir / "generate", fp, settings, inputs, process, ["traces"],
            facts=facts, upstream={"task": cfg.section("task")}, force=force,
            on_progress=progress, finalize=kd_usability)
    finally:
        if state["bar"] is not None:
            state["bar"].close()
        if hasattr(state["backend"], "close"):
            state["backend"].close()
    c = manifest["counters"]
    log("generate", f"{c.get('rows', 0)} rows -> {c.get('traces', 0)} traces, "
        f"{c.get('tokens', 0)} tokens, {c.get('truncated', 0)} truncated, "
        f"{c.get('errors', 0)} errors")
    if not manifest["facts"].get("usable_for_kd", True):
        log("generate", "the log-probabilities are not usable for KD: "
            + manifest["facts"].get("kd_unusable_because", ""))
    return manifest
