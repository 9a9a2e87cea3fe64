"""The `hf` backend: transformers `generate` on the local machine.

The top-k log-probabilities come from the raw next-token logits (before temperature and
top-p), captured by a logits processor as they are produced, so no full-vocabulary tensor is
kept for the whole sequence.
"""

from __future__ import annotations

import time

import numpy as np

from pipeline.registry import BACKENDS
from stages.backends.base import (LOGPROB_SOURCE, BackendKind, Generation, SamplingSettings,
                                  Scored, cut_at_stop, render_prompt)


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


class HFBackend:
    """A model on the local machine through transformers `generate`: the teacher, or in eval
    any system (a distilled student arrives already loaded)."""

    name = "hf"

    def __init__(self, model: str, dtype: str = "bfloat16", chat_template: bool = False,
                 loaded: tuple | None = None):
        """`loaded` = (model, tokenizer) uses weights already in memory (eval's merged
        students); otherwise `model` is resolved and loaded as a causal LM."""
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
        # a decoder-only model returns prompt + new tokens; an encoder-decoder model returns
        # the decoder's tokens, which start with its decoder-start token
        new = out[:, 1:] if self.model.config.is_encoder_decoder else \
            out[:, enc["input_ids"].shape[1]:]
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


    def score(self, prompts: list[str], completions: list[np.ndarray], k: int,
              batch_size: int = 8) -> list[Scored]:
        """The model's log-probabilities over given continuations (a student's trace): for
        every token of `completions[i]` after `prompts[i]` (rendered like a generation's
        prompt), the token's own log-probability and the top k, from the raw logits of one
        forward pass, as `generate` would have recorded them had the model sampled that
        token."""
        import torch

        tok = self.tokenizer
        encoded = tok([self.render(p) for p in prompts], add_special_tokens=False)["input_ids"]
        pad = tok.pad_token_id if tok.pad_token_id is not None else 0
        out: list[Scored] = [None] * len(prompts)  # type: ignore[list-item]
        # similar lengths together; right padding keeps every real token's position
        order = sorted(range(len(prompts)), key=lambda i: len(encoded[i]) + len(completions[i]))
        t0 = time.perf_counter()
        for start in range(0, len(order), batch_size):
            chunk = order[start:start + batch_size]
            seqs = [list(encoded[i]) + [int(x) for x in completions[i]] for i in chunk]
            width = max(len(s) for s in seqs)
            ids = torch.full((len(seqs), width), pad, dtype=torch.long)
            mask = torch.zeros((len(seqs), width), dtype=torch.long)
            for row, seq in enumerate(seqs):
                ids[row, :len(seq)] = torch.tensor(seq)
                mask[row, :len(seq)] = 1
            with torch.inference_mode():
                logits = self.model(input_ids=ids, attention_mask=mask).logits
            for row, i in enumerate(chunk):
                p, n = len(encoded[i]), len(completions[i])
                if n == 0:
                    out[i] = Scored(np.zeros(0, np.float32), np.zeros((0, k), np.int32),
                                    np.zeros((0, k), np.float32))
                    continue
                logprobs = torch.log_softmax(logits[row, p - 1:p - 1 + n].float(), dim=-1)
                target = ids[row, p:p + n]
                values, top = logprobs.topk(k, dim=-1)
                out[i] = Scored(logprobs.gather(1, target[:, None]).squeeze(1).numpy(),
                                top.to(torch.int32).numpy(), values.numpy())
        self.stats["engine_s"] += time.perf_counter() - t0
        return out


def _build(cfg, cache=None, cache_seed=None) -> HFBackend:
    g = cfg.generate
    return HFBackend(g.model, dtype=g.dtype, chat_template=g.chat_template)


def _eval_teacher(cfg, cache=None) -> HFBackend:
    """Eval loads the teacher in eval.dtype."""
    return HFBackend(cfg.generate.model, cfg.eval.dtype, cfg.generate.chat_template)


BACKENDS.register(BackendKind("hf", _build, reads=frozenset({"dtype"}),
                              eval_teacher=_eval_teacher, scores=True))
