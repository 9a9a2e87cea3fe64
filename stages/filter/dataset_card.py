"""The filter folder as a Hugging Face dataset: a card (`README.md` with `configs:`) and the
kept traces as supervised fine-tuning pairs, so that `datasets.load_dataset(<run>/filter)`
gives the kept traces, `load_dataset(<run>/filter, "rejected")` the rejected ones with their
reasons, and the `prompt_completion` / `messages` configurations what TRL's `SFTTrainer`
takes as it is.

The configurations list their files by name and leave out files without rows, so a folder
written before empty shards got no row group still loads. The pairs are the trainer's own:
`predict: <question>` -> the answer and `explain: <question>` -> the rationale
(`trainer.examples.task_prompt`).
"""

from __future__ import annotations

import json

import pyarrow as pa

from pipeline.run_folder import StageFolder

SFT_DIR = "sft"  # the pairs, one file per kept shard
CARD = "README.md"
SFT_SCHEMA = pa.schema([
    ("id", pa.string()), ("task", pa.string()), ("prompt", pa.string()),
    ("completion", pa.string()),
    ("messages", pa.list_(pa.struct([("role", pa.string()), ("content", pa.string())])))])


def sft_pairs(kept: pa.Table) -> pa.Table:
    """The `predict:` and the `explain:` pair of every kept trace (prompt, completion and the
    same as chat messages; the trainer adds the end-of-sequence token itself)."""
    from trainer.examples import EXPLAIN, PREDICT, task_prompt

    rows = []
    for r in kept.select(["id", "question", "gold", "pred_answer", "rationale"]).to_pylist():
        answer = r["gold"] if r["gold"] is not None else r["pred_answer"]
        for task, target in ((PREDICT, str(answer)), (EXPLAIN, r["rationale"] or "")):
            prompt = task_prompt(task, r["question"] or "")
            rows.append({"id": str(r["id"]), "task": task, "prompt": prompt,
                         "completion": target,
                         "messages": [{"role": "user", "content": prompt.strip()},
                                      {"role": "assistant", "content": target}]})
    return pa.Table.from_pylist(rows, schema=SFT_SCHEMA)


def _config(name: str, files: list[str], columns: list[str] | None = None) -> str:
    lines = [f"- config_name: {name}", "  data_files:", "  - split: train", "    path:"]
    lines += [f"    - {f}" for f in files]
    if columns:
        lines.append(f"  columns: {json.dumps(columns)}")
    return "\n".join(lines)


def card_text(manifest: dict, run_name: str, sft_files: list[str]) -> str:
    """The card: the configurations (files with rows only), then what the data is."""
    files = {e["file"]: e["rows"] for e in manifest["files"]}
    kept = [f for f, n in files.items() if f.startswith("kept-") and n]
    rejected = [f for f, n in files.items() if f.startswith("rejected-") and n]
    configs = []
    if kept:
        configs.append(_config("default", kept))
    if rejected:
        configs.append(_config("rejected", rejected))
    if sft_files:
        configs.append(_config("prompt_completion", sft_files, ["prompt", "completion", "task"]))
        configs.append(_config("messages", sft_files, ["messages", "task"]))
    facts, counters = manifest.get("facts", {}), manifest["counters"]
    drops = [(k.split(":", 1)[1], v) for k, v in counters.items()
             if k.startswith("dropped:") and v]
    funnel = "\n".join(f"| {reason} | {n} |" for reason, n in drops) or "| (none) | 0 |"
    from stages.checks.keep import coverage_lines

    coverage = "".join(f"\n- {line}" for line in
                       coverage_lines(counters, facts.get("wanted_per_question"),
                                      facts.get("ledger")))
    return f"""---
configs:
{chr(10).join(configs)}
tags:
- distillation
- chain-of-thought
---

# Distilled traces: {run_name}

Chain-of-thought traces written by the teacher `{facts.get('teacher', '?')}` (backend
{facts.get('backend', '?')}) and checked by the filter stage (fingerprint
`{manifest['fingerprint']}`): {counters.get('kept', 0)} of {counters.get('traces_in', 0)} traces
kept.
{coverage}

| configuration | what |
|---|---|
| `default` | the kept traces: question, completion, rationale, answer, the teacher's tokens and top-k log-probabilities |
| `rejected` | the rejected traces, with the `reason` each was dropped for |
| `prompt_completion` | `predict:` and `explain:` pairs of the kept traces (`prompt`, `completion`, `task`) for TRL's `SFTTrainer` |
| `messages` | the same pairs as chat `messages` |

```python
from datasets import load_dataset
kept = load_dataset("path/to/{run_name}/filter", split="train")
rejected = load_dataset("path/to/{run_name}/filter", "rejected", split="train")
pairs = load_dataset("path/to/{run_name}/filter", "prompt_completion", split="train")
```

## Why traces were dropped

| reason | traces |
|---|---|
{funnel}
"""


def write_dataset_card(folder: StageFolder, manifest: dict, run_name: str) -> None:
    """Write the pairs (when they are missing or older than the manifest) and the card."""
    done = f"{SFT_DIR}/made-from.json"
    stamp = {"fingerprint": manifest["fingerprint"],
             "files": sorted(e["sha256"] for e in manifest["files"])}
    kept = [s["outputs"]["kept"] for s in manifest["shards"]]
    names = [f"{SFT_DIR}/sft-{e['file'].split('-', 1)[1]}" for e in kept if e["rows"]]
    try:
        fresh = folder.read_json(done) == stamp and all(folder.exists(n) for n in names)
    except (OSError, ValueError):
        fresh = False
    if not fresh:
        for entry, name in zip([e for e in kept if e["rows"]], names):
            table = folder.read_checked(entry, columns=["id", "question", "gold",
                                                        "pred_answer", "rationale"])
            folder.write_table(name, sft_pairs(table), {"made_from": entry["file"]})
        folder.write_json(done, stamp)
    folder.write_bytes(CARD, card_text(manifest, run_name, names).encode())
