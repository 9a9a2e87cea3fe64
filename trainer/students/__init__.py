"""Student kinds behind one interface (`trainer.students.base.Student`); each kind is one file
of this package that registers itself in `STUDENT_KINDS`."""

from __future__ import annotations

from pipeline.registry import STUDENT_KINDS
from trainer.students.base import Student


def student_for(path: str) -> Student:
    """The student interface for the model at `path` (a folder or a hub id): the registered
    kind whose `fits(config)` takes the model's config, specific kinds before generic ones
    (decoder-only models: Llama, Qwen, SmolLM, GPT-2, ...; encoder-decoder ones: T5, Flan-T5,
    BART)."""
    from transformers import AutoConfig

    from pipeline.models import hub_errors

    with hub_errors(path):
        config = AutoConfig.from_pretrained(path)
    kinds = sorted(STUDENT_KINDS, key=lambda kind: getattr(kind, "generic", False))
    for kind in kinds:
        if kind.fits(config):
            return kind()
    raise ValueError(f"no student kind takes the model {path} (model_type "
                     f"{getattr(config, 'model_type', '?')!r}); the kinds are "
                     f"{', '.join(STUDENT_KINDS.names())}: add one in trainer/students/")
