"""Stage 2, filter: keep traces with a correct answer, real steps and a sane length.

Each generate shard gives a `kept-NNNNN.parquet` and a `rejected-NNNNN.parquet` (with the
reason). Every check answers keep, or drop with a reason; the first failing check is the
reason, and every reason is counted in the funnel (`funnel.json`, printed as a table). This
stage reads only the generate shards: it never loads a model.
"""

from __future__ import annotations

import re
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc

from pipeline import store
from pipeline.config import Config, FilterConfig
from pipeline.runner import ShardInput, ShardOutput, log, run_shard_stage
from stages.answers import (MARKER_EXTRACTORS, NO_ANSWER, answers_match, canonical_answer,
                            extract_answer)
from stages.generate import TRACE_SCHEMA

ADDED = [("pred_answer", pa.string()), ("extractor", pa.string()), ("rationale", pa.string()),
         ("n_steps", pa.int32()), ("n_tokens", pa.int32())]
KEPT_SCHEMA = pa.schema(list(TRACE_SCHEMA) + [pa.field(n, t) for n, t in ADDED])
REJECTED_SCHEMA = KEPT_SCHEMA.append(pa.field("reason", pa.string()))

# The reasons, in the order the checks run.
REASONS = ["generation_error", "truncated", "no_answer", "no_answer_marker", "no_gold",
           "wrong_answer", "too_few_steps", "too_short", "too_long"]

_CALC = re.compile(r"\d\s*[-+*/×x÷]\s*\(?\d|=\s*-?\$?\d")
_UNIT = re.compile(r"(?<=[.!?])\s+|\n+")


def count_steps(rationale: str) -> int:
    """Sentences or lines of the rationale that carry a calculation (`5 + 3 = 8`)."""
    return sum(1 for part in _UNIT.split(rationale) if _CALC.search(part))


def check_trace(row: dict, cfg: FilterConfig, numeric: bool) -> tuple[str | None, dict]:
    """Return (reason or None, the added columns) for one trace."""
    text = row["completion"] or ""
    found = extract_answer(text, cfg.extractors)
    rationale = text[:found.start].strip() if found.extractor in MARKER_EXTRACTORS else \
        text.strip()
    added = {"pred_answer": found.answer, "extractor": found.extractor, "rationale": rationale,
             "n_steps": count_steps(rationale), "n_tokens": len(row["token_ids"] or [])}
    if row.get("error"):
        return "generation_error", added
    if cfg.drop_truncated and row["finish_reason"] == "length":
        return "truncated", added
    if found.answer == NO_ANSWER:
        return "no_answer", added
    if cfg.require_answer_marker and found.extractor not in MARKER_EXTRACTORS:
        return "no_answer_marker", added
    if row["gold"] is None:
        return "no_gold", added
    if not answers_match(found.answer, row["gold"], numeric, cfg.tolerance):
        return "wrong_answer", added
    added["pred_answer"] = canonical_answer(found.answer, numeric)
    if added["n_steps"] < cfg.min_steps:
        return "too_few_steps", added
    if added["n_tokens"] < cfg.min_tokens:
        return "too_short", added
    if added["n_tokens"] > cfg.max_tokens:
        return "too_long", added
    return None, added


def filter_shard(table: pa.Table, cfg: FilterConfig, numeric: bool) -> ShardOutput:
    # Token columns pass through untouched: only the small columns go through Python.
    small = table.select(["completion", "finish_reason", "gold", "error"]).to_pylist()
    lengths = pc.list_value_length(table.column("token_ids")).to_pylist()
    kept_idx, rej_idx, kept_add, rej_add, reasons = [], [], [], [], []
    counters = {"traces_in": table.num_rows, "kept": 0, **{f"dropped:{r}": 0 for r in REASONS}}
    for i, row in enumerate(small):
        row["token_ids"] = range(lengths[i] or 0)
        reason, added = check_trace(row, cfg, numeric)
        if reason is None:
            kept_idx.append(i)
            kept_add.append(added)
            counters["kept"] += 1
        else:
            rej_idx.append(i)
            rej_add.append(added)
            reasons.append(reason)
            counters[f"dropped:{reason}"] += 1

    def build(idx: list[int], adds: list[dict], schema: pa.Schema, extra=None) -> pa.Table:
        part = table.take(pa.array(idx, type=pa.int64())).cast(TRACE_SCHEMA)
        for name, typ in ADDED:
            part = part.append_column(pa.field(name, typ), pa.array([a[name] for a in adds],
                                                                  type=typ))
        if extra is not None:
            part = part.append_column(pa.field("reason", pa.string()), pa.array(extra,
                                                                              pa.string()))
        return part.cast(schema)

    return ShardOutput({"kept": build(kept_idx, kept_add, KEPT_SCHEMA),
                        "rejected": build(rej_idx, rej_add, REJECTED_SCHEMA, reasons)},
                       counters)


def funnel_table(counters: dict) -> str:
    total = counters.get("traces_in", 0) or 1
    lines = [f"{'step':<28}{'traces':>10}{'share':>9}",
             f"{'traces in':<28}{counters.get('traces_in', 0):>10}{'100.0%':>9}"]
    for reason in REASONS:
        n = counters.get(f"dropped:{reason}", 0)
        if n:
            lines.append(f"{'  dropped: ' + reason:<28}{n:>10}{100 * n / total:>8.1f}%")
    kept = counters.get("kept", 0)
    lines.append(f"{'kept':<28}{kept:>10}{100 * kept / total:>8.1f}%")
    return "\n".join(lines)


def main(cfg: Config, run_dir: Path, force: bool = False) -> dict:
    gen_dir = run_dir / "generate"
    upstream = store.read_manifest(gen_dir)
    if upstream is None:
        raise FileNotFoundError(f"no finished generate stage in {gen_dir}; run `make generate` "
                                "(or `distill generate`) for this run first")
    numeric = cfg.task.kind in ("demo", "gsm8k") or cfg.task.answer_type == "numeric"
    settings = {"filter": cfg.section("filter"), "numeric": numeric}
    fp = store.fingerprint(settings)
    inputs = [ShardInput(name=s["name"], checksum=s["outputs"]["traces"]["sha256"],
                         load=lambda f=s["outputs"]["traces"]["file"]: store.read_shards(
                             gen_dir, [f]))
              for s in upstream["shards"]]
    manifest = run_shard_stage(
        "filter", run_dir / "filter", fp, settings, inputs,
        lambda inp, table: filter_shard(table, cfg.filter, numeric), ["kept", "rejected"],
        facts=upstream.get("facts", {}), upstream={"generate": upstream["fingerprint"],
                                                   "digest": store.manifest_digest(upstream)},
        force=force)
    report = {"counters": manifest["counters"], "reasons": REASONS,
              "settings": cfg.section("filter")}
    store.write_json_atomic(run_dir / "filter" / "funnel.json", report)
    print(funnel_table(manifest["counters"]))
    return manifest
