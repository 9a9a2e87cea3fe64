"""The student interface: what the trainer and eval need to know about a kind of model.

Encoding an example, padding a batch, loading the weights, the LoRA task type and the logits
at the target positions all depend on whether the student is decoder-only or an
encoder-decoder; everything else (the DSS examples, the loss terms, the Trainer) does not, and
goes through this interface. Target logits always come from the model's own forward, so a
wrapped model (PEFT, DDP, FSDP) works as it is.
"""

from __future__ import annotations

from typing import Protocol

import torch


class Student(Protocol):
    name: str                  # the kind's name ("causal_lm", "seq2seq"), recorded in manifests
    task_type: str             # peft's TaskType for LoRA
    lora_targets: list[str]    # the layers that get adapters unless train.lora_targets says
    decoder_only: bool         # prompt and answer in one sequence: `generate` returns the prompt
                               # then the new tokens, and vLLM can serve it with LoRA adapters
    generic: bool              # tried after the specific kinds when a model is matched

    @classmethod
    def fits(cls, config) -> bool:
        """Whether this kind takes a model with this transformers config."""

    def load(self, path: str, dtype: str) -> torch.nn.Module:
        """The model's weights, frozen dtype `dtype`, ready to train or to generate."""

    def encode(self, prompt_ids: list[int], target_ids: list[int], max_length: int) -> dict:
        """One example: `input_ids` and `labels` (-100 where there is no target), at most
        `max_length` tokens, the target cut first (the prompt keeps at least half)."""

    def collate(self, examples: list[dict], pad_id: int) -> dict[str, torch.Tensor]:
        """A padded batch of encoded examples, ready for `target_logits`."""

    def target_logits(self, model: torch.nn.Module, batch: dict[str, torch.Tensor],
                      perturb=None) -> tuple[torch.Tensor, torch.Tensor]:
        """The logits at every target position, [N, V], and the targets, [N]: row by row,
        in sequence order. `perturb(embeddings, prompt_mask)`, when given, disturbs the input
        embeddings of the prompt's tokens before the forward (consistency regularisation)."""
