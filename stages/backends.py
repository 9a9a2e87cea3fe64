"""Teacher backends. A backend turns a batch of prompts into generations with per-token top-k.

The `hf` backend runs transformers `generate` on the local machine. The top-k log-probabilities
come from the raw next-token logits (before temperature and top-p), captured by a logits
processor as they are produced, so no full-vocabulary tensor is kept for the whole sequence.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Protocol

import numpy as np

LOGPROB_SOURCE = "raw_logits"  # log_softmax of the logits before temperature / top-p


@dataclass
class Generation:
    """One sampled continuation; arrays have one entry per generated token."""

    text: str
    finish_reason: str                 # "stop" (eos or stop string) or "length"
    token_ids: np.ndarray              # int32 [T]
    token_logprobs: np.ndarray         # float32 [T]
    topk_ids: np.ndarray               # int32 [T, k]
    topk_logprobs: np.ndarray          # float32 [T, k]


@dataclass
class SamplingSettings:
    n: int
    temperature: float
    top_p: float
    max_new_tokens: int
    top_k: int                         # 0: no log-probabilities (evaluation)
    seed: int
    stop: list[str]


class TeacherBackend(Protocol):
    name: str

    def facts(self) -> dict:
        """Self-describing facts for the manifest: model, revision, tokenizer, vocab size."""

    def generate(self, prompts: list[str], settings: SamplingSettings) -> list[list[Generation]]:
        """`settings.n` generations for every prompt, in prompt order."""


class _TopKCapture:
    """A logits processor that records the top-k of the raw distribution at every step.

    transformers runs user processors after its own (none of which change the logits with our
    settings) and before the temperature / top-p warpers, so `scores` are the raw logits. The
    previous step's log-softmax row is kept so that one step later, when the sampled token
    appears in `input_ids`, its log-probability can be read.
    """

    def __init__(self, k: int):
        self.k = k
        self.topk_ids: list = []
        self.topk_logprobs: list = []
        self.sampled_logprobs: list = []
        self._prev = None

    def __call__(self, input_ids, scores):
        import torch

        logprobs = torch.log_softmax(scores.float(), dim=-1)
        if self._prev is not None:
            self.sampled_logprobs.append(self._prev.gather(1, input_ids[:, -1:]).squeeze(1))
        values, ids = logprobs.topk(self.k, dim=-1)
        self.topk_ids.append(ids.to(torch.int32))
        self.topk_logprobs.append(values)
        self._prev = logprobs
        return scores

    def finish(self, last_tokens):
        self.sampled_logprobs.append(self._prev.gather(1, last_tokens[:, None]).squeeze(1))


def render_prompt(tokenizer, prompt: str, chat_template: bool) -> str:
    """The prompt as is, or as one user turn of the model's chat template."""
    if not chat_template:
        return prompt
    return tokenizer.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False,
                                         add_generation_prompt=True)


def tokens_within(tokenizer, ids: list[int], limit: int, skip_special_tokens: bool = False
                  ) -> int:
    """The longest prefix of `ids` whose decoded text has at most `limit` characters."""
    lo, hi = 0, len(ids)
    while lo < hi:
        mid = (lo + hi + 1) // 2
        text = tokenizer.decode(ids[:mid], skip_special_tokens=skip_special_tokens)
        if len(text) <= limit:
            lo = mid
        else:
            hi = mid - 1
    return lo


def cut_at_stop(tokenizer, ids: list[int], stop: list[str]) -> tuple[int, bool]:
    """How many of `ids` come wholly before the first stop string, and whether one was found."""
    if not stop:
        return len(ids), False
    text = tokenizer.decode(ids, skip_special_tokens=False)
    cut = min((i for i in (text.find(s) for s in stop) if i >= 0), default=-1)
    if cut < 0:
        return len(ids), False
    return tokens_within(tokenizer, ids, cut), True


