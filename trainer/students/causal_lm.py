"""Decoder-only students (Llama, Qwen, SmolLM, GPT-2, ...): prompt and target in one sequence.

Batches are left-padded with explicit position ids (each sequence's real tokens sit at
positions 0..n-1, exactly as unpadded), and each label is moved to the position that predicts
it. The target positions of all rows then end the batch, so the output layer, the costliest
layer of a small model, is asked (`logits_to_keep`) only for the last positions that hold a
target in some row, through the model's own forward.
"""

from __future__ import annotations

import inspect

import torch

from pipeline.models import hub_errors, torch_dtype
from pipeline.registry import STUDENT_KINDS


@STUDENT_KINDS.register
class CausalLMStudent:
    name = "causal_lm"
    decoder_only = True
    generic = True
    task_type = "CAUSAL_LM"
    # attention and MLP projections, as Llama, Qwen, Mistral and SmolLM name them
    lora_targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


    @classmethod
    def fits(cls, config) -> bool:
        return not getattr(config, "is_encoder_decoder", False)
    def __init__(self):
        self._keeps_logits: bool | None = None

    def load(self, path: str, dtype: str) -> torch.nn.Module:
        from transformers import AutoModelForCausalLM

        with hub_errors(path):
            return AutoModelForCausalLM.from_pretrained(path, dtype=torch_dtype(dtype))

    def encode(self, prompt_ids: list[int], target_ids: list[int], max_length: int) -> dict:
        prompt, target = list(prompt_ids), list(target_ids)
        if len(prompt) >= max_length:
            prompt = prompt[: max_length // 2]  # keep room for the target; rare with sane settings
        target = target[: max_length - len(prompt)]
        return {"input_ids": prompt + target, "labels": [-100] * len(prompt) + target}

    def collate(self, examples: list[dict], pad_id: int) -> dict[str, torch.Tensor]:
        width = max(len(e["input_ids"]) for e in examples)
        ids, mask, labels, prompt = [], [], [], []
        for e in examples:
            pad = width - len(e["input_ids"])
            ids.append([pad_id] * pad + list(e["input_ids"]))
            mask.append([0] * pad + [1] * len(e["input_ids"]))
            prompt.append([0] * pad + [int(label == -100) for label in e["labels"]])
            # the token at position j+1 is predicted at position j
            labels.append([-100] * pad + list(e["labels"][1:]) + [-100])
        mask_t = torch.tensor(mask, dtype=torch.long)
        return {"input_ids": torch.tensor(ids, dtype=torch.long), "attention_mask": mask_t,
                "position_ids": (mask_t.cumsum(-1) - 1).clamp(min=0),
                "labels": torch.tensor(labels, dtype=torch.long),
                "prompt_mask": torch.tensor(prompt, dtype=torch.bool)}

    def target_logits(self, model: torch.nn.Module, batch: dict[str, torch.Tensor],
                      perturb=None) -> tuple[torch.Tensor, torch.Tensor]:
        labels = batch["labels"]
        keep = labels != -100
        columns = keep.any(0).nonzero().squeeze(1)
        inputs = {k: batch[k] for k in ("input_ids", "attention_mask", "position_ids")}
        if perturb is not None:  # noise on the prompt's input embeddings
            embeddings = unwrap(model).get_input_embeddings()(inputs.pop("input_ids"))
            inputs["inputs_embeds"] = perturb(embeddings, batch["prompt_mask"])
        if self._accepts_logits_to_keep(model):
            logits = model(**inputs, logits_to_keep=columns).logits      # [B, K, V]
        else:  # an architecture without it: every position, then the target ones
            logits = model(**inputs).logits[:, columns]
        inside = keep[:, columns]
        return logits[inside], labels[:, columns][inside]

    def _accepts_logits_to_keep(self, model: torch.nn.Module) -> bool:
        if self._keeps_logits is None:
            inner = unwrap(model)
            if hasattr(inner, "get_base_model"):  # peft
                inner = inner.get_base_model()
            self._keeps_logits = "logits_to_keep" in inspect.signature(inner.forward).parameters
        return self._keeps_logits


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """The model inside DistributedDataParallel and friends (a PEFT model stays one)."""
    while hasattr(model, "module"):
        model = model.module
    return model
