"""What every generation backend shares: the protocol, its data types, and the batch loop.

A backend turns a batch of prompts into generations, each with per-token top-k
log-probabilities when asked for them. The same backends run the teacher in the generate stage
and every system (teacher, base and distilled students) in the eval stage.
"""

from __future__ import annotations

import dataclasses
import hashlib
import traceback
from dataclasses import dataclass, field
from typing import Callable, NamedTuple, Protocol

import numpy as np

from pipeline.models import tokens_within
from pipeline.secrets import scrub

LOGPROB_SOURCE = "raw_logits"  # log_softmax of the logits before temperature / top-p


class NotJSONAnswer(Exception):
    """A 2xx answer whose body is not the JSON the endpoint promises (a proxy's or a
    gateway's HTML page, say): transient, like a 5xx."""


class TeacherUnavailable(RuntimeError):
    """The teacher cannot answer any request (a rejected key, a missing model): the stage
    stops at once instead of recording the same error on every row."""


class BudgetReached(TeacherUnavailable):
    """The next request could pass `generate.budget` (or `budget_tokens`): the stage stops,
    keeping every response received (they are in the request cache)."""


@dataclass
class Generation:
    """One sampled continuation; arrays have one entry per generated token."""

    text: str
    finish_reason: str                 # "stop" (eos or stop string) or "length"
    token_ids: np.ndarray              # int32 [T]
    token_logprobs: np.ndarray         # float32 [T]
    topk_ids: np.ndarray               # int32 [T, k]
    topk_logprobs: np.ndarray          # float32 [T, k]


class Scored(NamedTuple):
    """A model's log-probabilities over a given continuation (`score`): per token, its own
    log-probability and the model's top k."""

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
    # one seed per prompt of the call (the rounds after the first: a request's seed comes from
    # its question and sample index, so it is the same whatever shard or batch it falls in);
    # None: every prompt derives its seed from `seed`
    seeds: list[int] | None = None

    def seed_of(self, index: int) -> int:
        """The seed of prompt `index` of the call."""
        if self.seeds is not None:
            return self.seeds[index] % 2**31
        return (self.seed + index * self.n) % 2**31


def greedy(max_new_tokens: int, stop: list[str]) -> SamplingSettings:
    """One greedy answer per prompt, without log-probabilities (what eval asks for)."""
    return SamplingSettings(n=1, temperature=0.0, top_p=1.0, max_new_tokens=max_new_tokens,
                            top_k=0, seed=0, stop=list(stop))


class Backend(Protocol):
    """A model that generates (one of the kinds registered in `BACKENDS`, see `BackendKind`).

    Optional parts (`Extras` reads them, with their defaults): `whole_shards`, `stats`,
    `kd_check`, `usage`, `tokenizer`, `render`; besides them `startup_s`, `close()`, and
    `score(prompts, completions, k)` (-> `Scored` per prompt: the model's top-k over given
    token ids, by a forward pass; local engines only).
    """

    name: str

    def facts(self) -> dict:
        """Self-describing facts for the manifest: model, revision, tokenizer, vocab size."""

    def generate(self, prompts: list[str], settings: SamplingSettings
                 ) -> list[list[Generation] | Exception]:
        """`settings.n` generations for every prompt, in prompt order; a prompt that cannot be
        generated gives its error instead (the others are still answered)."""


def _as_is(prompt: str) -> str:
    return prompt


@dataclass
class Extras:
    """A backend's optional parts, declared here with what a backend without one means; the
    dicts are the backend's own, so they show its counts as they grow.

    whole_shards: the engine schedules requests itself and wants a whole shard at once.
    stats: running counters (`engine_s`; an API backend's `requests`, `retries`, `cache_hits`).
    kd_check: per-token id checks of an API backend's answers (`kd_*` counters of a shard).
    usage: the backend's own ledger (prompt and completion tokens, `cost`, ...): an API backend
        counts what the server billed; None: the stage counts tokens and engine time itself.
    tokenizer, render: how a local engine's prompts are tokenized (its prompt tokens).
    """

    whole_shards: bool = False
    stats: dict = field(default_factory=dict)
    kd_check: dict = field(default_factory=dict)
    usage: dict | None = None
    tokenizer: object = None
    render: Callable[[str], str] = _as_is

    @classmethod
    def of(cls, backend) -> "Extras":
        return cls(**{f.name: getattr(backend, f.name) for f in dataclasses.fields(cls)
                      if getattr(backend, f.name, None) is not None})


def _no_checks(g, errors: list[str]) -> None:
    """A backend with no rules between the generate settings it reads."""


def _no_spec(cfg) -> dict:
    return {}


