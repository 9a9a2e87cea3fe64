"""Distilling Step-by-Step examples: every kept trace gives a `predict:` and an `explain:` pair.

`predict: <question>` -> the answer, `explain: <question>` -> the teacher's rationale. The
prompt and the target are tokenised apart and joined, so the prompt mask is exact; labels are
-100 on prompt tokens, and each target ends with the end-of-sequence token.
"""

from __future__ import annotations

PREDICT, EXPLAIN = "predict", "explain"


def task_prompt(prefix: str, question: str) -> str:
    """The student's input in a mode; the same text is used at training and at evaluation."""
    return f"{prefix}: {question.strip()}\n"


def encode_pair(tokenizer, prompt: str, target: str, max_length: int) -> dict:
    """input_ids and labels for prompt + target (+ eos), prompt tokens masked with -100."""
    p = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    t = tokenizer(target, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    if len(p) >= max_length:
        p = p[: max_length // 2]  # keep some room for the target; rare with sane settings
    t = t[: max_length - len(p)]
    return {"input_ids": p + t, "labels": [-100] * len(p) + t}


def build_examples(rows: list[dict], tokenizer, max_length: int) -> list[dict]:
    """One record per kept trace holding both of its examples."""
    out = []
    for row in rows:
        answer = row["gold"] if row.get("gold") is not None else row["pred_answer"]
        pred = encode_pair(tokenizer, task_prompt(PREDICT, row["question"]), str(answer),
                           max_length)
        expl = encode_pair(tokenizer, task_prompt(EXPLAIN, row["question"]), row["rationale"],
                           max_length)
        out.append({"pred_input_ids": pred["input_ids"], "pred_labels": pred["labels"],
                    "expl_input_ids": expl["input_ids"], "expl_labels": expl["labels"]})
    return out


class PairCollator:
    """Pads the predict and the explain halves of a batch separately (right padding)."""

    def __init__(self, pad_token_id: int):
        self.pad = pad_token_id

    def _pad(self, seqs: list[list[int]], value: int):
        import torch

        width = max(len(s) for s in seqs)
        return torch.tensor([s + [value] * (width - len(s)) for s in seqs], dtype=torch.long)

    def __call__(self, features: list[dict]) -> dict:
        batch = {}
        for part in ("pred", "expl"):
            ids = [f[f"{part}_input_ids"] for f in features]
            batch[f"{part}_input_ids"] = self._pad(ids, self.pad)
            batch[f"{part}_labels"] = self._pad([f[f"{part}_labels"] for f in features], -100)
            batch[f"{part}_attention_mask"] = self._pad([[1] * len(s) for s in ids], 0)
        return batch
