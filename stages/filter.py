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

import difflib
import re
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc

from pipeline.config import Config, FilterConfig, fingerprinted
from pipeline.executors import ArrayRole, executor_for, run_stage
from pipeline.fingerprints import manifest_digest
from pipeline.log import log
from pipeline.registry import BACKENDS
from pipeline.run_folder import RunFolder, as_run_folder
from pipeline.schema import (FILTER_COLUMNS, TRACE_SCHEMA, TRACE_SCHEMA_V2, kept_schema,
                             rejected_schema, shard_format)
from pipeline.stage import Progress, Shard, ShardOutput, Stage, no_progress
from stages.checks.answers import NO_ANSWER, AnswerChecker, answer_checker, is_marker
from stages.checks.traces import Trace, count_steps, ordered_checks
from stages.dataset_card import CARD, write_dataset_card
from stages.figures import png, pyplot

# Drops decided per question, among the traces every check kept.
QUESTION_REASONS = {
    "duplicate": "the same (or nearly the same) rationale as a kept trace of the question",
    "over_cap": "more traces of the question than filter.max_per_question",
}


def reasons() -> list[str]:
    """Every reason a trace can be dropped for, in the order the checks run."""
    return [c.name for c in ordered_checks()] + list(QUESTION_REASONS)


def explained() -> dict[str, str]:
    """Each reason in words."""
    return {**{c.name: c.explained for c in ordered_checks()}, **QUESTION_REASONS}


def _norm_words(text: str) -> list[str]:
    return re.findall(r"[a-z0-9]+(?:[.,][0-9]+)*", text.lower())


def similar(a: list[str], b: list[str], threshold: float) -> bool:
    """Word-sequence similarity (difflib's ratio, 2 * matched words / all words) >= threshold;
    the cheap upper bounds are tried first."""
    m = difflib.SequenceMatcher(None, a, b, autojunk=False)
    return (m.real_quick_ratio() >= threshold and m.quick_ratio() >= threshold
            and m.ratio() >= threshold)


def check_trace(row: dict, cfg: FilterConfig, checker: AnswerChecker, *, gold: str | None,
                gold_source: str, checks: list | None = None) -> tuple[str | None, dict]:
    """(reason or None, the added columns) for one trace, checked against `gold`: the row's
    gold answer (`gold_source="gold"`) or its samples' majority answer ("majority"), None
    when there is neither. The registered checks (`checks`: `ordered_checks()`, looked up
    once per shard by the caller) run in their order; the first that fails gives the
    reason."""
    text = row["completion"] or ""
    found = row.get("_found") or checker.extract(text, row.get("question") or "")
    marker = is_marker(found.extractor)
    rationale = text[:found.start].strip() if marker else text.strip()
    words = text.split()
    added = {"pred_answer": found.answer, "extractor": found.extractor, "rationale": rationale,
             "n_steps": count_steps(rationale), "n_tokens": len(row["token_ids"] or []),
             "n_words": len(words), "n_equations": 0, "repeat_share": 0.0,
             "gold_source": gold_source if gold is not None else None,
             "agreement": row.get("_agreement"), "detail": None}
    trace = Trace(row, found, marker, rationale, gold, checker, added)
    for check in checks if checks is not None else ordered_checks():
        detail = check(trace, cfg)
        if detail is not None:
            if detail:
                added["detail"] = detail
            return check.name, added
    return None, added


def _majority(rows: list[dict], checker: AnswerChecker, cfg: FilterConfig):
    """(pseudo-gold or None, agreement) from the answers of one question's samples."""
    keys = [checker.key(r["_found"].answer) for r in rows
            if r["_found"].answer != NO_ANSWER and not r.get("error")]
    if not keys:
        return None, 0.0
    key, votes = Counter(keys).most_common(1)[0]
    agreement = votes / len(rows)
    if votes < cfg.min_votes or agreement < cfg.min_agreement:
        return None, agreement
    answer = next(r["_found"].answer for r in rows if checker.key(r["_found"].answer) == key)
    return answer, agreement


@dataclass
class FilterSettings:
    """What `filter_shard` needs besides the shard: the settings and the answer checker."""

    cfg: FilterConfig
    checker: AnswerChecker


