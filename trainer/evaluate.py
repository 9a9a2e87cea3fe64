"""Held-out evaluation: generate with a system, extract the answer, compare with the gold one."""

from __future__ import annotations

import time

import pyarrow as pa
from tqdm import tqdm

from stages.answers import NO_ANSWER, AnswerChecker
from stages.backends import SamplingSettings, TeacherBackend
PREDICTION_SCHEMA = pa.schema([("id", pa.string()), ("prompt", pa.string()),
                               ("output", pa.string()), ("gold", pa.string()),
                               ("pred_answer", pa.string()), ("extractor", pa.string()),
                               ("correct", pa.bool_()), ("n_tokens", pa.int32()),
                               ("finish_reason", pa.string())])


def run_system(name: str, backend: TeacherBackend, prompts: list[str], rows: list[dict],
               max_new_tokens: int, stop: list[str], batch_size: int, checker: AnswerChecker,
               first_line: bool = False) -> tuple[pa.Table, dict]:
    """Greedy generations for every prompt; returns the predictions and the summary.

    `first_line` scores only the first non-empty line of the output (the `predict:` mode, where
    the answer is the whole reply); the token count is still everything that was generated.
    Answers are read with the flexible order of `checker` (an explicit marker first, else a
    fallback such as the last number) and compared as its answer kind.
    """
    settings = SamplingSettings(n=1, temperature=0.0, top_p=1.0, max_new_tokens=max_new_tokens,
                                top_k=0, seed=0, stop=stop)
    records = []
    t0 = time.time()
    with tqdm(total=len(prompts), desc=f"eval {name}", unit="row", dynamic_ncols=True,
              mininterval=1.0) as bar:
        for start in range(0, len(prompts), batch_size):
            outs = backend.generate(prompts[start:start + batch_size], settings)
            for prompt, row, out in zip(prompts[start:], rows[start:], outs):
                if not isinstance(out, list):  # an API request that failed for good
                    records.append({"id": row["id"], "prompt": prompt, "output": "",
                                    "gold": row["gold"], "pred_answer": NO_ANSWER,
                                    "extractor": None, "correct": False, "n_tokens": 0,
                                    "finish_reason": f"error: {out}"[:500]})
                    continue
                gen = out[0]
                text = gen.text
                if first_line:
                    text = next((ln for ln in text.splitlines() if ln.strip()), "")
                found = checker.extract(text, row["question"])
                records.append({"id": row["id"], "prompt": prompt, "output": text,
                                "gold": row["gold"], "pred_answer": found.answer,
                                "extractor": found.extractor,
                                "correct": checker.match(found.answer, row["gold"],
                                                         row["question"]),
                                "n_tokens": int(gen.token_ids.shape[0]),
                                "finish_reason": gen.finish_reason})
            bar.update(len(outs))
    n = max(len(records), 1)
    summary = {"system": name, "n": len(records),
               "accuracy": round(sum(r["correct"] for r in records) / n, 4),
               "mean_tokens": round(sum(r["n_tokens"] for r in records) / n, 2),
               "seconds": round(time.time() - t0, 1)}
    return pa.Table.from_pylist(records, schema=PREDICTION_SCHEMA), summary
