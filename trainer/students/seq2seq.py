"""Encoder-decoder students (T5, Flan-T5, BART, ...), as in the Distilling Step-by-Step paper.

The prompt (`predict: <question>` / `explain: <question>`) is the encoder's input and the
target the decoder's: each side has its own length, so `max_length` bounds each of them. The
decoder is fed the targets shifted right behind the model's decoder-start token (teacher
forcing), so the logits at every decoder position are those of its target; batches are
right-padded (the decoder is causal, so padding after a sequence changes nothing before it).
"""

from __future__ import annotations

import torch

from pipeline.models import hub_errors, torch_dtype
from pipeline.registry import STUDENT_KINDS
from trainer.students.causal_lm import unwrap


@STUDENT_KINDS.register
class Seq2SeqStudent:
    name = "seq2seq"
    decoder_only = False
    generic = False
    task_type = "SEQ_2_SEQ_LM"
    # the attention projections, as T5 names them (BART's are q_proj/k_proj/...; set
    # train.lora_targets for those)
    lora_targets = ["q", "k", "v", "o"]


    @classmethod
    def fits(cls, config) -> bool:
        return bool(getattr(config, "is_encoder_decoder", False))
    def load(self, path: str, dtype: str) -> torch.nn.Module:
        from transformers import AutoModelForSeq2SeqLM

        with hub_errors(path):
            return AutoModelForSeq2SeqLM.from_pretrained(path, dtype=torch_dtype(dtype))

    def encode(self, prompt_ids: list[int], target_ids: list[int], max_length: int) -> dict:
        return {"input_ids": list(prompt_ids)[:max_length],
                "labels": list(target_ids)[:max_length]}

    def collate(self, examples: list[dict], pad_id: int) -> dict[str, torch.Tensor]:
        width = max(len(e["input_ids"]) for e in examples)
        depth = max(len(e["labels"]) for e in examples)
        ids = [list(e["input_ids"]) + [pad_id] * (width - len(e["input_ids"]))
               for e in examples]
        mask = [[1] * len(e["input_ids"]) + [0] * (width - len(e["input_ids"]))
                for e in examples]
        labels = [list(e["labels"]) + [-100] * (depth - len(e["labels"])) for e in examples]
        mask_t = torch.tensor(mask, dtype=torch.long)
        return {"input_ids": torch.tensor(ids, dtype=torch.long), "attention_mask": mask_t,
                "labels": torch.tensor(labels, dtype=torch.long),
                "prompt_mask": mask_t.bool()}  # the whole encoder input is the prompt

    def target_logits(self, model: torch.nn.Module, batch: dict[str, torch.Tensor],
                      perturb=None) -> tuple[torch.Tensor, torch.Tensor]:
        labels = batch["labels"]
        config = unwrap(model).config
        start = config.decoder_start_token_id
        pad = config.pad_token_id if config.pad_token_id is not None else 0
        decoder = labels.new_full(labels.shape, start if start is not None else pad)
        decoder[:, 1:] = labels[:, :-1]
        decoder = decoder.masked_fill(decoder == -100, pad)
        inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
        if perturb is not None:  # noise on the encoder's input embeddings
            embeddings = unwrap(model).get_input_embeddings()(inputs.pop("input_ids"))
            inputs["inputs_embeds"] = perturb(embeddings, batch["prompt_mask"])
        logits = model(**inputs, decoder_input_ids=decoder).logits       # [B, T, V]
        keep = labels != -100
        return logits[keep], labels[keep]