def filter_shard(settings: FilterSettings, shard: Shard, resources: None = None,
                 progress: Progress = no_progress) -> ShardOutput:
    """The kept and the rejected traces of one generate shard, and the funnel's counts."""
    cfg, checker = settings.cfg, settings.checker
    checks = ordered_checks()
    table = shard.load()
    # Token columns pass through untouched: only the small columns go through Python.
    small = table.select(["id", "sample", "question", "completion", "finish_reason", "gold",
                          "error"]).to_pylist()
    lengths = pc.list_value_length(table.column("token_ids")).to_pylist()
    by_question: dict[str, list[int]] = {}
    for i, row in enumerate(small):
        row["token_ids"] = range(lengths[i] or 0)
        row["_found"] = checker.extract(row["completion"] or "", row["question"] or "")
        by_question.setdefault(row["id"], []).append(i)
    results: list[tuple[str | None, dict]] = [None] * len(small)  # type: ignore[list-item]
    samples = [row["sample"] for row in small]
    for ids in by_question.values():
        gold = small[ids[0]]["gold"]
        source = "gold"
        if gold is None:
            gold, agreement = _majority([small[i] for i in ids], checker, cfg)
            source = "majority"
            for i in ids:
                small[i]["_agreement"] = round(agreement, 4)
        for i in ids:
            results[i] = check_trace(small[i], cfg, checker, gold=gold, gold_source=source,
                                     checks=checks)
        _dedup_and_cap([i for i in ids if results[i][0] is None], results, cfg, samples)

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


def _dedup_and_cap(kept: list[int], results: list, cfg: FilterConfig,
                   samples: list[int]) -> None:
    """Among one question's kept traces (in sample order): duplicates of an earlier kept one
    dropped, then at most `max_per_question` kept."""
    survivors = kept
    if cfg.dedup != "off" and len(kept) > 1:
        chosen: list[tuple[str, list[str]]] = []
        survivors = []
        for i in kept:
            added = results[i][1]
            words = _norm_words(added["rationale"])
            key = " ".join(words)
            twin = next((k for k, (other_key, other) in enumerate(chosen)
                         if key == other_key or cfg.dedup == "near"
                         and similar(words, other, cfg.near_duplicate)), None)
            if twin is not None:
                added["detail"] = f"duplicate of sample {samples[survivors[twin]]} of this " \
                    "question"
                results[i] = ("duplicate", added)
                continue
            chosen.append((key, words))
            survivors.append(i)
    if cfg.max_per_question:
        for n, i in enumerate(survivors):
            if n >= cfg.max_per_question:
                results[i] = ("over_cap", results[i][1])


def funnel_table(counters: dict) -> str:
    total = counters.get("traces_in", 0) or 1
    lines = [f"{'step':<28}{'traces':>10}{'share':>9}",
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
    ax.set_title(title or "filter funnel")
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
            "extractors": checker.order,
            "labels": checker.labels if checker.kind == "label" else None}


def plan(cfg: Config, run: RunFolder) -> Stage:
    """The filter stage of `run`: one shard per generate shard."""
    generated = run.stage("generate")
    upstream = generated.manifest()
    if upstream is None:
        raise FileNotFoundError(f"no finished generate stage in {generated}; run `make "
                                "generate` (or `distill generate`) for this run first")
    checker = answer_checker(cfg, cfg.filter.extractors)
    settings = filter_fingerprinted(cfg)
    then = remake_generate_hint(upstream)
    shards = [Shard(s["name"], s["outputs"]["traces"]["sha256"], s["outputs"]["traces"]["rows"],
                    lambda e=s["outputs"]["traces"]: generated.read_checked(e, then=then))
              for s in upstream["shards"]]
    return Stage(
        name="filter", fingerprinted=settings, shards=shards,
        work=filter_shard, settings=FilterSettings(cfg.filter, checker),
        outputs=["kept", "rejected"], facts=upstream.get("facts", {}),
        upstream={"generate": upstream["fingerprint"], "digest": manifest_digest(upstream)},
        finalize=lambda manifest: write_reports(run.stage("filter"), manifest, cfg, run.name),
        unit="trace")


def write_reports(folder, manifest: dict, cfg: Config, run_name: str) -> None:
    """`funnel.json`, `funnel.png` and the dataset card with its SFT pairs: written before the
    manifest (from `Stage.finalize`), so a stage whose manifest is there has them all."""
    counters = manifest["counters"]
    folder.write_json("funnel.json", {
        "counters": counters, "reasons": reasons(), "explained": explained(),
        "answer_kind": manifest["settings"]["answer_kind"], "settings": cfg.section("filter")})
    if cfg.filter.plot:
        folder.write_bytes("funnel.png", draw_funnel(counters, f"filter funnel: {run_name}"))
    write_dataset_card(folder, manifest, run_name)


def main(cfg: Config, run: RunFolder | str | Path, force: bool = False,
         role: ArrayRole | None = None) -> dict | None:
    """Run the filter stage, print its funnel; `funnel.json`, `funnel.png` and the folder's
    dataset card with the SFT pairs (`stages.dataset_card`) are written before its manifest.
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
    print(funnel_table(counters))
    if counters.get("pseudo_gold_rows"):
        log("filter", f"{counters['pseudo_gold_rows']} unlabeled rows got a majority-vote "
            "pseudo-gold (see the gold_source and agreement columns)")
    return manifest
