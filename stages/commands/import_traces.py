"""`distill import`: bring traces made elsewhere into a run, as its generate stage.

    distill import --run R --kind table --from traces.jsonl            # {question, answer, rationale}
    distill import --run R --kind dss --from llm/train_CoT_0.json llm/train_CoT_1.json \\
        --questions svamp/svamp_train.json                             # the DSS repository's files
    distill import --run R --kind hf --from my-distilabel-dataset/     # a datasets folder

Three kinds of input:

- `dss`: the LLM outputs of the Distilling Step-by-Step repository (`<dataset>/llm/<split>_CoT_
  <i>.json`: a JSON list with one output per example, either the raw text, "<rationale> So
  the answer is <label>. Q: ...", or an object with `rationale` and `label`), in the order of
  the examples in `--questions` (its `<dataset>_<split>.json`: JSON lines with `input` or
  `question`, and `label` or `answer`, the gold).
- `table`: a JSONL, JSON or Parquet file with a row per trace: `question`, `rationale` and
  `answer` (the teacher's answer; also the gold unless a `gold` column holds one), or a
  `completion` with the whole reasoning instead of rationale and answer; optional `id`.
- `hf`: a Hugging Face dataset folder, as distilabel and curator write them
  (`Dataset.save_to_disk`, or Parquet / JSONL files in the folder), with the same columns or
  their usual names (distilabel: `instruction` and `generation`; curator: whatever the user's
  parse function returned, e.g. `problem`, `reasoning`, `solution`). `--map question=problem`
  names a column where the usual names do not fit. Without a gold answer (`gold`, or the
  answer of a rationale/answer pair) the filter checks a trace against the majority answer of
  its question's traces; with one trace per question set `filter.min_votes=1` to keep every
  trace that states an answer (unchecked).

Each trace becomes a row of the generate stage's shards (`generate/traces-NNNNN.parquet`,
manifest and records as a teacher would write them; the completion is the rationale followed
by "The answer is <answer>.", so the filter reads it like a teacher's), tokenised by the
student's tokenizer (`train.student`) so that `filter.max_tokens` applies. The traces carry no
log-probabilities: training on them learns the text (`explain_targets=text`), and a loss term
that needs the teacher's top-k refuses with an error. `distill filter`, `train` and `eval` then
run on the run as on a generated one (the held-out split still comes from the config's task);
`distill generate` or `distill all` would generate with a teacher instead (the imported shards
are then set aside, not deleted).
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa

from pipeline.config import Config
from pipeline.executors import run_stage
from pipeline.log import log
from pipeline.run_folder import RunFolder
from pipeline.schema import SCHEMA_VERSION, traces_table
from pipeline.stage import Progress, Shard, ShardOutput, Stage, no_progress

KINDS = ("dss", "table", "hf")
# the usual names of each field, first match wins
ALIASES = {
    "id": ["id", "idx", "uid", "example_id"],
    "question": ["question", "input", "instruction", "prompt", "problem", "query"],
    "rationale": ["rationale", "reasoning", "explanation", "cot", "chain_of_thought",
                  "thinking"],
    "answer": ["answer", "label", "prediction", "final_answer", "solution"],
    "gold": ["gold", "gold_answer", "reference", "target"],
    "completion": ["completion", "generation", "response", "output", "text"],
}


def read_records(path: Path) -> list[dict]:
    """The rows of a JSON list, JSON-lines or Parquet file."""
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist (give the file to import with --from)")
    if path.suffix == ".parquet":
        import pyarrow.parquet as pq

        return pq.read_table(path).to_pylist()
    text = path.read_text(encoding="utf-8")
    try:
        data = json.loads(text)
    except json.JSONDecodeError:
        try:
            return [json.loads(line) for line in text.splitlines() if line.strip()]
        except json.JSONDecodeError as e:
            raise ValueError(f"{path} is neither JSON nor JSON lines (line {e.lineno}: "
                             f"{e.msg})") from None
    if isinstance(data, dict):  # one object: a single row, or {"data": [...]}
        data = next((v for v in data.values() if isinstance(v, list)), [data])
    if not isinstance(data, list):
        raise ValueError(f"{path} holds a JSON {type(data).__name__}; expected a list of rows")
    return data


def read_hf_folder(folder: Path) -> list[dict]:
    """A dataset folder written by `Dataset.save_to_disk` (or a `DatasetDict`'s train split),
    or a folder of Parquet / JSONL files (a hub dataset's layout)."""
    if not folder.is_dir():
        raise FileNotFoundError(f"{folder} is not a folder (--kind hf takes a dataset folder)")
    if (folder / "state.json").is_file() or (folder / "dataset_dict.json").is_file():
        from datasets import DatasetDict, load_from_disk

        data = load_from_disk(str(folder))
        if isinstance(data, DatasetDict):
            split = "train" if "train" in data else next(iter(data))
            data = data[split]
        return data.to_list()
    files = sorted(p for p in folder.rglob("*") if p.suffix in (".parquet", ".jsonl", ".json")
                   and p.name not in ("dataset_info.json", "state.json"))
    if not files:
        raise FileNotFoundError(f"{folder} holds no dataset: neither a saved dataset "
                                "(state.json) nor Parquet or JSONL files")
    train = [p for p in files if "train" in p.name] or files
    return [r for p in train for r in read_records(p)]


def _field(row: dict, name: str, mapping: dict[str, str]) -> str | None:
    keys = [mapping[name]] if name in mapping else ALIASES[name]
    for key in keys:
        value = row.get(key)
        if value is not None and not isinstance(value, (list, dict)):
            return str(value)
    if name in mapping and mapping[name] not in row:
        raise ValueError(f"--map {name}={mapping[name]}: the input has no column "
                         f"'{mapping[name]}' (its columns: {sorted(row)})")
    return None


def completion_text(rationale: str, answer: str) -> str:
    """The trace as a teacher would have written it, so the filter finds both parts."""
    rationale = rationale.strip()
    ending = "" if rationale.endswith((".", "!", "?")) or not rationale else "."
    return f"{rationale}{ending} The answer is {answer.strip()}."


def normalise(rows: list[dict], mapping: dict[str, str], source: str) -> list[dict]:
    """{id, question, gold, completion} per input row; rows without a question or without
    any reasoning are errors naming the first of them."""
    out, ids = [], set()
    for i, row in enumerate(rows):
        if not isinstance(row, dict):
            raise ValueError(f"{source}: row {i} is a {type(row).__name__}, not an object")
        question = _field(row, "question", mapping)
        rationale, answer = _field(row, "rationale", mapping), _field(row, "answer", mapping)
        completion = _field(row, "completion", mapping)
        gold = _field(row, "gold", mapping)
        if question is None:
            raise ValueError(f"{source}: row {i} has no question (looked for "
                             f"{mapping.get('question') or ALIASES['question']}; columns: "
                             f"{sorted(row)}); name it with --map question=<column>")
        if rationale is not None and answer is not None:
            completion = completion_text(rationale, answer)
            gold = gold if gold is not None else answer
        elif completion is None:
            raise ValueError(f"{source}: row {i} has neither a rationale and an answer nor a "
                             f"completion (columns: {sorted(row)}); name them with --map "
                             "rationale=<column> answer=<column>")
        row_id = _field(row, "id", mapping) or f"import-{i:06d}"
        if row_id in ids:  # several traces of one question: keep them apart
            row_id = f"{row_id}#{i}"
        ids.add(row_id)
        out.append({"id": row_id, "question": question.strip(), "gold": gold,
                    "completion": completion.strip()})
    if not out:
        raise ValueError(f"{source} holds no rows to import")
    return out


_DSS_MARK = re.compile(r"(?:So the answer is|The answer is)", re.IGNORECASE)


def parse_dss_output(output) -> tuple[str, str] | None:
    """(rationale, label) of one DSS LLM output, None when it has no answer: the text before
    the next few-shot "Q:" split at its last "So the answer is" / "The answer is"."""
    if isinstance(output, dict):
        rationale, label = output.get("rationale"), output.get("label", output.get("answer"))
        return (str(rationale), str(label)) if rationale is not None and label is not None \
            else None
    text = str(output).split("Q:")[0].strip()
    marks = list(_DSS_MARK.finditer(text))
    if not marks:
        return None
    rationale, label = text[:marks[-1].start()].strip(), text[marks[-1].end():].strip()
    label = label.rstrip(".").strip()
    return (rationale, label) if label else None


def dss_rows(outputs: list[Path], questions: Path | None) -> list[dict]:
    """The DSS repository's LLM outputs joined with its examples, in order."""
    if questions is None:
        raise ValueError("--kind dss needs --questions: the dataset file the LLM outputs "
                         "answer, in their order (e.g. svamp/svamp_train.json)")
    examples = read_records(questions)
    answers = [o for path in outputs for o in read_records(path)]
    if len(answers) != len(examples):
        raise ValueError(f"the LLM output files hold {len(answers)} outputs and {questions} "
                         f"{len(examples)} examples; give every output file of the split, in "
                         "order (train_CoT_0.json, train_CoT_1.json, ...)")
    rows = []
    for i, (example, output) in enumerate(zip(examples, answers)):
        parsed = parse_dss_output(output)
        question = example.get("input", example.get("question"))
        gold = example.get("label", example.get("answer"))
        if question is None:
            raise ValueError(f"{questions}: example {i} has no `input` or `question`")
        row = {"id": str(example.get("id", f"dss-{i:06d}")), "question": str(question),
               "gold": None if gold is None else str(gold)}
        # an output without an answer stays, as a trace the filter rejects (no_answer)
        row["completion"] = (completion_text(*parsed) if parsed is not None
                             else str(output).split("Q:")[0].strip())
        rows.append(row)
    return rows


@dataclass
class ImportSettings:
    source: str


def _file_digest(path: Path) -> str:
    h = hashlib.sha256()
    for p in sorted(path.rglob("*")) if path.is_dir() else [path]:
        if p.is_file():
            h.update(p.name.encode())
            h.update(p.read_bytes())
    return h.hexdigest()[:16]


class _Tokens:
    """The token arrays of a trace without a teacher: the student's token ids of the text,
    no log-probabilities (NaN) and no top-k."""

    def __init__(self, ids: list[int]):
        self.token_ids = np.asarray(ids, np.int32)
        self.token_logprobs = np.full(len(ids), np.nan, np.float32)
        self.topk_ids = np.zeros((len(ids), 0), np.int32)
        self.topk_logprobs = np.zeros((len(ids), 0), np.float32)


def import_shard(settings: ImportSettings, shard: Shard, tokenizer,
                 progress: Progress = no_progress) -> ShardOutput:
    rows = shard.load().to_pylist()
    records, gens = [], []
    for r in rows:
        ids = tokenizer(r["completion"], add_special_tokens=False)["input_ids"]
        records.append({"id": r["id"], "sample": 0, "question": r["question"],
                        "gold": r["gold"], "prompt": r["question"],
                        "completion": r["completion"], "finish_reason": "stop",
                        "error": None})
        gens.append(_Tokens(ids))
    progress(len(rows), tokens=sum(len(g.token_ids) for g in gens))
    counters = {"rows": len(rows), "traces": len(rows), "errors": 0,
                "tokens": int(sum(len(g.token_ids) for g in gens)), "truncated": 0}
    return ShardOutput({"traces": traces_table(records, gens, 0, 1)}, counters)


def import_traces(cfg: Config, run: RunFolder, kind: str, sources: list[str],
                  questions: str | None = None, mapping: dict[str, str] | None = None,
                  force: bool = False) -> dict:
    """Write the traces of `sources` as the generate stage of `run`; returns its manifest."""
    from pipeline.models import load_tokenizer, resolve_model

    if kind not in KINDS:
        raise ValueError(f"--kind {kind!r}: choose one of {', '.join(KINDS)}")
    mapping = dict(mapping or {})
    unknown = sorted(set(mapping) - set(ALIASES))
    if unknown:
        raise ValueError(f"--map {unknown[0]}=...: the fields are {', '.join(ALIASES)}")
    paths = [Path(s) for s in sources]
    if kind == "dss":
        rows = dss_rows(paths, Path(questions) if questions else None)
    else:
        raw = [r for p in paths for r in (read_hf_folder(p) if kind == "hf"
                                          else read_records(p))]
        rows = normalise(raw, mapping, ", ".join(sources))
    described = f"{kind}: " + ", ".join(p.name for p in paths)
    table = pa.Table.from_pylist(rows, schema=pa.schema(
        [("id", pa.string()), ("question", pa.string()), ("gold", pa.string()),
         ("completion", pa.string())]))
    size = cfg.generate.rows_per_shard
    shards = []
    for start in range(0, table.num_rows, size):
        part = table.slice(start, size)
        digest = hashlib.sha256(json.dumps(part.to_pylist(), sort_keys=True).encode())
        shards.append(Shard.of(f"{start // size:05d}", part, digest.hexdigest()[:16]))
    student = cfg.train.student
    settings = {"import": {"kind": kind, "files": {p.name: _file_digest(p) for p in paths},
                           "questions": _file_digest(Path(questions)) if questions else None,
                           "map": mapping, "tokenizer": student},
                "schema_version": SCHEMA_VERSION}
    facts = {"k": 0, "schema_version": SCHEMA_VERSION, "imported": described,
             "teacher": f"imported ({described})", "backend": "import",
             "usable_for_kd": False,
             "kd_unusable_because": "the traces were imported and carry no log-probabilities"}
    stage = Stage(name="generate", fingerprinted=settings, shards=shards, work=import_shard,
                  settings=ImportSettings(described),
                  outputs=["traces"], facts=facts, upstream={"import": described},
                  resources=lambda: load_tokenizer(resolve_model(student)), unit="trace")
    manifest = run_stage(stage, run.stage("generate"), force)
    no_gold = sum(r["gold"] is None for r in rows)
    if no_gold:
        log("import", f"{no_gold} of {len(rows)} traces have no gold answer: the filter checks "
            "those against the majority of their question's traces (filter.min_votes, "
            "default 2); with one trace per question, filter.min_votes=1 keeps every trace "
            "that states an answer, unchecked")
    c = manifest["counters"]
    log("import", f"{c.get('traces', 0)} traces ({c.get('tokens', 0)} tokens of "
        f"{student}'s tokenizer) from {described} -> {run.stage('generate')}; next: "
        "`distill filter`, `distill train`, `distill eval` on this run")
    return manifest
