"""Distilling Step-by-Step examples: every kept trace gives a `predict:` and an `explain:` pair.

`predict: <question>` -> the answer, `explain: <question>` -> the teacher's rationale. The
prompt and the target are tokenised apart and joined by the student (`Student.encode`), so the
prompt mask is exact, and each target ends with the end-of-sequence token. The explain target
is either the rationale text tokenised by the student or the teacher's own rationale tokens
(the exact sequence it produced, when the student shares its tokenizer); with the latter, each
target token can carry the teacher's top-k row for KD.
"""

from __future__ import annotations

from typing import Callable

import torch

from pipeline.models import tokens_within
from trainer.students.base import Student

PREDICT, EXPLAIN = "predict", "explain"


def task_prompt(prefix: str, question: str) -> str:
    """The student's input in a mode; the same text is used at training and at evaluation."""
    return f"{prefix}: {question.strip()}\n"


def rationale_tokens(tokenizer, token_ids: list[int], completion: str, rationale: str) -> int:
    """How many of the teacher's tokens make up the rationale: those that end by the end of
    `rationale` inside `completion` (the final-answer sentence after it is left out)."""
    start = completion.find(rationale) if rationale else -1
    if start < 0:
        return 0
    return tokens_within(tokenizer, list(token_ids), start + len(rationale),
                         skip_special_tokens=True)


def answer_span(tokenizer, row: dict) -> tuple[int, int] | None:
    """The teacher's tokens [a, b) that spell its final answer in the trace: the last
    occurrence of the answer's text after the rationale (None when it is not written as is)."""
    completion, rationale = row["completion"] or "", row.get("rationale") or ""
    after = completion.find(rationale) + len(rationale) if rationale in completion else 0
    for text in dict.fromkeys(str(x) for x in (row.get("pred_answer"), row.get("gold"))
                              if x is not None and str(x).strip()):
        start = completion.rfind(text, after)
        if start >= 0:
            break
    else:
        return None
    ids = list(row["token_ids"])
    a = tokens_within(tokenizer, ids, start, skip_special_tokens=True)
    b = tokens_within(tokenizer, ids, start + len(text), skip_special_tokens=True)
    if len(tokenizer.decode(ids[:b], skip_special_tokens=True)) < start + len(text):
        b += 1  # the last token runs past the answer (" 8." as one token)
    return (a, b) if a < b <= len(ids) else None


def _topk_rows(row: dict, a: int, b: int, n_targets: int) -> dict:
    """The teacher's top-k rows [a, b) plus an empty one for the eos, cut to the targets."""
    k = len(row["topk_ids"][0]) if row["topk_ids"] else 0
    return {"topk_ids": ([list(r) for r in row["topk_ids"][a:b]] + [[-1] * k])[:n_targets],
            "topk_logprobs": ([list(r) for r in row["topk_logprobs"][a:b]]
                              + [[float("-inf")] * k])[:n_targets]}


def _n_targets(example: dict) -> int:
    return sum(1 for label in example["labels"] if label != -100)


def predict_example(row: dict, tokenizer, student: Student, max_length: int,
                    answer_text: Callable[[str], str] = str) -> dict:
    """`predict: <question>` -> the gold answer (else the trace's own answer), then eos.
    `answer_text` writes the answer as the student is taught to (the answer kind's canonical
    form, `6.0` -> `6`, as the traces' answers are, in `train.predict_template`)."""
    answer = answer_text(row["gold"] if row.get("gold") is not None else row["pred_answer"])
    ids = tokenizer(task_prompt(PREDICT, row["question"]), add_special_tokens=False)["input_ids"]
    target = tokenizer(str(answer), add_special_tokens=False)["input_ids"]
    return student.encode(ids, target + [tokenizer.eos_token_id], max_length)


