"""The generate section (`generate.*` in a config): the settings the generate stage reads,
joined with those each teacher backend declares for itself in its own file
(`BackendKind.settings`: the openai backend's server, retries, budget and batch settings), so
that a config holds them all under `generate:` and each is declared once."""

from __future__ import annotations

import dataclasses
import functools
from dataclasses import dataclass
from typing import ClassVar

from pipeline.config import EMBEDDED_MODEL, IF_READ, NEVER, Section, opt
from pipeline.registry import BACKENDS, EXECUTORS


@dataclass
class GenerateConfig(Section):
    """The generate stage's own settings; `joined()` adds the backends' to them (a subclass
    of this one, of the same name)."""

    NAME: ClassVar[str] = "generate"

    backend: str = opt("hf", "Teacher backend: `hf` (transformers `generate` on this machine), "
                       "`vllm` (the vLLM engine in this process; settings in the `vllm` "
                       "section) or `openai` (any OpenAI-compatible server); any other "
                       "backend file in stages/backends/ adds its name.", choices=BACKENDS)
    model: str = opt(EMBEDDED_MODEL, "Teacher: a local checkpoint folder, a hub id, or "
                     f"'{EMBEDDED_MODEL}' (the embedded default).")
    prompt_template: str = opt("data/prompts/arithmetic_cot.txt", "Few-shot chain-of-thought "
                               "prompt file; `{question}` marks where the question goes.")
    chat_template: bool = opt(False, "Wrap the prompt as one user turn of the model's chat "
                              "template.")
    n_samples: int = opt(1, "Traces sampled per row.", ge=1, le=64)
    temperature: float = opt(0.7, "Sampling temperature; 0 = greedy.", ge=0.0, le=5.0)
    top_p: float = opt(0.95, "Nucleus sampling mass.", gt=0.0, le=1.0)
    max_new_tokens: int = opt(160, "Tokens generated at most per trace.", ge=1, le=32768)
    stop: list[str] = opt(["\n\nQuestion:", "\nQuestion:"], "Strings that end a trace (cut "
                          "off with what follows).")
    top_k: int = opt(20, "Top-k log-probabilities kept per generated token.", ge=1, le=1000)
    seed: int = opt(0, "Sampling seed (each shard derives its own from it).", ge=0)
    batch_size: int = opt(64, "Prompts per forward batch.", ge=1, le=4096, fingerprint=NEVER)
    rows_per_shard: int = opt(64, "Task rows per output shard (the unit of resume).", ge=1)
    dtype: str = opt("bfloat16", "Teacher weights' dtype (log-probabilities are computed in "
                     "float32 from its logits).", choices=["bfloat16", "float32", "float16"],
                     fingerprint=IF_READ)
    max_failed_share: float = opt(0.05, "The stage stops (non-zero exit, no manifest) when more "
                                  "than this share of the rows ended with an error; the rows "
                                  "made are kept, and `--retry-failed` re-sends only the failed "
                                  "ones. 1 = never stop.", ge=0.0, le=1.0, fingerprint=NEVER)
    shard_format: int = opt(2, "How shards store the teacher's top-k: 2 = compact (ids packed, "
                            "log-probabilities quantised to 1/32 nat below the exact top-1; "
                            "about a third of the bytes, see pipeline/topk_codec.py), 1 = float32 "
                            "lists. Not part of the fingerprint: both formats read alike, and "
                            "`distill convert-shards` converts a run.", choices=[1, 2],
                            fingerprint=NEVER)
    max_samples: int = opt(0, "Adaptive sampling: the most samples any question may take over "
                           "all rounds; 0 = off (n_samples per question, one round). After the "
                           "first n_samples, every question with fewer kept traces than "
                           "wanted_per_question (by the filter's own checks) gets round_samples "
                           "more, round after round, until it has enough or another round would "
                           "pass this cap. Must be n_samples + a whole number of rounds.", ge=0,
                           le=4096, fingerprint=NEVER)
    round_samples: int | None = opt(None, "Adaptive sampling: samples per short question in each "
                                    "round after the first; null = n_samples.", ge=1, le=64,
                                    fingerprint=NEVER)
    wanted_per_question: int | None = opt(None, "Adaptive sampling: kept (distinct, correct) "
                                          "traces a question needs to leave the rounds; null = "
                                          "filter.max_per_question, or 1 when that is 0.",
                                          ge=1, le=64, fingerprint=NEVER)
    round_temperatures: list[float] = opt([], "Adaptive sampling: the temperature of rounds 2, "
                                          "3, ... (the last one repeats); empty = "
                                          "generate.temperature.", fingerprint=NEVER)
    hint_template: str | None = opt(None, "Rationalization (STaR): questions with a gold answer "
                                    "and still no kept trace after the rounds are asked once "
                                    "more with this prompt, which holds the answer (`{question}` "
                                    "and `{answer}`; shipped: data/prompts/*_hint.txt); their "
                                    "traces are stored with the plain question and marked "
                                    "hinted. null = off.", fingerprint=NEVER)
    hint_samples: int | None = opt(None, "Rationalization: samples per question in the hinted "
                                   "round; null = n_samples.", ge=1, le=64, fingerprint=NEVER)
    executor: str = opt("local", "How the generate shards are run: `local` (one after the other "
                        "in this process) or `ray` (`generate.workers` Ray actors, settings in "
                        "the `ray` section). Job arrays need no setting: see `--worker-index`.",
                        choices=EXECUTORS, fingerprint=NEVER)
    workers: int = opt(1, "Ray workers (actors) that take generate shards from one queue, each "
                       "with its own teacher.", ge=1, le=4096, fingerprint=NEVER)
    price_input: float = opt(0.0, "Cost ledger: the teacher's price per million prompt (input) "
                             "tokens, in your currency (e.g. 0.15); 0 = not priced.", ge=0.0,
                             fingerprint=NEVER)
    price_output: float = opt(0.0, "Cost ledger: the price per million completion (output) "
                              "tokens.", ge=0.0, fingerprint=NEVER)
    batch_discount: float = opt(0.5, "Cost ledger: the price factor of requests sent through a "
                                "batch API (the OpenAI Batch API: 0.5, half the price).", gt=0.0,
                                le=1.0, fingerprint=NEVER)
    price_hour: float = opt(0.0, "Cost ledger, local engines (hf, vllm): the price of an hour "
                            "of the engine generating (a GPU-hour); 0 = not priced.", ge=0.0,
                            fingerprint=NEVER)
    pilot_questions: int = opt(0, "`distill generate --estimate`: questions of the first shard "
                               "sent as a pilot to measure completion lengths and the filter's "
                               "acceptance (their responses are cached: the run reuses them, "
                               "never paid twice); 0 = the estimate sends no request.", ge=0,
                               le=4096, fingerprint=NEVER)

    @classmethod
    def joined(cls) -> type:
        """The whole generate section: these fields, then the settings of every registered
        backend that declares some (`BackendKind.settings`)."""
        return _joined(cls, tuple(k.settings for k in BACKENDS if k.settings is not None))

    def _check(self, errors: list[str]) -> None:
        # what each backend declares is checked by its own settings (whatever the backend
        # chosen: a key pasted as a variable's name is refused for every backend), then the
        # chosen backend checks what it reads (an API's top-k limit, its endpoints)
        for part in type(self).__mro__:
            if "check_settings" in vars(part):
                part.check_settings(self, errors)
        BACKENDS.get(self.backend).check(self, errors)
        if self.max_samples:
            step = self.round_samples or self.n_samples
            if self.max_samples < self.n_samples:
                errors.append(f"generate.max_samples={self.max_samples} is below "
                              f"generate.n_samples={self.n_samples}: the first round alone "
                              "takes n_samples (0 turns adaptive sampling off)")
            elif (self.max_samples - self.n_samples) % step:
                low = self.max_samples - (self.max_samples - self.n_samples) % step
                errors.append(f"generate.max_samples={self.max_samples} is not n_samples "
                              f"({self.n_samples}) + a whole number of rounds of "
                              f"{step} (generate.round_samples): use {low} or {low + step}")
        for t in self.round_temperatures:
            if not 0.0 <= t <= 5.0:
                errors.append(f"generate.round_temperatures: {t} is outside [0, 5]")
        if self.hint_template is not None and "{answer}" not in _template_text(
                self.hint_template, errors):
            errors.append(f"generate.hint_template: {self.hint_template} has no {{answer}} "
                          "placeholder (a hint prompt shows the gold answer)")

    def __reduce__(self):
        # the joined class is made at run time: a copy (pickle, deepcopy) is rebuilt by name
        return _rebuilt, ({f.name: getattr(self, f.name) for f in dataclasses.fields(self)},)


@functools.cache
def _joined(core: type, parts: tuple[type, ...]) -> type:
    joined = type("GenerateConfig", (*reversed(parts), core),
                  {"__module__": __name__, "__qualname__": "GenerateConfig"})
    return dataclass(joined)


def _rebuilt(values: dict) -> Section:
    return GenerateConfig.joined()(**values)


def _template_text(path: str, errors: list[str]) -> str:
    """A prompt file's text ("{answer}" when it cannot be read: its reader says why)."""
    from pipeline.shipped import shipped

    try:
        return shipped(path).read_text()
    except OSError:
        errors.append(f"generate.hint_template: {path} cannot be read; the shipped ones are "
                      "data/prompts/*_hint.txt")
        return "{answer}"
