"""Stage 2, filter: keep traces with a correct answer, real steps and a sane length.

Each generate shard gives a `kept-NNNNN.parquet` and a `rejected-NNNNN.parquet` (with the
reason and its detail). Every check answers keep, or drop with a reason; the first failing
check is the reason, and every reason is counted in the funnel (`funnel.json`, printed as a
table and drawn as `funnel.png`). The checks, in order:

1. per trace, the registered checks of `stages.checks.traces` (one file each is enough for a
   new one): generation error, truncation, an answer found (and its marker), the answer right
   (against the gold answer, or for unlabeled rows against the majority answer of the row's
   samples), the written arithmetic right, enough reasoning steps, length in tokens and
   words, no looping repetition;
2. per question, among the traces still kept: duplicates dropped, at most
   `max_per_question` kept.

This stage reads only the generate shards: it never loads a model.
"""

from __future__ import annotations

from pathlib import Path

import pyarrow as pa

from pipeline.config import Config, fingerprinted
from pipeline.costs import ledger
from pipeline.executors import ArrayRole, executor_for, run_stage
from pipeline.fingerprints import manifest_digest
from pipeline.log import log
from pipeline.registry import BACKENDS
from pipeline.run_folder import RunFolder, as_run_folder
from pipeline.schema import (FILTER_COLUMNS, TRACE_SCHEMA, TRACE_SCHEMA_V2, kept_schema,
                             rejected_schema, shard_format)
from pipeline.stage import Progress, Shard, ShardOutput, Stage, no_progress
from stages.checks.answers import answer_checker
from stages.checks.traces import ordered_checks
from stages.filter.dataset_card import CARD, write_dataset_card
from pipeline.figures import png, pyplot
# what decides a trace's fate lives in stages.checks.keep (generate's rounds count with it too)
from stages.checks.keep import (FilterSettings, coverage_counters, coverage_lines, decide, explained,
                         reasons)
from stages.filter.pool import pool
from stages.generate.rounds import load_parts, parts_checksum, wanted


def filter_shard(settings: FilterSettings, shard: Shard, resources: None = None,
                 progress: Progress = no_progress) -> ShardOutput:
    """The kept and the rejected traces of one generate shard (with the traces of the later
    rounds of its questions), and the funnel's counts, question coverage among them."""
    checks = ordered_checks()
    table = shard.load()
    small, results, by_question = decide(table, settings, checks)
    lengths = [len(row["token_ids"]) for row in small]

    counters = {"traces_in": table.num_rows, "kept": 0, **{f"dropped:{r}": 0 for r in reasons()}}
    kept_idx, rej_idx, kept_add, rej_add, why = [], [], [], [], []
    for i, (reason, added) in enumerate(results):
        if reason is None:
            kept_idx.append(i)
            kept_add.append(added)
            counters["kept"] += 1
        else:
            rej_idx.append(i)
            rej_add.append(added)
            why.append(reason)
            counters[f"dropped:{reason}"] += 1
    counters["pseudo_gold_rows"] = sum(
        1 for ids in by_question.values() if small[ids[0]]["gold"] is None
        and results[ids[0]][1]["gold_source"] == "majority")
    counters.update(coverage_counters(small, results, by_question, lengths, settings.wanted))

    # the traces in the layout they came in (format 1 or 2); other columns are not carried
    traces = TRACE_SCHEMA_V2 if shard_format(table.schema) == 2 else TRACE_SCHEMA
    own = [column for check in checks for column in check.records]
    table = table.select(traces.names)

    def build(idx: list[int], adds: list[dict], schema: pa.Schema, extra=None) -> pa.Table:
        part = table.take(pa.array(idx, type=pa.int64())).cast(traces)
        for name, typ in FILTER_COLUMNS + own:
            part = part.append_column(pa.field(name, typ), pa.array([a.get(name) for a in adds],
                                                                  type=typ))
        if extra is not None:
            part = part.append_column(pa.field("reason", pa.string()), pa.array(extra,
                                                                              pa.string()))
        return part.cast(schema)

    progress(table.num_rows)
    return ShardOutput({"kept": build(kept_idx, kept_add, kept_schema(traces, own)),
                        "rejected": build(rej_idx, rej_add, rejected_schema(traces, own), why)},
                       counters)


