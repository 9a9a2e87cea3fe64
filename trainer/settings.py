"""The train section (`train.*` in a config): the student, the loss terms (`losses/`), LoRA
(`lora.py`), the trainer's arguments (`arguments.py`) and what the train stage reads of the
kept traces: declared beside the code that reads them."""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import ClassVar

from pipeline.config import EMBEDDED_MODEL, NEVER, UNLESS_DEFAULT, Section, opt, with_


@dataclass
class TrainConfig(Section):
    NAME: ClassVar[str] = "train"

    name: str = opt("", "Variant name: '' trains into the run's train/ folder, a name into "
                    "train-<name>/ beside it, so several students (settings, seeds) share one "
                    "run's traces; eval scores every finished one.", fingerprint=NEVER)
    student: str = opt(EMBEDDED_MODEL, "Student: a local checkpoint folder, a hub id, or "
                       f"'{EMBEDDED_MODEL}'.")
    alpha: float = opt(0.5, "Weight of the predict loss: alpha*L_predict + (1-alpha)*L_explain.",
                       ge=0.0, le=1.0)
    epochs: float = opt(2.0, "Passes over the kept traces.", gt=0.0)
    max_steps: int = opt(-1, "Optimizer steps (overrides epochs when > 0).", ge=-1)
    learning_rate: float = opt(5e-4, "Peak learning rate.", gt=0.0, le=1.0)
    warmup_ratio: float = opt(0.05, "Share of steps spent warming up.", ge=0.0, le=1.0)
    weight_decay: float = opt(0.0, "AdamW weight decay.", ge=0.0)
    batch_size: int = opt(8, "Traces per device batch (each gives a predict and an explain "
                          "example).", ge=1)
    grad_accum: int = opt(1, "Gradient accumulation steps.", ge=1)
    max_length: int = opt(320, "Tokens per example at most (prompt + target).", ge=16)
    dtype: str = opt("bfloat16", "Dtype of the frozen student weights while training (the LoRA "
                     "adapters stay float32).", choices=["bfloat16", "float32", "float16"])
    explain_targets: str = opt("auto", "What the explain: target is: `tokens` = the teacher's "
                               "own rationale tokens (exact; needs the teacher's tokenizer), "
                               "`text` = the rationale re-tokenised by the student, `auto` = "
                               "tokens when the traces allow it, else text.",
                               choices=["auto", "tokens", "text"])
    kd_lam: float = opt(0.0, "Weight of the KD term in the explain loss: L_explain = (1 - lam) "
                        "* CE + lam * T^2 * D(teacher_T || student_T), from the stored top-k; "
                        "0 = no KD. Needs the teacher's tokenizer.", ge=0.0, le=1.0)
    kd_temperature: float = opt(1.0, "KD temperature T (softens both distributions).", gt=0.0,
                                le=20.0, fingerprint=with_("kd_lam"))
    kd_beta: float = opt(0.0, "KD divergence: 0 = forward KL(teacher || student), 1 = reverse "
                         "KL, in between a mix of the two.", ge=0.0, le=1.0,
                         fingerprint=with_("kd_lam"))
    kd_tail: str = opt("bucket", "Probability outside the teacher's top k: one extra `bucket` "
                       "category, or `renormalize` both distributions over the top k.",
                       choices=["bucket", "renormalize"], fingerprint=with_("kd_lam"))
    answer_kd_lam: float = opt(0.0, "Weight of KD on the answer (soft labels, classic "
                               "distillation) in the predict loss: L_predict = (1 - lam) * CE + "
                               "lam * T^2 * D(teacher_T || student_T), from the stored top-k at "
                               "the teacher's answer tokens (the predict: target becomes those "
                               "tokens); 0 = off. Needs the teacher's tokenizer.", ge=0.0, le=1.0,
                               fingerprint=UNLESS_DEFAULT)
    answer_kd_temperature: float = opt(2.0, "Temperature T of the answer KD.", gt=0.0, le=20.0,
                                       fingerprint=with_("answer_kd_lam"))
    rationale_loss: str = opt("ce", "The explain loss: `ce` = token cross-entropy on the "
                              "rationale, `cosine` = a margin cosine loss between the student's "
                              "and the teacher's next-token distributions over the teacher's "
                              "top-k (+ the rest) at every rationale token, max(0, 1 - cos - "
                              "margin) (needs the stored top-k).", choices=["ce", "cosine"],
                              fingerprint=UNLESS_DEFAULT)
    cosine_margin: float = opt(0.05, "rationale_loss=cosine: positions whose cosine is within "
                               "this of 1 add no loss.", ge=0.0, lt=1.0,
                               fingerprint=with_("rationale_loss"))
    consistency_lam: float = opt(0.0, "Weight of consistency regularisation: KL(clean || noisy) "
                                 "between the student's answer distributions (predict:) on the "
                                 "clean question and on a noisy copy; 0 = off.", ge=0.0, le=10.0,
                                 fingerprint=UNLESS_DEFAULT)
    consistency_noise: str = opt("embedding", "The noise: `embedding` = Gaussian noise on the "
                                 "question's input embeddings (std = amount x their RMS), "
                                 "`dropout` = each question token's embedding zeroed with "
                                 "probability amount.", choices=["embedding", "dropout"],
                                 fingerprint=with_("consistency_lam"))
    consistency_amount: float = opt(0.1, "The noise's size (see consistency_noise).", gt=0.0,
                                    lt=1.0, fingerprint=with_("consistency_lam"))
    data_fraction: float = opt(1.0, "Share of the kept traces to train on (whole questions, "
                               "chosen by a hash of their id, so a smaller share is a subset "
                               "of a larger one); the data-efficiency sweep sets it.", gt=0.0,
                               le=1.0, fingerprint=UNLESS_DEFAULT)
    heldout_share: float = opt(0.0, "Share of the kept questions held out of training "
                               "(the last ones by the same hash as data_fraction, so the two "
                               "never overlap): their loss, every term, is computed every "
                               "eval_steps and logged as eval_loss; 0 = off.", ge=0.0, lt=1.0,
                               fingerprint=UNLESS_DEFAULT)
    eval_steps: int = opt(0, "heldout_share > 0: compute the held-out loss every N steps "
                          "(0 = every save_steps).", ge=0, fingerprint=with_("heldout_share"))
    predict_on: str = opt("kept", "Where the predict: examples come from: `kept` = one per kept "
                          "trace (its question and gold answer), `labelled` = one per training "
                          "question with a gold answer, whether or not a trace of it was kept "
                          "(the DSS paper's setting with labels); explain: examples always come "
                          "from the kept traces, and the shorter list is cycled to the longer.",
                          choices=["kept", "labelled"], fingerprint=UNLESS_DEFAULT)
    predict_template: str = opt("{answer}", "The predict: target as a template over the "
                                "answer: `{answer}` (the answer alone, the DSS paper's label) "
                                "or a sentence such as `The answer is {answer}.` (the marker "
                                "the teacher's traces end with), so that a predict: target "
                                "never begins the way an explain: rationale does; eval reads "
                                "either.", fingerprint=UNLESS_DEFAULT)
    kd_hinted: bool = opt(False, "Use the stored top-k of hinted traces (generate.hint_template) "
                          "for KD too: it was computed with the gold answer in the teacher's "
                          "prompt (privileged information the student never has), so by "
                          "default hinted traces train by cross-entropy only.",
                          fingerprint=UNLESS_DEFAULT)
    explain_warmup_steps: int = opt(0, "Linear warm-up of the explain loss's weight over the "
                                    "first N optimizer steps (the student first learns to "
                                    "answer).", ge=0)
    predict_warmup_steps: int = opt(0, "Linear warm-up of the predict loss's weight over the "
                                    "first N optimizer steps (the student first learns to "
                                    "write rationales: the short answer targets are learnt "
                                    "much faster and, on a small pool, take over its explain: "
                                    "mode).", ge=0, fingerprint=UNLESS_DEFAULT)
    lora_r: int = opt(16, "LoRA rank.", ge=1)
    lora_alpha: int = opt(32, "LoRA scaling numerator.", ge=1)
    lora_dropout: float = opt(0.05, "LoRA dropout.", ge=0.0, lt=1.0)
    lora_targets: list[str] | None = opt(None, "Module names that get adapters; null = the "
                                         "usual ones of the student's kind (decoder-only: "
                                         "q/k/v/o_proj, gate/up/down_proj).")
    seed: int = opt(0, "Training seed.", ge=0)
    report_to: list[str] = opt(["tensorboard"], "Where the training metrics go besides "
                               "log.jsonl: transformers' integrations (tensorboard, wandb, "
                               "mlflow, trackio, ...) or none. TensorBoard's event files are "
                               "written to tensorboard/ in the student's folder.",
                               fingerprint=NEVER)
    args: dict = opt({}, "Any other field of TRL's SFTConfig / transformers' "
                     "TrainingArguments, passed as it is, e.g. {lr_scheduler_type: linear, "
                     "gradient_checkpointing: true, optim: adamw_torch_fused, max_grad_norm: "
                     "0.5, run_name: try-3} or train.args.optim=adafactor; checked against the "
                     "real dataclass when training starts. Fields with a train.* key of their "
                     "own are set there.", fingerprint=UNLESS_DEFAULT)
    logging_steps: int = opt(5, "Log every N steps.", ge=1)
    save_steps: int = opt(50, "Checkpoint every N steps (the unit of resume).", ge=1)
    save_total_limit: int = opt(2, "Checkpoints kept.", ge=1)

    def _check(self, errors: list[str]) -> None:
        if self.name and not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}", self.name):
            errors.append(f"train.name: {self.name!r} must be 1-64 letters, digits, '.', '_' "
                          "or '-' (it names the folder train-<name>)")
        if self.kd_lam > 0 and self.explain_targets == "text":
            errors.append("train.explain_targets=text cannot carry KD (train.kd_lam > 0): KD "
                          "needs the teacher's own tokens as targets; use auto or tokens")
        if self.rationale_loss == "cosine" and self.explain_targets == "text":
            errors.append("train.rationale_loss=cosine compares the student with the teacher's "
                          "top-k at the teacher's own tokens; use train.explain_targets=auto "
                          "or tokens")
        if "{answer}" not in self.predict_template:
            errors.append(f"train.predict_template: {self.predict_template!r} has no "
                          "{answer} placeholder; e.g. 'The answer is {answer}.'")
        elif self.predict_template != "{answer}" and self.answer_kd_lam > 0:
            errors.append("train.predict_template with train.answer_kd_lam > 0: answer KD "
                          "learns the teacher's own answer tokens as the predict: target; use "
                          "one or the other")
        if self.predict_on == "labelled" and self.answer_kd_lam > 0:
            errors.append("train.predict_on=labelled with train.answer_kd_lam > 0: answer KD "
                          "needs the teacher's answer tokens, which questions without a kept "
                          "trace do not have; use one or the other")
        if self.rationale_loss == "cosine" and self.kd_lam >= 1:
            errors.append("train.rationale_loss=cosine with train.kd_lam=1 gives the rationale "
                          "loss no weight; lower train.kd_lam")