class HFBackend:
    """Teacher on the local machine through transformers `generate`."""

    name = "hf"

    def __init__(self, model: str, dtype: str = "bfloat16", chat_template: bool = False,
                 loaded: tuple | None = None):
        """`loaded` = (model, tokenizer) reuses weights already in memory (the evaluation's
        merged student); otherwise `model` is resolved and loaded."""
        t0 = time.time()
        from pipeline.models import (contiguous_head, load_causal_lm, load_tokenizer,
                                     model_revision, resolve_model, tokenizer_fingerprint)

        self.model_spec = model
        if loaded is None:
            self.path = resolve_model(model)
            self.tokenizer = load_tokenizer(self.path, padding_side="left")
            self.model = load_causal_lm(self.path, dtype)
            revision = model_revision(self.path)
        else:
            self.model, self.tokenizer = loaded
            self.tokenizer.padding_side = "left"
            self.path, revision = model, "in-memory"
        contiguous_head(self.model)
        self.startup_s = time.time() - t0
        self.stats = {"engine_s": 0.0}
        self.dtype = dtype
        self.chat_template = chat_template
        self._facts = {"backend": self.name, "teacher": model, "teacher_revision": revision,
                       "tokenizer_fingerprint": tokenizer_fingerprint(self.tokenizer),
                       "vocab_size": int(self.model.config.vocab_size), "dtype": dtype,
                       "logprob_source": LOGPROB_SOURCE}

    def facts(self) -> dict:
        return dict(self._facts)

    def render(self, prompt: str) -> str:
        return render_prompt(self.tokenizer, prompt, self.chat_template)

    def generate(self, prompts: list[str], settings: SamplingSettings) -> list[list[Generation]]:
        import torch
        from transformers import LogitsProcessorList

        tok = self.tokenizer
        enc = tok([self.render(p) for p in prompts], return_tensors="pt", padding=True,
                  add_special_tokens=False)
        capture = _TopKCapture(settings.top_k) if settings.top_k > 0 else None
        torch.manual_seed(settings.seed)
        sample = settings.temperature > 0
        kwargs = dict(max_new_tokens=settings.max_new_tokens, do_sample=sample,
                      num_return_sequences=settings.n, pad_token_id=tok.pad_token_id,
                      logits_processor=LogitsProcessorList([capture] if capture else []))
        if sample:
            kwargs.update(temperature=settings.temperature, top_p=settings.top_p, top_k=0)
        else:
            kwargs.update(temperature=None, top_p=None, top_k=None)
        if settings.stop:
            kwargs.update(stop_strings=list(settings.stop), tokenizer=tok)
        t0 = time.perf_counter()
        with torch.inference_mode():
            out = self.model.generate(**enc, **kwargs)
        self.stats["engine_s"] += time.perf_counter() - t0
        new = out[:, enc["input_ids"].shape[1]:]
        steps = new.shape[1]
        if capture is not None:
            capture.finish(new[:, -1])
            topk_ids = torch.stack(capture.topk_ids, 1).numpy()           # [B*n, S, k]
            topk_lp = torch.stack(capture.topk_logprobs, 1).numpy()
            tok_lp = torch.stack(capture.sampled_logprobs, 1).numpy()      # [B*n, S]
        else:
            topk_ids = np.zeros((new.shape[0], steps, 0), np.int32)
            topk_lp = np.zeros((new.shape[0], steps, 0), np.float32)
            tok_lp = np.zeros((new.shape[0], steps), np.float32)
        new = new.numpy()
        eos = self.model.generation_config.eos_token_id
        eos = set(np.atleast_1d(eos if eos is not None else tok.eos_token_id).tolist())
        results: list[list[Generation]] = []
        for b in range(len(prompts)):
            row = []
            for j in range(settings.n):
                i = b * settings.n + j
                ids = new[i].tolist()
                length, finish = steps, "length"
                for t, token in enumerate(ids):
                    if token in eos:
                        length, finish = t, "stop"
                        break
                cut, stopped = cut_at_stop(tok, ids[:length], settings.stop)
                if stopped:
                    length, finish = cut, "stop"
                row.append(Generation(
                    text=tok.decode(ids[:length], skip_special_tokens=True),
                    finish_reason=finish,
                    token_ids=new[i, :length].astype(np.int32),
                    token_logprobs=tok_lp[i, :length].astype(np.float32),
                    topk_ids=topk_ids[i, :length],
                    topk_logprobs=topk_lp[i, :length].astype(np.float32)))
            results.append(row)
        return results


def make_backend(cfg, work_dir=None, vllm_cfg=None) -> TeacherBackend:
    """The backend named in a GenerateConfig; `work_dir` holds the openai request cache,
    `vllm_cfg` is the `vllm` section (engine settings)."""
    if cfg.backend == "hf":
        return HFBackend(cfg.model, dtype=cfg.dtype, chat_template=cfg.chat_template)
    if cfg.backend == "vllm":
        from stages.vllm_backend import VLLMBackend

        if vllm_cfg is None:
            from pipeline.config import VLLMConfig

            vllm_cfg = VLLMConfig()
        return VLLMBackend(cfg, vllm_cfg, cfg.top_k)
    if cfg.backend == "openai":
        from pathlib import Path

        from stages.openai_backend import OpenAIBackend

        return OpenAIBackend(cfg, Path(work_dir or ".") / "requests.sqlite")
    raise ValueError(f"unknown backend {cfg.backend!r}")