def funnel_table(counters: dict, wanted: int | None = None, book: dict | None = None) -> str:
    total = counters.get("traces_in", 0) or 1
    lines = [*coverage_lines(counters, wanted, book), f"{'step':<28}{'traces':>10}{'share':>9}",
             f"{'traces in':<28}{counters.get('traces_in', 0):>10}{'100.0%':>9}"]
    for reason in reasons():
        n = counters.get(f"dropped:{reason}", 0)
        if n:
            lines.append(f"{'  dropped: ' + reason:<28}{n:>10}{100 * n / total:>8.1f}%")
    kept = counters.get("kept", 0)
    lines.append(f"{'kept':<28}{kept:>10}{100 * kept / total:>8.1f}%")
    return "\n".join(lines)


def draw_funnel(counters: dict, title: str = "") -> bytes:
    """The funnel as a horizontal bar chart (PNG bytes): traces in, each reason's drops,
    kept."""
    plt = pyplot()

    total = counters.get("traces_in", 0) or 1
    rows = [("traces in", counters.get("traces_in", 0), "#7f7f7f")]
    rows += [(f"dropped: {r}", counters.get(f"dropped:{r}", 0), "#d62728") for r in reasons()
             if counters.get(f"dropped:{r}", 0)]
    rows.append(("kept", counters.get("kept", 0), "#2ca02c"))
    fig, ax = plt.subplots(figsize=(7, 0.45 * len(rows) + 1.2))
    labels, values, colors = zip(*rows)
    bars = ax.barh(range(len(rows)), values, color=colors)
    ax.set_yticks(range(len(rows)), labels)
    ax.invert_yaxis()
    for bar, v in zip(bars, values):
        ax.text(bar.get_width(), bar.get_y() + bar.get_height() / 2,
                f" {v:,} ({100 * v / total:.1f}%)", va="center", fontsize=9)
    ax.set_xlim(0, max(values) * 1.35 or 1)
    ax.set_xlabel("traces")
    cover = coverage_lines(counters)
    ax.set_title((title or "filter funnel") + (f"\n{cover[0]}" if cover else ""), fontsize=10)
    fig.tight_layout()
    return png(fig)


def remake_generate_hint(manifest: dict) -> str:
    """How to remake a generate shard found damaged, by what made it."""
    facts = manifest.get("facts", {})
    backend = facts.get("backend")
    paid = backend in BACKENDS.names() and BACKENDS.get(backend).request_cache
    if facts.get("imported"):
        return ("The traces were imported: run the same `distill import` again (with --force) "
                "to remake the shards from your files, then the filter again")
    if paid:
        return ("The teacher was an API: `distill generate` remakes only that shard, from the "
                "request cache (generate/requests.sqlite) for every response it still holds; "
                "any other request is sent (and paid for) again. If you would rather not, put "
                "an intact copy of the file back in place of the damaged one and run the "
                "filter again")
    return ("Run `distill generate` (`make generate`) to remake only that shard (the same "
            "settings and seed give the same traces), then the filter again")


def filter_fingerprinted(cfg: Config) -> dict:
    """What decides the kept traces: the filter section's fingerprinted settings and how
    answers are read."""
    checker = answer_checker(cfg, cfg.filter.extractors)
    return {"filter": fingerprinted(cfg.filter), "answer_kind": checker.kind,
            "extractors": checker.order, "labels": None, **checker.decided_by()}