@dataclass(frozen=True)
class BackendKind:
    """What the stages need to know of a kind of teacher backend, declared by its own file
    (`BACKENDS.register(BackendKind(...))`): how to build it and what it can do. No stage asks
    for a backend by its name.

    name (`str`): the value of `generate.backend`.
    build: `build(cfg, cache, cache_seed)` -> the `Backend` for the run's config `cfg`;
        `cache`: the SQLite request cache for a kind with `request_cache` (`cache_seed`: a
        read-only cache consulted after it).
    reads (`frozenset[str]`): the generate settings declared `IF_READ` that this kind reads
        (they enter the generate fingerprint only when it is chosen); those of its own
        `settings` are added to them.
    settings (`type | None`): a dataclass of the generate settings only this kind reads
        (`opt` fields, each `IF_READ` or `NEVER`, and an optional `check_settings(self,
        errors)` run on the whole generate section), declared once in its file and joined
        into the generate section (`generate.<name>` in a config).
    sections (`tuple[str, ...]`): whole config sections it reads (and fingerprints), e.g. `vllm`.
    request_cache (`bool`): its requests are paid for: each is kept in a request cache, so a
        rerun never pays twice (a cache per worker when workers are apart, merged at the end).
    check: `check(generate_config, errors)` appends what is wrong between the settings it reads.
    eval_teacher: `eval_teacher(cfg, cache)` -> the backend that scores the teacher in eval.
    eval_spec: `eval_spec(cfg)` -> what, besides the model and the prompt, decides the
        teacher's eval answers (so a change redoes the teacher's eval alone).
    student_engine: `student_engine(cfg, model, lora_rank, merge)` -> an engine that also
        scores the run's students (base and LoRA adapters, `use_adapter`; `merge(adapter_dir,
        out_dir)` saves the student with an adapter merged in, for an engine that serves it
        so), or None to score them with transformers.
    scores (`bool`): its backend has `score` (the teacher's top-k over a student's trace by a
        forward pass, for `distill iterate`); API teachers cannot.
    """

    name: str
    build: Callable
    reads: frozenset = frozenset()
    settings: type | None = None
    sections: tuple = ()
    request_cache: bool = False
    check: Callable = _no_checks
    eval_teacher: Callable | None = None
    eval_spec: Callable = _no_spec
    student_engine: Callable | None = None
    scores: bool = False

    def __post_init__(self):
        if self.settings is None:
            return
        from pipeline.config import IF_READ, NEVER

        rules = {f.name: f.metadata.get("fingerprint") for f in dataclasses.fields(self.settings)}
        wrong = sorted(n for n, rule in rules.items() if rule not in (IF_READ, NEVER))
        if wrong:  # a backend's own setting must not change what another backend makes
            raise TypeError(f"backend {self.name}: its settings {wrong} must be declared "
                            "fingerprint=IF_READ (they decide what it makes) or NEVER")
        object.__setattr__(self, "reads", frozenset(self.reads) | {
            n for n, rule in rules.items() if rule == IF_READ})

    def teacher_for_eval(self, cfg, cache) -> "Backend":
        """The backend that scores the teacher in eval (by default: the one that generated)."""
        if self.eval_teacher is not None:
            return self.eval_teacher(cfg, cache)
        return self.build(cfg, cache, None)


Outcome = list[Generation] | str  # a prompt's generations, or why it has none


def generate_in_batches(backend: Backend, prompts: list[str], settings: SamplingSettings,
                        per_batch: int, seed_of: Callable[[int], int] | None = None,
                        on_batch: Callable[[list[Outcome]], None] | None = None,
                        prompt_seeds: list[int] | None = None) -> list[Outcome]:
    """Every prompt through `backend`, `per_batch` at a time, in order.

    A batch that raises is retried prompt by prompt, so one bad row does not sink the others;
    a prompt that fails for good gives its error as a string. A teacher that cannot answer
    at all (`TeacherUnavailable`) or an OSError of this machine (a full disk) stops the loop.
    `seed_of(b)` is batch b's
    sampling seed (default: `settings.seed`); `prompt_seeds`: one seed per prompt instead
    (backends that seed a whole batch at once take a hash of the batch's seeds); `on_batch`
    sees each batch's outcomes.
    """
    out: list[Outcome] = []
    for b, start in enumerate(range(0, len(prompts), per_batch)):
        batch = prompts[start:start + per_batch]
        if prompt_seeds is not None:
            settings.seeds = list(prompt_seeds[start:start + per_batch])
            settings.seed = int.from_bytes(hashlib.sha256(
                repr(settings.seeds).encode()).digest()[:4], "little")
        elif seed_of is not None:
            settings.seed = seed_of(b)
        try:
            results = backend.generate(batch, settings)
        except (TeacherUnavailable, OSError):  # the teacher or this machine, not a row
            raise
        except Exception:
            results = []
            for i, prompt in enumerate(batch):
                try:
                    results.append(backend.generate([prompt], _alone(settings, i))[0])
                except (TeacherUnavailable, OSError):
                    raise
                except Exception as e:  # recorded on the row; the run goes on
                    results.append(scrub(f"{type(e).__name__}: {e}\n"
                                         f"{traceback.format_exc(limit=3)}"))
        outcomes = [r if isinstance(r, list) else scrub(str(r)) for r in results]
        out.extend(outcomes)
        if on_batch is not None:
            on_batch(outcomes)
    return out


def _alone(settings: SamplingSettings, index: int) -> SamplingSettings:
    """The settings for prompt `index` of a batch sent on its own (its own seed kept)."""
    if settings.seeds is None:
        return settings
    return dataclasses.replace(settings, seeds=[settings.seeds[index]])


def render_prompt(tokenizer, prompt: str, chat_template: bool) -> str:
    """The prompt as is, or as one user turn of the model's chat template."""
    if not chat_template:
        return prompt
    return tokenizer.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False,
                                         add_generation_prompt=True)


def cut_at_stop(tokenizer, ids: list[int], stop: list[str]) -> tuple[int, bool]:
    """How many of `ids` come wholly before the first stop string, and whether one was found."""
    if not stop:
        return len(ids), False
    text = tokenizer.decode(ids, skip_special_tokens=False)
    cut = min((i for i in (text.find(s) for s in stop) if i >= 0), default=-1)
    if cut < 0:
        return len(ids), False
    return tokens_within(tokenizer, ids, cut), True
