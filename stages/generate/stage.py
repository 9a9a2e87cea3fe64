"""Stage 1, generate: chain-of-thought traces and per-token top-k log-probabilities.

The task's train rows are cut into input shards of `rows_per_shard`; each becomes one output
shard `traces-NNNNN.parquet` with one row per (task row, sample), made by `generate_shard`.
The teacher is built by a factory that the executor calls only when a shard actually has to be
generated (`plan(..., teacher=...)` hands in another one).
"""

from __future__ import annotations

import hashlib
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import pyarrow as pa
import pyarrow.compute as pc

from pipeline.config import Config
from stages.generate.settings import GenerateConfig
from pipeline.costs import LEDGER_KEYS, Prices, ledger, ledger_lines
from pipeline.executors import ArrayRole, executor_for, run_stage
from pipeline.log import log
from pipeline.registry import BACKENDS
from pipeline.prompts import PromptTemplate
from pipeline.kept_aside import REQUEST_CACHE
from pipeline.run_folder import RunFolder, StageFolder, as_run_folder
from pipeline.schema import SCHEMA_VERSION, as_format, shard_format, traces_table
from pipeline.stage import Progress, Shard, ShardOutput, Stage, no_progress
from pipeline.tasks import load_split
from stages.backends.base import (Backend, Extras, Generation, Outcome, SamplingSettings,
                                  generate_in_batches)
from stages.checks.answers import answer_checker
from stages.generate.rounds import (Round, Rounds, finished, generate_fingerprinted,  # noqa: F401
                           request_seed, round_fingerprinted)


def task_shards(cfg: Config) -> list[Shard]:
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
        shards.append(Shard.of(f"{start // size:05d}", part, digest.hexdigest()[:16]))
    return shards


@dataclass
class GenerateSettings:
    """What `generate_shard` needs besides the shard and the teacher; a round after the first
    (`stages.generate.rounds`) sets its own samples and temperature, and its rows carry the index of
    their first sample (`first`), from which each request's seed is derived."""

    cfg: GenerateConfig
    template: PromptTemplate
    samples: int | None = None        # None: cfg.n_samples
    temperature: float | None = None  # None: cfg.temperature
    later_round: bool = False
    # a hinted round: the gold answer as the prompt shows it (the answer kind's canonical
    # form, as the student is taught to write it: `6.0` -> `6`); None = as the task gives it
    hint_answer: Callable[[str], str] | None = None


def sampling_settings(g: GenerateConfig, n: int, temperature: float,
                      seed: int = 0) -> SamplingSettings:
    """What a generate request samples with (the batch loop sets each batch's seed)."""
    return SamplingSettings(n=n, temperature=temperature, top_p=g.top_p,
                            max_new_tokens=g.max_new_tokens, top_k=g.top_k, seed=seed,
                            stop=list(g.stop))


def first_round_sampling(g: GenerateConfig, shard: str) -> SamplingSettings:
    """The sampling of a first-round shard sent whole (an API teacher): its batch 0's seed."""
    return sampling_settings(g, g.n_samples, g.temperature, _shard_seed(g.seed, shard, 0))


def _shard_seed(base: int, shard: str, batch: int) -> int:
    h = hashlib.sha256(f"{base}:{shard}:{batch}".encode()).digest()
    return int.from_bytes(h[:4], "little")