def plan(cfg: Config, run: RunFolder) -> Stage:
    """The filter stage of `run`: one shard per generate shard."""
    generated = run.stage("generate")
    upstream = generated.manifest()
    if upstream is None:
        raise FileNotFoundError(f"no finished generate stage in {generated}; run `make "
                                "generate` (or `distill generate`) for this run first")
    checker = answer_checker(cfg, cfg.filter.extractors)
    settings = filter_fingerprinted(cfg)
    parts, rounds, students = pool(cfg, run, upstream)
    then = remake_generate_hint(upstream)
    shards = [Shard(name, parts_checksum(p), sum(x.entry["rows"] for x in p),
                    lambda p=p: load_parts(p, then=then)) for name, p in parts.items()]
    facts = dict(upstream.get("facts", {}))
    used_upstream = {"generate": upstream["fingerprint"], "digest": manifest_digest(upstream)}
    if rounds and rounds.done:
        facts["rounds"] = rounds.summary()
        facts["rounds_ended"] = rounds.why
        used_upstream["rounds"] = {r.folder: manifest_digest(m) for r, m in rounds.done}
        unusable = [f"{r.folder}: {m['facts'].get('kd_unusable_because')}"
                    for r, m in rounds.done if not m["facts"].get("usable_for_kd", True)]
        if unusable and facts.get("usable_for_kd", True):
            facts["usable_for_kd"] = False
            facts["kd_unusable_because"] = "; ".join(unusable)
    if students:
        facts["student_rounds"] = sorted(students)
        used_upstream["students"] = students
    facts["wanted_per_question"] = wanted(cfg)
    facts["ledger"] = ledger([("generate", upstream)]
                             + [(r.folder, m) for r, m in (rounds.done if rounds else [])])
    return Stage(
        name="filter", fingerprinted=settings, shards=shards,
        work=filter_shard, settings=FilterSettings(cfg.filter, checker, wanted(cfg)),
        outputs=["kept", "rejected"], facts=facts, upstream=used_upstream,
        finalize=lambda manifest: write_reports(run.stage("filter"), manifest, cfg, run.name),
        unit="trace")


def write_reports(folder, manifest: dict, cfg: Config, run_name: str) -> None:
    """`funnel.json`, `funnel.png` and the dataset card with its SFT pairs: written before the
    manifest (from `Stage.finalize`), so a stage whose manifest is there has them all."""
    counters = manifest["counters"]
    folder.write_json("funnel.json", {
        "counters": counters, "reasons": reasons(), "explained": explained(),
        "wanted_per_question": wanted(cfg),
        "coverage": coverage_lines(counters, wanted(cfg), manifest["facts"].get("ledger")),
        "ledger": manifest["facts"].get("ledger"),
        "answer_kind": manifest["settings"]["answer_kind"], "settings": cfg.section("filter")})
    if cfg.filter.plot:
        folder.write_bytes("funnel.png", draw_funnel(counters, f"filter funnel: {run_name}"))
    write_dataset_card(folder, manifest, run_name)


def main(cfg: Config, run: RunFolder | str | Path, force: bool = False,
         role: ArrayRole | None = None) -> dict | None:
    """Run the filter stage, print its funnel; `funnel.json`, `funnel.png` and the folder's
    dataset card with the SFT pairs (`stages.filter.dataset_card`) are written before its manifest.
    (`role`: this process's part of a job array; None from an array worker)."""
    run = as_run_folder(run)
    folder = run.stage("filter")
    executor = executor_for(cfg.filter.executor, cfg.filter.workers, cfg, role)
    manifest = run_stage(plan(cfg, run), folder, force, executor)
    if manifest is None:
        return None
    if not folder.exists(CARD):  # a stage finished before the reports came before its manifest
        write_reports(folder, manifest, cfg, run.name)
    counters = manifest["counters"]
    print(funnel_table(counters, wanted(cfg), manifest["facts"].get("ledger")))
    if counters.get("pseudo_gold_rows"):
        log("filter", f"{counters['pseudo_gold_rows']} unlabeled rows got a majority-vote "
            "pseudo-gold (see the gold_source and agreement columns)")
    return manifest
