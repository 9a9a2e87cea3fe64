"""Task rows: the built-in arithmetic word problems, GSM8K files, or any dataset with a mapping.

Every loader returns an Arrow table with the columns `id`, `question` and `gold` (the gold
answer as a string; null for unlabeled rows), for the `train` or `test` split.
"""

from __future__ import annotations

import hashlib
import json
import random
import re
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.config import TaskConfig

TASK_SCHEMA = pa.schema([("id", pa.string()), ("question", pa.string()),
                         ("gold", pa.string())])


class TaskError(ValueError):
    pass


# ---------------------------------------------------------------------------- the demo task

_NAMES = [("Anna", "she"), ("Ben", "he"), ("Carla", "she"), ("David", "he"), ("Emma", "she"),
          ("Farid", "he"), ("Grace", "she"), ("Hugo", "he"), ("Ines", "she"), ("Jamal", "he"),
          ("Kenji", "he"), ("Lena", "she"), ("Mateo", "he"), ("Nora", "she"), ("Omar", "he"),
          ("Priya", "she"), ("Quinn", "he"), ("Rosa", "she"), ("Sam", "he"), ("Tara", "she")]
_OBJECTS = ["apples", "marbles", "stickers", "pencils", "books", "cookies", "stamps", "coins",
            "shells", "cards", "balloons", "toy cars", "crayons", "eggs", "flowers", "buttons"]
_FRIENDS = ["a friend", "a cousin", "a neighbour", "a classmate", "Grandma", "the teacher"]
_START = ["{N} has {a} {o}.", "{N} starts with {a} {o}.", "{N} had {a} {o}.",
          "There are {a} {o} in {N}'s bag."]
_START_MUL = ["{N} has {a} boxes with {b} {o} in each box.",
              "{N} buys {a} packs of {o}. Each pack holds {b} {o}.",
              "{N} has {a} bags, and every bag holds {b} {o}."]
_ADD = ["{P} buys {b} more {o}.", "{P} finds {b} more {o}.", "{F} gives {N} {b} more {o}.",
        "{P} gets {b} more {o} as a present.", "Then {p} collects {b} more {o}."]
_SUB = ["{P} gives {b} {o} to {f}.", "{P} loses {b} {o}.", "Then {p} sells {b} {o}.",
        "{P} gives away {b} of the {o}.", "{P} uses {b} {o}."]
_MUL = ["Then the number of {o} {N} has becomes {b} times as large.",
        "{P} ends up with {b} times as many {o} as before."]
_QUESTION = ["How many {o} does {N} have now?", "How many {o} does {N} have in the end?",
             "How many {o} does {N} have left?", "What is the number of {o} {N} has now?"]


