"""Student kinds behind one interface (`trainer.students.base.Student`)."""

from __future__ import annotations

from trainer.students.base import Student


def student_for(path: str) -> Student:
    """The student interface for the model at `path` (a folder or a hub id)."""
    from transformers import AutoConfig

    from trainer.students.causal_lm import CausalLMStudent

    config = AutoConfig.from_pretrained(path)
    if getattr(config, "is_encoder_decoder", False):
        raise ValueError(f"the student '{path}' is an encoder-decoder model "
                         f"({config.model_type}); students are decoder-only models for now "
                         "(Llama, Qwen, SmolLM, GPT-2, ...)")
    return CausalLMStudent()
