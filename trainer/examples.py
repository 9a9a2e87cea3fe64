"""Distilling Step-by-Step examples: every kept trace gives a `predict:` and an `explain:` pair.

`predict: <question>` -> the answer, `explain: <question>` -> the teacher's rationale. The
prompt and the target are tokenised apart and joined by the student (`Student.encode`), so the
prompt mask is exact, and each target ends with the end-of-sequence token. The explain target
is either the rationale text tokenised by the student or the teacher's own rationale tokens
(the exact sequence it produced, when the student shares its tokenizer); with the latter, each
target token can carry the teacher's top-k row for KD.
"""

from __future__ import annotations

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


def build_examples(rows: list[dict], tokenizer, student: Student, max_length: int,
                   teacher_tokens: bool = False, with_topk: bool = False) -> list[dict]:
    """One record per kept trace, `{"predict": example, "explain": example}`.

    `teacher_tokens`: the explain target is the teacher's stored `token_ids` up to the end of
    the rationale (then eos) instead of the re-tokenised rationale text. `with_topk` (needs
    `teacher_tokens`): the explain example also carries `topk_ids` / `topk_logprobs`, one row
    per target token (the eos gets an empty row of -1 / -inf).
    """
    def ids(text: str) -> list[int]:
        return tokenizer(text, add_special_tokens=False)["input_ids"]

    eos = tokenizer.eos_token_id
    out = []
    for row in rows:
        answer = row["gold"] if row.get("gold") is not None else row["pred_answer"]
        predict = student.encode(ids(task_prompt(PREDICT, row["question"])),
                                 ids(str(answer)) + [eos], max_length)
        if teacher_tokens:
            m = rationale_tokens(tokenizer, row["token_ids"], row["completion"],
                                 row["rationale"])
            target = list(row["token_ids"][:m]) + [eos]
        else:
            target = ids(row["rationale"]) + [eos]
        explain = student.encode(ids(task_prompt(EXPLAIN, row["question"])), target,
                                 max_length)
        if with_topk:
            n_kept = sum(1 for label in explain["labels"] if label != -100)
            k = len(row["topk_ids"][0]) if row["topk_ids"] else 0
            explain["topk_ids"] = ([list(r) for r in row["topk_ids"][:m]] + [[-1] * k])[:n_kept]
            explain["topk_logprobs"] = ([list(r) for r in row["topk_logprobs"][:m]]
                                        + [[float("-inf")] * k])[:n_kept]
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