def _demo_problem(rng: random.Random, n_steps: int, ops: list[str],
                  max_number: int) -> tuple[str, int]:
    """One word problem with `n_steps` arithmetic operations and its answer."""
    name, pron = rng.choice(_NAMES)
    obj = rng.choice(_OBJECTS)
    fmt = dict(N=name, P=pron.capitalize(), p=pron, o=obj, F=rng.choice(_FRIENDS).capitalize(),
               f=rng.choice(_FRIENDS))
    sentences = []
    steps_left = n_steps
    if "multiply" in ops and rng.random() < 0.3:
        a, b = rng.randint(2, 9), rng.randint(2, max(2, min(12, max_number // 2)))
        sentences.append(rng.choice(_START_MUL).format(a=a, b=b, **fmt))
        total = a * b
        steps_left -= 1
    else:
        total = rng.randint(3, max(3, max_number))
        sentences.append(rng.choice(_START).format(a=total, **fmt))
    for _ in range(steps_left):
        choices = [op for op in ops if not (op == "subtract" and total < 2)
                   and not (op == "multiply" and total > 60)]
        op = rng.choice(choices)
        if op == "add":
            b = rng.randint(1, max(1, max_number // 2))
            sentences.append(rng.choice(_ADD).format(b=b, **fmt))
            total += b
        elif op == "subtract":
            b = rng.randint(1, total - 1)
            sentences.append(rng.choice(_SUB).format(b=b, **fmt))
            total -= b
        else:
            b = rng.randint(2, 4)
            sentences.append(rng.choice(_MUL).format(b=b, **fmt))
            total *= b
    sentences.append(rng.choice(_QUESTION).format(**fmt))
    return " ".join(sentences), total


def demo_rows(cfg: TaskConfig, split: str) -> pa.Table:
    """The demo split: seeded, so the same settings always give the same rows.

    The test split depends only on the seed and n_test; train rows never repeat a test question.
    """
    weights = list(cfg.step_weights) + [0.0] * (3 - len(cfg.step_weights))

    def draw(rng: random.Random, n: int, exclude: set[str]) -> list[tuple[str, int]]:
        rows, seen = [], set(exclude)
        attempts = 0
        while len(rows) < n:
            attempts += 1
            if attempts > 50 * n + 1000:
                raise TaskError(f"could not draw {n} distinct demo problems; lower the count "
                                "or allow more operations and steps")
            n_steps = rng.choices([1, 2, 3], weights=weights)[0]
            q, a = _demo_problem(rng, n_steps, list(cfg.operations), cfg.max_number)
            if q not in seen:
                seen.add(q)
                rows.append((q, a))
        return rows

    test = draw(random.Random(f"demo-test-{cfg.seed}"), cfg.n_test, set())
    if split == "test":
        rows = test
    else:
        rows = draw(random.Random(f"demo-train-{cfg.seed}"), cfg.n_train, {q for q, _ in test})
    return pa.table({"id": [f"demo-{split}-{i:06d}" for i in range(len(rows))],
                     "question": [q for q, _ in rows], "gold": [str(a) for _, a in rows]},
                    schema=TASK_SCHEMA)


# ---------------------------------------------------------------------------- files and hub

_GSM8K_FINAL = re.compile(r"####\s*(.+?)\s*$", re.S)


def gsm8k_gold(answer: str) -> str:
    """The final answer of a GSM8K solution (`... #### 1,234` -> `1234`)."""
    m = _GSM8K_FINAL.search(answer)
    if not m:
        raise TaskError(f"GSM8K answer has no '#### N' final line: {answer[-80:]!r}")
    return m.group(1).replace(",", "").strip()


def _read_records(path: str) -> list[dict]:
    """The rows of a task file, or one TaskError saying why there are none (missing,
    unreadable, not the format its extension says, empty)."""
    p = Path(path).expanduser()
    if not p.is_file():
        raise TaskError(f"task file '{path}' does not exist")
    try:
        records = _parse_records(p, path)
    except OSError as e:
        raise TaskError(f"task file '{path}' cannot be read ({e.strerror or e}); check that "
                        "it is a readable file") from None
    except (pa.ArrowInvalid, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise TaskError(f"task file '{path}' is not a valid {p.suffix.lstrip('.')} file "
                        f"({str(e).splitlines()[0][:160]})") from None
    if not records:
        raise TaskError(f"task file '{path}' holds no rows: there is nothing to generate "
                        "traces for or to evaluate on; check that it is the right file")
    return records


def _parse_records(p: Path, path: str) -> list[dict]:
    suffix = p.suffix.lower()
    if suffix in (".jsonl", ".ndjson"):
        out = []
        with open(p) as f:
            for n, line in enumerate(f, 1):
                if line.strip():
                    try:
                        out.append(json.loads(line))
                    except json.JSONDecodeError as e:
                        raise TaskError(f"{path}, line {n}: not valid JSON ({e.msg})") from None
        return out
    if suffix == ".json":
        data = json.loads(p.read_text())
        if isinstance(data, dict):
            for key in ("data", "rows", "examples"):
                if isinstance(data.get(key), list):
                    return data[key]
        if not isinstance(data, list):
            raise TaskError(f"{path}: expected a JSON list of objects (or {{'data': [...]}})")
        return data
    if suffix == ".parquet":
        return pq.read_table(p).to_pylist()
    raise TaskError(f"task file '{path}' has an unknown extension; use .jsonl, .json or .parquet")


def _hub_records(cfg: TaskConfig, split: str) -> list[dict]:
    import datasets

    try:
        ds = datasets.load_dataset(cfg.dataset, cfg.dataset_config, split=split)
    except Exception as e:  # network, missing dataset, bad split: all reported the same way
        raise TaskError(f"could not load hub dataset '{cfg.dataset}' split '{split}': "
                        f"{type(e).__name__}: {e}. Without network to the hub, download it "
                        "elsewhere and use task.kind=file with task.train_path/test_path") from None
    return ds.to_list()


def _fields(template: str) -> list[str]:
    return re.findall(r"{(\w+)}", template)


def mapped_rows(records: list[dict], cfg: TaskConfig, split: str, source: str) -> pa.Table:
    if cfg.kind == "gsm8k" or (cfg.kind == "hub" and cfg.dataset and "gsm8k" in cfg.dataset):
        question_tpl, answer_field, gsm = "{question}", "answer", True
    else:
        question_tpl, answer_field, gsm = cfg.question, cfg.answer_field, False
    needed = _fields(question_tpl)
    ids, questions, golds = [], [], []
    for i, rec in enumerate(records):
        missing = [k for k in needed + [answer_field] if k not in rec]
        if missing and not (missing == [answer_field]):
            raise TaskError(f"{source}, row {i}: missing field(s) {missing}; available: "
                            f"{sorted(rec)}. Set task.question / task.answer_field to match")
        questions.append(question_tpl.format(**{k: rec[k] for k in needed}))
        ans = rec.get(answer_field)
        if ans is None:
            golds.append(None)
        elif gsm:
            golds.append(gsm8k_gold(str(ans)))
        else:
            golds.append(str(ans).strip())
        ids.append(str(rec[cfg.id_field]) if cfg.id_field and cfg.id_field in rec
                   else f"{split}-{i:06d}")
    return pa.table({"id": ids, "question": questions, "gold": golds}, schema=TASK_SCHEMA)


def hash_unit(text: str) -> float:
    """A place in [0, 1) from a hash of `text`: the same on every machine and every run."""
    digest = hashlib.sha256(str(text).encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2 ** 64


def validation_row(row_id: str) -> float:
    """A training row's place in [0, 1) by a hash of its id: the rows at or above
    `1 - task.validation_share` are the validation split."""
    return hash_unit(f"validation\x1f{row_id}")


def cut_validation(rows: pa.Table, share: float, split: str) -> pa.Table:
    """The training rows without the validation questions (`split="train"`) or those alone
    (`split="validation"`); the same ids always fall on the same side."""
    if share <= 0:
        return rows if split == "train" else rows.slice(0, 0)
    held = [validation_row(i) >= 1 - share for i in rows.column("id").to_pylist()]
    mask = pa.array(held if split == "validation" else [not h for h in held])
    return rows.filter(mask)


def load_split(cfg: TaskConfig, split: str) -> pa.Table:
    """The `train`, `validation` or `test` rows of the configured task. The first n_train
    training rows (n_test held-out ones) are taken, then `task.validation_share` of the
    training ones are cut out as the validation split: generate and train never see them."""
    if split not in ("train", "validation", "test"):
        raise ValueError(f"split must be train, validation or test, not {split!r}")
    if split != "test":
        rows = _load_split(cfg, "train")
        return cut_validation(rows, cfg.validation_share, split)
    return _load_split(cfg, split)


def _load_split(cfg: TaskConfig, split: str) -> pa.Table:
    if cfg.kind == "demo":
        return demo_rows(cfg, split)
    if cfg.kind == "hub":
        name = cfg.train_split if split == "train" else cfg.test_split
        table = mapped_rows(_hub_records(cfg, name), cfg, split, f"{cfg.dataset}:{name}")
    else:
        path = cfg.train_path if split == "train" else cfg.test_path
        if not path:
            raise TaskError(f"task.{split}_path is not set; the {split} split needs a file")
        table = mapped_rows(_read_records(path), cfg, split, path)
    limit = cfg.n_train if split == "train" else cfg.n_test
    if limit is not None and table.num_rows > limit:
        table = table.slice(0, limit)
    return table
