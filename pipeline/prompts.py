"""Few-shot prompt templates: a text file with a `{question}` placeholder (`data/prompts/`)."""

from __future__ import annotations

import hashlib


class PromptTemplate:
    """A few-shot prompt kept in a file; `{question}` marks where the question goes."""

    def __init__(self, path: str):
        from pipeline.shipped import shipped

        p = shipped(path)
        if not p.is_file():
            raise FileNotFoundError(f"prompt template '{path}' does not exist; the shipped ones "
                                    "are in data/prompts/")
        self.path = str(p)
        self.text = p.read_text().rstrip("\n")
        if "{question}" not in self.text:
            raise ValueError(f"prompt template '{path}' has no {{question}} placeholder")
        self.sha256 = hashlib.sha256(self.text.encode()).hexdigest()[:16]

    def render(self, question: str) -> str:
        return self.text.replace("{question}", question)