def generate_shard(settings: GenerateSettings, shard: Shard, teacher: Backend,
                   progress: Progress = no_progress) -> ShardOutput:
    """`n_samples` traces for every row of the shard, with their token arrays.

    A row whose generation fails for good is kept with its error (and no tokens); API
    backends' per-token id checks come back as `kd_*` counters.
    """
    g = settings.cfg
    n = settings.samples or g.n_samples
    temperature = g.temperature if settings.temperature is None else settings.temperature
    hinted = settings.template.hinted
    rows = shard.load().to_pylist()
    previous = shard.previous()["traces"] if shard.previous is not None else None
    if previous is not None:  # --retry-failed: only the rows that ended with an error
        failed = {r["id"] for r in previous.select(["id", "error"]).to_pylist()
                  if r["error"] is not None}
        rows = [r for r in rows if r["id"] in failed]
    shown = settings.hint_answer or str
    prompts = [settings.template.render(r["question"], shown(r["gold"]) if hinted else None)
               for r in rows]
    sampling = sampling_settings(g, n, temperature)
    seeds = ([request_seed(g.seed, r["id"], r["first"], hinted) for r in rows]
             if settings.later_round else None)
    extras = Extras.of(teacher)
    # Engines that schedule requests themselves get the whole shard at once.
    per_batch = len(rows) if extras.whole_shards else max(1, g.batch_size // n)
    kd_before = dict(extras.kd_check)
    used_before = _used(extras)
    api = {"requests": "requests", "retries": "retries", "cache_hits": "cached"}
    seen = {k: extras.stats.get(k, 0) for k in api}
    stats_before = dict(seen)
    priced = Prices.of(g).priced and extras.usage is not None
    seen["cost"] = (extras.usage or {}).get("cost", 0.0)

    def on_batch(outcomes: list[Outcome]) -> None:
        made = [x for o in outcomes if isinstance(o, list) for x in o]
        counts = {"tokens": sum(int(x.token_ids.shape[0]) for x in made),
                  "errors": sum(n for o in outcomes if isinstance(o, str))}
        if "retries" in extras.stats:  # API backends count their requests
            for key, shown in api.items():
                counts[shown] = extras.stats[key] - seen[key]
                seen[key] = extras.stats[key]
        if priced:  # the ledger's running cost
            now = extras.usage["cost"]
            counts["cost"], seen["cost"] = round(now - seen["cost"], 9), now
        progress(len(outcomes), **counts)

    outcomes = generate_in_batches(teacher, prompts, sampling, per_batch,
                                   seed_of=lambda b: _shard_seed(g.seed, shard.name, b),
                                   on_batch=on_batch, prompt_seeds=seeds)
    records: list[dict] = []
    gens: list[Generation | None] = []
    counters = {"rows": len(rows), "traces": 0, "errors": 0, "tokens": 0, "truncated": 0}
    for row, prompt, out in zip(rows, prompts, outcomes):
        for s in range(n):
            gen = out[s] if isinstance(out, list) else None
            records.append({"id": row["id"], "sample": row.get("first", 0) + s,
                            "question": row["question"],
                            "gold": row["gold"], "prompt": prompt,
                            "completion": gen.text if gen else "",
                            "finish_reason": gen.finish_reason if gen else "error",
                            "error": None if gen else str(out)})
            gens.append(gen)
            if gen is None:
                counters["errors"] += 1
                continue
            counters["traces"] += 1
            counters["tokens"] += int(gen.token_ids.shape[0])
            counters["truncated"] += gen.finish_reason == "length"
    for key, value in extras.kd_check.items():
        counters[f"kd_{key}"] = value - kd_before.get(key, 0)
    counters.update(_ledger(extras, used_before, prompts, counters["tokens"], g))
    stats = extras.stats
    if "cache_hits" in stats:  # API backends: requests sent (attempts) and answered by the cache
        counters["requests"] = stats["requests"] - stats_before["requests"]
        counters["cached"] = stats["cache_hits"] - stats_before["cache_hits"]
    table = traces_table(records, gens, g.top_k, g.shard_format)
    if previous is not None:
        table, counters = _merge_retried(shard, previous, table, counters)
    return ShardOutput({"traces": table}, counters, teacher.facts())


def _used(extras: Extras) -> dict:
    """What the teacher has used so far: its own ledger (API backends), and its engine time."""
    return {**(extras.usage or {}), "engine_s": extras.stats.get("engine_s", 0.0)}


def _ledger(extras: Extras, before: dict, prompts: list[str], tokens: int,
            g: GenerateConfig) -> dict:
    """A shard's ledger counters (`pipeline.costs`): prompt and completion tokens and cost of
    the responses it used (an API backend counts them from the server's usage, cached ones
    included: the data cost them once); a local engine's prompt tokens by its tokenizer (once
    per prompt, as the engine reads it once for its `n` samples), its generated tokens, its
    engine seconds at `price_hour`."""
    now = _used(extras)
    if extras.usage is not None:  # an API backend keeps its own ledger
        out = {k: now[k] - before.get(k, 0) for k in ("prompt_tokens", "completion_tokens",
                                                    "batch_tokens", "cost", "usage_estimated",
                                                    "usage_by_bytes")}
        out["cost"] = round(out["cost"], 9)
        return out
    seconds = now["engine_s"] - before.get("engine_s", 0.0)
    tokenizer, render = extras.tokenizer, extras.render
    prompt = (sum(len(ids) for ids in tokenizer([render(p) for p in prompts],
                                                add_special_tokens=False)["input_ids"])
              if tokenizer is not None and prompts else 0)
    cost = Prices.of(g).cost(prompt, tokens, seconds=seconds)
    return {"prompt_tokens": prompt, "completion_tokens": tokens, "engine_s": round(seconds, 3),
            "cost": round(cost, 9)}


def _merge_retried(shard: Shard, previous: pa.Table, retried: pa.Table,
                   counters: dict) -> tuple[pa.Table, dict]:
    """The shard's earlier rows with the retried ones in place of its failed rows, in the
    shard's row order; counters recounted (the KD checks of the earlier rows added)."""
    order = {row_id: i for i, row_id in enumerate(shard.load().column("id").to_pylist())}
    kept = previous.filter(pc.is_null(previous.column("error"))).replace_schema_metadata(None)
    both = pa.concat_tables([as_format(kept, shard_format(retried.schema)).cast(retried.schema),
                             retried])
    rank = [order[i] * 1_000_000 + s for i, s in zip(both.column("id").to_pylist(),
                                                 both.column("sample").to_pylist())]
    both = both.take(pc.sort_indices(pa.array(rank)))
    ok = both.column("error").null_count
    out = {"rows": len(order), "traces": ok, "errors": both.num_rows - ok,
           "tokens": int(pc.sum(pc.list_value_length(both.column("token_ids"))).as_py() or 0),
           "truncated": int(pc.sum(pc.equal(both.column("finish_reason"), "length")).as_py()
                            or 0)}
    for key, value in counters.items():
        if key.startswith("kd_") or key in LEDGER_KEYS or key in (
                "usage_estimated", "usage_by_bytes", "requests", "cached"):
            out[key] = value + (shard.previous_counters or {}).get(key, 0)
    return both, out


def kd_usability(manifest: dict) -> None:
    """Whether the log-probabilities of all shards can be used for KD, and why not."""
    totals, facts = manifest["counters"], manifest["facts"]
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


WORKER_CACHES = "requests"  # one published cache per worker, merged into REQUEST_CACHE


class _PublishingTeacher:
    """A teacher whose worker-local request cache is published to the stage folder after
    every call and at the end, so responses paid for by a worker are never only on its disk."""

    def __init__(self, backend: Backend, publish: Callable[[], None]):
        self._backend, self._publish = backend, publish

    def __getattr__(self, name: str):
        return getattr(self._backend, name)

    def generate(self, prompts, settings):
        try:
            return self._backend.generate(prompts, settings)
        finally:
            self._publish()

    def close(self) -> None:
        try:
            self._publish()
        finally:
            self._backend.close()


def teacher_factory(cfg: Config, folder: StageFolder,
                    per_worker: bool = False) -> Callable[[], Backend]:
    """The configured teacher, built when called.

    A backend with a request cache (`BackendKind.request_cache`, the openai one) keeps it in
    `generate/requests.sqlite` when one process on a local run folder does the stage; with
    several workers (Ray, a job array) or a run folder on object storage (`per_worker`), each
    worker keeps its own SQLite file on its own disk, reads the run's merged cache under it,
    and publishes a copy as `generate/requests/<worker>.sqlite` after every shard; the commit
    merges them into `requests.sqlite`.
    """
    def build() -> Backend:
        g = cfg.generate
        kind = BACKENDS.get(g.backend, "generate.backend")
        log("generate", f"loading teacher {g.model} ({g.backend}, {g.dtype})")
        t0 = time.time()
        if not kind.request_cache:
            teacher = kind.build(cfg, None, None)
        elif not per_worker:
            teacher = kind.build(cfg, folder.local.path(REQUEST_CACHE, f"the {g.backend} "
                                                        "backend's request cache"), None)
        else:
            import socket

            worker = f"{socket.gethostname()}-{os.getpid()}"
            seed = folder.local.scratch(f"seed-{worker}.sqlite")
            backend = kind.build(cfg, folder.local.scratch(f"live-{worker}.sqlite"),
                                 seed if folder.local.download(REQUEST_CACHE, seed) else None)

            def publish() -> None:
                copy = folder.local.scratch(f"copy-{worker}.sqlite")
                backend.cache.snapshot(copy)
                folder.local.upload(copy, f"{WORKER_CACHES}/{worker}.sqlite")

            teacher = _PublishingTeacher(backend, publish)
        log("generate", f"teacher ready in {time.time() - t0:.0f}s")
        return teacher

    return build


def unconfirmed_fact(folder: StageFolder, g: GenerateConfig) -> dict | None:
    """The requests the run's request cache records as sent without a stored answer (a kill,
    a timeout, a lost connection: the provider may have billed them), at their worst case:
    the ledger's unconfirmed part. None when there are none (or no local cache)."""
    from stages.backends.request_cache import RequestCache

    if not folder.run.is_local or not folder.exists(REQUEST_CACHE):
        return None
    cache = RequestCache(folder.local.path(REQUEST_CACHE, "the request cache"))
    try:
        open_ = cache.unconfirmed()
    finally:
        cache.db.close()
    requests = sum(n for n, _, _ in open_.values())
    if not requests:
        return None
    prices = Prices.of(g)
    return {"requests": requests,
            "prompt_tokens": sum(p for _, p, _ in open_.values()),
            "completion_tokens": sum(c for _, _, c in open_.values()),
            "cost": round(sum(prices.cost(p, c, batch) for batch, (_, p, c) in open_.items()),
                          9)}


def merge_worker_caches(folder: StageFolder) -> None:
    """Merge the request caches the workers published into the run's `requests.sqlite` (then
    remove the merged copies; the responses live on in the merged cache)."""
    from stages.backends.request_cache import merge_request_caches

    found = folder.files_under(WORKER_CACHES, ".sqlite")
    if not found:
        return
    local = folder.run.is_local
    merged = (folder.local.path(REQUEST_CACHE, "the request cache") if local
              else folder.local.scratch("merged.sqlite"))
    if not local:
        merged.unlink(missing_ok=True)
        folder.local.download(REQUEST_CACHE, merged)
    copies = []
    for i, file in enumerate(found):
        copy = folder.local.scratch(f"merge-{i}.sqlite")
        folder.local.download(file, copy)
        copies.append(copy)
    total = merge_request_caches(merged, copies)
    if not local:
        folder.local.upload(merged, REQUEST_CACHE)
    for file, copy in zip(found, copies):
        folder.remove(file)
        copy.unlink(missing_ok=True)
    log("generate", f"merged {len(found)} worker request cache(s) into "
        f"{folder.where(REQUEST_CACHE)} ({total} responses)")


def too_many_failed(manifest: dict, share: float) -> None:
    """Stop before the manifest is written when more than `share` of the rows failed."""
    c = manifest["counters"]
    failed, total = c.get("errors", 0), c.get("traces", 0) + c.get("errors", 0)
    if not total or failed / total <= share:
        return
    first = next((s["name"] for s in manifest["shards"] if s["counters"].get("errors")), "?")
    raise RuntimeError(
        f"{failed} of {total} traces ({failed / total:.0%}) ended with an error, more than "
        f"generate.max_failed_share={share:g}; the stage is not finished. The {total - failed} "
        f"traces made are kept. See the error column of the shards (first: shard {first}); "
        "fix the cause, then run `distill generate --retry-failed` to re-send only the failed "
        "rows (or raise generate.max_failed_share to accept them)")


def plan(cfg: Config, run: RunFolder, teacher: Callable[[], Backend] | None = None,
         per_worker: bool = False, retry_failed: bool = False) -> Stage:
    """The generate stage of `run`: one shard per `rows_per_shard` task rows; with
    `retry_failed`, shards with failed rows are done again, only for those rows."""
    g = cfg.generate
    folder = run.stage("generate")
    settings = generate_fingerprinted(cfg)
    template = PromptTemplate(g.prompt_template)
    facts = {"k": g.top_k, "schema_version": SCHEMA_VERSION, "template": g.prompt_template,
             "template_sha256": template.sha256, "sampling": {
                 "n": g.n_samples, "temperature": g.temperature, "top_p": g.top_p,
                 "max_new_tokens": g.max_new_tokens, "seed": g.seed, "stop": g.stop},
             "prices": prices_fact(g)}

    return Stage(
        name="generate", fingerprinted=settings, shards=task_shards(cfg), work=generate_shard,
        settings=GenerateSettings(g, template),
        outputs=["traces"], resources=teacher or teacher_factory(cfg, folder, per_worker),
        facts=facts, upstream={"task": cfg.section("task")}, finalize=_finalizer(g, folder),
        rates=("tokens", "requests"), paid=True,
        redo=_has_failed_rows if retry_failed else None)


def prices_fact(g: GenerateConfig) -> dict:
    """The prices a round ran with (its ledger's costs are at these), in its manifest."""
    p = Prices.of(g)
    return {"input": p.input, "output": p.output, "batch_discount": p.batch_discount,
            "hour": p.hour, "priced": p.priced, "transport": g.transport}


def _finalizer(g: GenerateConfig, cache_folder: StageFolder) -> Callable[[dict], None]:
    """What every generate round does before its manifest: the KD usability of its top-k,
    the workers' request caches merged into `cache_folder`'s, the failed-share stop."""
    def finalize(manifest: dict) -> None:
        kd_usability(manifest)
        if BACKENDS.get(g.backend).request_cache:
            merge_worker_caches(cache_folder)
            unconfirmed = unconfirmed_fact(cache_folder, g)
            if unconfirmed:
                manifest["facts"]["unconfirmed"] = unconfirmed
        too_many_failed(manifest, g.max_failed_share)

    return finalize


def round_stage(cfg: Config, run: RunFolder, rnd: Round,
                teacher: Callable[[], Backend] | None = None, per_worker: bool = False,
                retry_failed: bool = False) -> Stage:
    """A round after the first (`stages.generate.rounds`) as a stage of its own folder; its teacher
    keeps its request cache in the generate folder, with the first round's."""
    g = cfg.generate
    cache_folder = run.stage("generate")
    template = PromptTemplate(rnd.template)
    facts = {"k": g.top_k, "schema_version": SCHEMA_VERSION, "template": rnd.template,
             "template_sha256": template.sha256, "round": rnd.number, "hinted": rnd.hinted,
             "sampling": {"n": rnd.samples, "temperature": rnd.temperature, "top_p": g.top_p,
                          "max_new_tokens": g.max_new_tokens, "seed": g.seed, "stop": g.stop,
                          "seeds": "per question and sample index"},
             "prices": prices_fact(g)}

    return Stage(
        name=rnd.folder, fingerprinted=round_fingerprinted(cfg, rnd), shards=rnd.shards(),
        work=generate_shard,
        settings=GenerateSettings(g, template, rnd.samples, rnd.temperature, later_round=True,
                                  hint_answer=answer_checker(cfg).canonical if rnd.hinted
                                  else None),
        outputs=["traces"], resources=teacher or teacher_factory(cfg, cache_folder, per_worker),
        facts=facts, upstream={"generate": cache_folder.manifest()["fingerprint"]},
        finalize=_finalizer(g, cache_folder), rates=("tokens", "requests"), paid=True,
        redo=_has_failed_rows if retry_failed else None)


class _SharedTeacher:
    """One teacher for every round of a run in this process (a vLLM engine takes a minute to
    start): `factory` builds it at the first round that needs it; the rounds' `close()` leaves
    it open, `close_all()` closes it at the end."""

    def __init__(self, factory: Callable[[], Backend]):
        self._factory, self._backend = factory, None

    def __call__(self) -> "_SharedTeacher":
        if self._backend is None:
            self._backend = self._factory()
        return self

    def __getattr__(self, name: str):
        return getattr(self._backend, name)

    def generate(self, prompts, settings):
        return self._backend.generate(prompts, settings)

    def close(self) -> None:
        """Kept open for the next round."""

    def close_all(self) -> None:
        backend, self._backend = self._backend, None
        if backend is not None and hasattr(backend, "close"):
            backend.close()


def _has_failed_rows(record: dict) -> bool:
    return record.get("counters", {}).get("errors", 0) > 0


def imported(run: RunFolder) -> bool:
    """Whether the run's traces came from `distill import` (no teacher to run)."""
    return bool(((run.stage("generate").manifest() or {}).get("facts") or {}).get("imported"))


def main(cfg: Config, run: RunFolder | str | Path, force: bool = False,
         teacher: Callable[[], Backend] | None = None,
         role: ArrayRole | None = None, retry_failed: bool = False) -> dict | None:
    """Run the generate stage; `teacher` builds the backend instead of the configured one;
    `role`: this process's part of a job array (None: the whole stage, with the executor of
    `generate.executor`); `retry_failed`: re-send only the rows that ended with an error.
    Returns the manifest (None from an array worker)."""
    run, g = as_run_folder(run), cfg.generate
    if imported(run) and not force:
        raise ValueError(
            f"the traces of {run} were imported (`distill import`); `distill "
            "generate` would replace them with a teacher's. Run `distill filter`, `train` and "
            "`eval` on them instead, or add --force to generate (the imported traces are "
            "kept aside)")
    executor = executor_for(g.executor, g.workers, cfg, role)
    # workers apart from this process (or a run folder on object storage) keep a request cache
    # each on their own disk: SQLite is unsafe on shared file systems and impossible on S3
    per_worker = executor.workers_apart or not run.is_local
    if per_worker and (g.transport == "batch" or g.budget or g.budget_tokens):
        what = "transport=batch" if g.transport == "batch" else "a budget"
        raise ValueError(
            f"generate: {what} needs one process on a local run folder (it keeps one record of "
            "what was submitted and spent); this run has workers apart or a run folder on "
            "object storage. Use generate.executor=local (the API's concurrency and batch API "
            "do the parallel work) and a local run folder, then copy it where you like")
    shared = None
    if not executor.workers_apart and role is None:
        shared = _SharedTeacher(teacher or teacher_factory(cfg, run.stage("generate"),
                                                           per_worker))
    try:
        first = plan(cfg, run, shared or teacher, per_worker, retry_failed)
        manifest = (finished(first.fingerprinted, first.shards, run.stage("generate"))
                    if role is not None and not force else None)
        if manifest is None:  # (a job array's later pass finds the first round finalized)
            manifest = run_stage(first, run.stage("generate"), force, executor)
            if manifest is None:
                return None
            _said(manifest)
            if role is not None:  # --finalize of the first round: the next round is a pass
                rounds = Rounds(cfg, run, manifest)
                _say_next(rounds, "generate")
                return manifest
        return _later_rounds(cfg, run, manifest, shared or teacher, per_worker, force,
                             executor, role, retry_failed)
    finally:
        if shared is not None:
            shared.close_all()


def _later_rounds(cfg: Config, run: RunFolder, manifest: dict, teacher, per_worker: bool,
                  force: bool, executor, role: ArrayRole | None, retry_failed: bool) -> dict:
    """The rounds after the first (`stages.generate.rounds`), each run like the first; a job array
    does one round per pass (workers, then `--finalize`), so a pass stops after the round it
    worked on. Returns the first round's manifest."""
    rounds = Rounds(cfg, run, manifest)
    while (rnd := rounds.next()) is not None:
        stage = round_stage(cfg, run, rnd, teacher, per_worker, retry_failed)
        folder = run.stage(rnd.folder)
        done = (finished(stage.fingerprinted, stage.shards, folder)
                if role is not None and not force else None)
        if done is None:
            log("generate", rnd.describe(rounds.k))
            done = run_stage(stage, folder, force, executor)
            if done is None:  # an array worker did its part of this round
                return None
            if role is not None:  # --finalize: this round is committed, the next is a pass
                rounds.add(rnd, done)
                _say_next(rounds, rnd.folder)
                return manifest
            _said(done, rnd.folder)
        rounds.add(rnd, done)
    book = write_ledger(run, manifest, rounds)
    c = rounds.coverage()
    tokens = manifest["counters"].get("tokens", 0) + sum(r["tokens"] for r in rounds.summary())
    share = c["covered"] / max(1, c["questions"])
    said = (f"{c['covered']} of {c['questions']} questions ({share:.1%}) have a trace the "
            "filter keeps" + (f", {c['covered_wanted']} have {rounds.k}" if rounds.k > 1 else ""))
    if rounds.done:
        log("generate", f"{len(rounds.done) + 1} rounds ({rounds.why}): {said}; "
            f"{c['samples']} samples, {tokens} tokens in all")
    else:
        log("generate", f"question coverage: {said}")
    if len(book["rounds"]) > 1:
        for line in ledger_lines(book, covered=c["covered"]):
            log("generate", line + " (all rounds)")
    return manifest


LEDGER = "ledger.json"


def write_ledger(run: RunFolder, first: dict, rounds: Rounds | None = None) -> dict:
    """`generate/ledger.json`: the run's ledger (`pipeline.costs.ledger`) over the first round
    and the later rounds the settings ask for; returned."""
    parts = [("generate", first)] + [(r.folder, m) for r, m in (rounds.done if rounds else [])]
    book = ledger(parts)
    run.stage("generate").write_json(LEDGER, book)
    return book


def _say_next(rounds: Rounds, finalized: str) -> None:
    """What a job array's `--finalize` of one round says comes next."""
    upcoming = rounds.next()
    log("generate", f"{finalized} finalized; " + (
        f"next: run the array again (workers, then --finalize) for {upcoming.folder}: "
        f"{upcoming.describe(rounds.k)}" if upcoming else f"no more rounds ({rounds.why})"))


def _said(manifest: dict, what: str = "generate") -> None:
    c = manifest["counters"]
    log(what, f"{c.get('rows', 0)} rows -> {c.get('traces', 0)} traces, "
        f"{c.get('tokens', 0)} tokens, {c.get('truncated', 0)} truncated, "
        f"{c.get('errors', 0)} errors")
    book = ledger([(what, manifest)])
    for line in ledger_lines(book):
        log(what, line)
    if "cached" in c:
        log(what, f"requests: {c.get('requests', 0)} sent, {c.get('cached', 0)} answered from "
            "the request cache (paid before, not again)")
    if c.get("usage_estimated"):
        by_bytes = c.get("usage_by_bytes", 0)
        how = ("their completion tokens are the tokens of their log-probabilities, and the "
               + (f"prompt tokens of {by_bytes} of them are estimated as UTF-8 bytes / 4, "
                  "without a tokenizer (set generate.tokenizer for exact counts; the bill may "
                  "differ)" if by_bytes else "prompt tokens are counted by the teacher's "
                  "tokenizer"))
        log(what, f"{c['usage_estimated']} responses had no usage: {how}")
    if not manifest["facts"].get("usable_for_kd", True):
        log(what, "the log-probabilities are not usable for KD: "
            + manifest["facts"].get("kd_unusable_because", ""))
