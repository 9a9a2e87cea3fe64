"""Few-shot prompt templates: a text file with a `{question}` placeholder (`data/prompts/`);
a hint template (rationalization) also has an `{answer}` placeholder for the gold answer."""

from __future__ import annotations

import hashlib
import re


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

    @property
    def hinted(self) -> bool:
        """The template shows the gold answer (`{answer}`)."""
        return "{answer}" in self.text

    def render(self, question: str, answer: str | None = None) -> str:
        if not self.hinted:
            return self.text.replace("{question}", question)
        if answer is None:
            raise ValueError(f"the hint template {self.path} needs the gold answer")
        # one pass, so that a question holding "{answer}" stays as it is
        return re.sub(r"\{(question|answer)\}",
                      lambda m: question if m.group(1) == "question" else answer, self.text)