def pair_cycled(predicts: list[dict], explains: list[dict]) -> list[dict]:
    """Records of one `predict:` and one `explain:` example each, when the two come from
    different rows (`train.predict_on=labelled`: every labelled question, and the kept
    traces): as many records as the longer list, the shorter one cycled."""
    if not predicts or not explains:
        return []
    n = max(len(predicts), len(explains))
    return [{PREDICT: predicts[i % len(predicts)], EXPLAIN: explains[i % len(explains)]}
            for i in range(n)]


def build_examples(rows: list[dict], tokenizer, student: Student, max_length: int,
                   teacher_tokens: bool = False, with_topk: bool = False,
                   answer_tokens: bool = False, topk_hinted: bool = True,
                   answer_text: Callable[[str], str] = str) -> list[dict]:
    """One record per kept trace, `{"predict": example, "explain": example}`.

    `teacher_tokens`: the explain target is the teacher's stored `token_ids` up to the end of
    the rationale (then eos) instead of the re-tokenised rationale text. `with_topk` (needs
    `teacher_tokens`): the explain example also carries `topk_ids` / `topk_logprobs`, one row
    per target token (the eos gets an empty row of -1 / -inf). `answer_tokens` (answer KD):
    the predict target is the teacher's own tokens of its answer (`answer_span`) and the
    predict example carries their top-k rows; a trace whose answer is not written as is keeps
    the answer text as target, with empty rows. `topk_hinted=False`: hinted traces (the gold
    answer was in the teacher's prompt) get empty rows, so no KD term learns from them.
    `answer_text`: see `predict_example`.
    """
    def ids(text: str) -> list[int]:
        return tokenizer(text, add_special_tokens=False)["input_ids"]

    eos = tokenizer.eos_token_id
    out = []
    for row in rows:
        prompt = ids(task_prompt(PREDICT, row["question"]))
        blind = bool(row.get("hinted")) and not topk_hinted
        span = answer_span(tokenizer, row) if answer_tokens and not blind else None
        if span is not None:
            predict = student.encode(prompt, list(row["token_ids"][span[0]:span[1]]) + [eos],
                                     max_length)
            predict.update(_topk_rows(row, *span, _n_targets(predict)))
        else:
            predict = predict_example(row, tokenizer, student, max_length, answer_text)
            if answer_tokens:
                k = len(row["topk_ids"][0]) if row["topk_ids"] else 0
                n = _n_targets(predict)
                predict.update(topk_ids=[[-1] * k] * n, topk_logprobs=[[float("-inf")] * k] * n)
        if teacher_tokens:
            m = rationale_tokens(tokenizer, row["token_ids"], row["completion"],
                                 row["rationale"])
            target = list(row["token_ids"][:m]) + [eos]
        else:
            target = ids(row["rationale"]) + [eos]
        explain = student.encode(ids(task_prompt(EXPLAIN, row["question"])), target,
                                 max_length)
        if with_topk and blind:
            k = len(row["topk_ids"][0]) if row["topk_ids"] else 0
            n = _n_targets(explain)
            explain.update(topk_ids=[[-1] * k] * n, topk_logprobs=[[float("-inf")] * k] * n)
        elif with_topk:
            explain.update(_topk_rows(row, 0, m, _n_targets(explain)))
        out.append({PREDICT: predict, EXPLAIN: explain})
    return out


class DSSCollator:
    """Pads the predict and the explain halves of a batch apart, through the student; a
    part's per-target fields (the teacher's top-k rows) become one row per target token, in
    the order `Student.target_logits` returns the targets."""

    def __init__(self, student: Student, pad_token_id: int):
        self.student, self.pad = student, pad_token_id

    def __call__(self, features: list[dict]) -> dict:
        batch = {}
        for part in (PREDICT, EXPLAIN):
            examples = [f[part] for f in features]
            padded = self.student.collate(examples, self.pad)
            for key in examples[0]:
                if key in ("input_ids", "labels"):
                    continue
                rows = [r for e in examples for r in e[key]]
                dtype = torch.float32 if key.endswith("logprobs") else torch.long
                padded[key] = torch.tensor(rows, dtype=dtype)
            batch[part] = padded
        return batch
