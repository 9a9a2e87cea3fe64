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


def rationale_tokens(tokenizer, token_ids: list[int], completion: str, rationale: str) -> int:
    """How many of the teacher's tokens make up the rationale: those that end by the end of
    `rationale` inside `completion` (the final-answer sentence after it is left out)."""
    start = completion.find(rationale) if rationale else -1
    if start < 0:
        return 0
    from stages.backends import tokens_within

    return tokens_within(tokenizer, list(token_ids), start + len(rationale),
                         skip_special_tokens=True)


def build_token_examples(rows: list[dict], tokenizer, max_length: int,
                         with_topk: bool = False) -> list[dict]:
    """Like `build_examples`, but the explain target is the teacher's own rationale tokens (its
    stored `token_ids` up to the end of the rationale, then eos) instead of the re-tokenised
    text: the exact sequence the teacher produced. With `with_topk` every target position also
    gets its top-k row, `expl_kd_ids` / `expl_kd_logprobs` (the eos gets an empty row of -1 /
    -inf), for KD."""
    out = []
    for row, base in zip(rows, build_examples(rows, tokenizer, max_length)):
        m = rationale_tokens(tokenizer, row["token_ids"], row["completion"], row["rationale"])
        prompt = tokenizer(task_prompt(EXPLAIN, row["question"]),
                           add_special_tokens=False)["input_ids"]
        if len(prompt) >= max_length:
            prompt = prompt[: max_length // 2]
        target = (list(row["token_ids"][:m]) + [tokenizer.eos_token_id])[
            : max_length - len(prompt)]
        base.update(expl_input_ids=prompt + target, expl_labels=[-100] * len(prompt) + target)
        if with_topk:
            k = len(row["topk_ids"][0]) if row["topk_ids"] else 0
            kd_ids = [list(r) for r in row["topk_ids"][:m]] + [[-1] * k]
            kd_lps = [list(r) for r in row["topk_logprobs"][:m]] + [[float("-inf")] * k]
            base.update(expl_kd_ids=kd_ids[: len(target)],
                        expl_kd_logprobs=kd_lps[: len(target)])
        out.append(base)
    return out


def build_kd_examples(rows: list[dict], tokenizer, max_length: int) -> list[dict]:
    """Teacher-token explain targets with their top-k rows (see `build_token_examples`)."""
    return build_token_examples(rows, tokenizer, max_length, with_topk=True)


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
        if "expl_kd_ids" in features[0]:
            import torch

            # one row per explain target token, in the order `target_logits` returns them
            batch["expl_kd_ids"] = torch.tensor(
                [r for f in features for r in f["expl_kd_ids"]], dtype=torch.long)
            batch["expl_kd_logprobs"] = torch.tensor(
                [r for f in features for r in f["expl_kd_logprobs"]], dtype=torch.float32)
        return batch
