"""Student kinds behind one interface (`trainer.students.base.Student`)."""

from __future__ import annotations

from trainer.students.base import Student


def student_for(path: str) -> Student:
    """The student interface for the model at `path` (a folder or a hub id): decoder-only
    models (Llama, Qwen, SmolLM, GPT-2, ...) or encoder-decoder ones (T5, Flan-T5, BART)."""
    from transformers import AutoConfig

    from trainer.students.causal_lm import CausalLMStudent
    from trainer.students.seq2seq import Seq2SeqStudent

    from pipeline.models import hub_errors

    with hub_errors(path):
        config = AutoConfig.from_pretrained(path)
    return Seq2SeqStudent() if getattr(config, "is_encoder_decoder", False) else CausalLMStudent()
