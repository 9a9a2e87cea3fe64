"""The multi-task Trainer: alpha * L_predict + (1 - alpha) * L_explain (Hsieh et al., 2023).

Built on the transformers Trainer, so checkpoints, resume, logging and `accelerate launch`
come with it; only the loss is ours.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from transformers import Trainer, TrainerCallback


def masked_ce(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy over the positions whose label is not -100."""
    shift_logits = logits[:, :-1].float()
    shift_labels = labels[:, 1:]
    return torch.nn.functional.cross_entropy(
        shift_logits.reshape(-1, shift_logits.size(-1)), shift_labels.reshape(-1),
        ignore_index=-100)


def target_logits(model, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                  labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits at the target positions only, with their next-token labels: [N, V] and [N].

    The output projection over the vocabulary is the costliest layer of a small model; prompt
    and padding positions carry no loss, so it is applied only where a label is set.
    """
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    decoder, head = base.get_decoder(), base.get_output_embeddings()
    shift_labels = labels[:, 1:]
    keep = shift_labels != -100
    if decoder is None or head is None:  # an architecture without the usual split
        logits = model(input_ids=input_ids, attention_mask=attention_mask).logits
        return logits[:, :-1][keep], shift_labels[keep]
    hidden = decoder(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
    return head(hidden[:, :-1][keep]), shift_labels[keep]


class DSSTrainer(Trainer):
    """Trains on (predict, explain) pairs; `alpha` weighs the predict loss.

    With `kd_lam` > 0 the explain loss is (1 - lam) * CE + lam * KD, KD from the teacher's
    top-k rows in the batch (`trainer.kd.topk_kd_loss`); `explain_warmup_steps` ramps the
    explain loss's weight linearly from 0 over the first steps.
    """

    def __init__(self, *args, alpha: float = 0.5, kd_lam: float = 0.0,
                 kd_temperature: float = 1.0, kd_beta: float = 0.0, kd_tail: str = "bucket",
                 explain_warmup_steps: int = 0, **kwargs):
        super().__init__(*args, **kwargs)
        self.alpha = alpha
        self.kd = {"lam": kd_lam, "temperature": kd_temperature, "beta": kd_beta,
                   "tail": kd_tail}
        self.explain_warmup_steps = explain_warmup_steps
        self._parts = {"loss_predict": [], "loss_explain": []}
        if kd_lam > 0:
            self._parts.update(loss_explain_ce=[], loss_kd=[])

    def explain_weight(self) -> float:
        if self.explain_warmup_steps <= 0:
            return 1.0
        return min(1.0, self.state.global_step / self.explain_warmup_steps)

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        from trainer.kd import topk_kd_loss

        weights = {"pred": self.alpha, "expl": (1 - self.alpha) * self.explain_weight()}
        loss = 0.0
        for part, name in (("pred", "loss_predict"), ("expl", "loss_explain")):
            if weights[part] == 0 and any(weights.values()):
                continue  # answer-only (alpha=1), explain-only (alpha=0) or warming up
            logits, targets = target_logits(model, inputs[f"{part}_input_ids"],
                                            inputs[f"{part}_attention_mask"],
                                            inputs[f"{part}_labels"])
            logits = logits.float()
            # cross-entropy from the log-sum-exp, which KD then reuses (one pass over [N, V])
            lse = torch.logsumexp(logits, -1)
            ce = (lse - logits.gather(1, targets[:, None]).squeeze(1)).mean()
            if part == "expl" and self.kd["lam"] > 0:
                ids, lps = inputs["expl_kd_ids"], inputs["expl_kd_logprobs"]
                has = (ids >= 0).any(-1)  # the end-of-sequence target has no teacher row
                kd = topk_kd_loss(logits[has], ids[has], lps[has], self.kd["temperature"],
                                  self.kd["beta"], self.kd["tail"], lse=lse[has])
                self._parts["loss_explain_ce"].append(ce.detach().item())
                self._parts["loss_kd"].append(kd.detach().item())
                part_loss = (1 - self.kd["lam"]) * ce + self.kd["lam"] * kd
            else:
                part_loss = ce
            self._parts[name].append(part_loss.detach().item())
            loss = loss + weights[part] * part_loss
        return (loss, None) if return_outputs else loss

    def log(self, logs: dict, start_time: float | None = None) -> None:
        for name, values in self._parts.items():
            if values and "loss" in logs:
                logs[name] = round(sum(values) / len(values), 4)
                values.clear()
        super().log(logs, start_time)


class JsonlLogCallback(TrainerCallback):
    """Appends every log record to a JSONL file as it happens (nothing lost on a crash)."""

    def __init__(self, path: Path):
        self.path = Path(path)

    def on_log(self, args, state, control, logs=None, **kwargs):
        if logs and state.is_world_process_zero:
            with open(self.path, "a") as f:
                f.write(json.dumps({"step": state.global_step, **logs}) + "\n")
