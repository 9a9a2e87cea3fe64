"""Run configuration: one YAML file per run, a section per stage, `key=value` overrides.

Every field carries its help text and its allowed range. A section checks itself when it is
built, in code as from a file: its types, ranges and the rules between its fields, raising one
`ConfigError` that lists every problem at once; `load_config` also reports unknown keys and the
problems of every section together.
"""

from __future__ import annotations

import copy
import dataclasses
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import yaml

from pipeline.registry import (ANSWER_KINDS, BACKENDS, EXECUTORS, EXTRACTORS, Registry,
                               did_you_mean)


class ConfigError(ValueError):
    """All the problems found in a configuration, reported together."""

    def __init__(self, errors: list[str], source: str | None = None):
        self.errors = list(errors)
        where = f" in {source}" if source else ""
        lines = "\n".join(f"  - {e}" for e in self.errors)
        super().__init__(f"{len(self.errors)} problem(s){where}:\n{lines}")


# How a setting enters its stage's fingerprint (`opt(..., fingerprint=...)`), said where the
# setting is declared; `fingerprinted` applies the rule for every stage.
ALWAYS = "always"                # it decides what the stage makes
NEVER = "never"                  # it changes how the stage runs (speed, retries, where), not what
UNLESS_DEFAULT = "unless default"  # a piece added after runs existed: at its default (off) it
                                 # leaves every fingerprint as it was
IF_READ = "if read"              # read by some backends only: counts when the chosen one reads it


def with_(switch: str) -> str:
    """The rule of a knob of a piece: it counts only while the setting `switch` is not at its
    default (a KD temperature decides nothing while KD is off)."""
    return f"with {switch}"


def opt(default: Any, help: str, *, choices: "list | Registry | None" = None,
        ge: float | None = None, le: float | None = None, gt: float | None = None,
        lt: float | None = None, fingerprint: str = ALWAYS):
    """A config field with its help text, its range and its part in the stage's fingerprint
    (`ALWAYS`, `NEVER`, `UNLESS_DEFAULT`, `IF_READ` or `with_(switch)`). `choices` may be a
    registry: its members' names. Lists and dicts are copied per instance."""
    meta = {"help": help, "choices": choices, "ge": ge, "le": le, "gt": gt, "lt": lt,
            "fingerprint": fingerprint}
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda: type(default)(default), metadata=meta)
    return field(default=default, metadata=meta)


EMBEDDED_MODEL = "smollm2-135m-instruct"


class Section:
    """A config section: every field is type- and range-checked when the object is built (in
    code as well as by `load_config`), then `_check` applies the rules between its fields."""

    NAME: ClassVar[str] = ""

    def __post_init__(self) -> None:
        errors: list[str] = []
        hints = typing.get_type_hints(type(self))
        for f in dataclasses.fields(self):
            where = f"{self.NAME}.{f.name}"
            n_before = len(errors)
            value = _coerce(getattr(self, f.name), hints[f.name], where, errors)
            if len(errors) == n_before:
                setattr(self, f.name, value)
                _check_range(value, f.metadata, where, errors)
        if not errors:  # rules between fields assume the fields themselves are well formed
            self._check(errors)
        if errors:
            raise ConfigError(errors)

    def _check(self, errors: list[str]) -> None:
        """Append a line to `errors` for every rule between fields that is broken."""


@dataclass
class TaskConfig(Section):
    NAME: ClassVar[str] = "task"

    kind: str = opt("demo", "Where task rows come from: the built-in arithmetic generator, a "
                    "GSM8K-format file or hub dataset, or any file / hub dataset with a field "
                    "mapping.", choices=["demo", "gsm8k", "file", "hub"])
    n_train: int | None = opt(1000, "Train rows to use (demo: rows to generate); null = all.", ge=1)
    n_test: int | None = opt(200, "Held-out rows to use (demo: rows to generate); null = all.",
                             ge=1)
    seed: int = opt(0, "Seed of the demo generator.", ge=0)
    step_weights: list[float] = opt([1.0, 1.0, 1.0], "Demo: relative frequency of problems with "
                                    "1, 2 and 3 arithmetic steps (one to three numbers).")
    max_number: int = opt(40, "Demo: the largest starting number (added numbers go up to half "
                          "of it).", ge=3, le=10000)
    operations: list[str] = opt(["add", "subtract", "multiply"], "Demo: the operations used.")
    train_path: str | None = opt(None, "gsm8k/file: the train file (JSONL, JSON or Parquet).")
    test_path: str | None = opt(None, "gsm8k/file: the held-out file (JSONL, JSON or Parquet).")
    dataset: str | None = opt(None, "hub: the dataset id (needs network to the hub).")
    dataset_config: str | None = opt(None, "hub: the dataset configuration name.")
    train_split: str = opt("train", "hub: the train split.")
    test_split: str = opt("test", "hub: the held-out split.")
    question: str = opt("{question}", "file/hub: the question, as a template over the row's "
                        "fields, e.g. '{premise} Hypothesis: {hypothesis}'.")
    answer_field: str = opt("answer", "file/hub: the field holding the gold answer.")
    answer_type: str = opt("numeric", "file/hub: what the answers are: `numeric` (numbers, with "
                           "a tolerance), `math` (LaTeX / symbolic, via math-verify), `choice` "
                           "(a multiple-choice letter or the option's text), `label` (one of "
                           "task.labels), `string` (normalised text).",
                           choices=ANSWER_KINDS)
    labels: list[str] = opt(["entailment", "neutral", "contradiction"], "answer_type=label: the "
                            "class labels (e-SNLI / ANLI by default).")
    id_field: str | None = opt(None, "file/hub: a field with a stable row id (default: position).")
    validation_share: float = opt(0.0, "Share of the training questions cut out as the "
                                  "validation split (chosen by a hash of each row's id, never "
                                  "generated for or trained on): what `distill iterate`'s "
                                  "until_flat and any choice made on data are judged on, so "
                                  "the held-out split is never used to choose. 0 = none.",
                                  ge=0.0, lt=1.0, fingerprint=UNLESS_DEFAULT)

    def _check(self, errors: list[str]) -> None:
        if self.answer_type == "label" and len(set(self.labels)) < 2:
            errors.append("task.labels: give at least two distinct labels for answer_type=label")
        if self.kind == "demo":
            w = self.step_weights
            if not 1 <= len(w) <= 3 or any(x < 0 for x in w) or sum(w) <= 0:
                errors.append(f"task.step_weights: {w!r} must hold 1 to 3 non-negative weights "
                              "(for 1, 2 and 3 steps) with a positive sum")
            for op in self.operations:
                if op not in ("add", "subtract", "multiply"):
                    errors.append(f"task.operations: unknown operation '{op}'; "
                                  f"{did_you_mean(op, ['add', 'subtract', 'multiply'])}")
            if self.n_train is None or self.n_test is None:
                errors.append("task.n_train and task.n_test must be numbers for the demo task")
        elif self.kind in ("gsm8k", "file"):
            if not self.train_path and not self.test_path:
                errors.append(f"task.kind={self.kind} needs task.train_path and/or "
                              "task.test_path")
        elif self.kind == "hub" and not self.dataset:
            errors.append("task.kind=hub needs task.dataset (a hub dataset id)")


def _looks_like_a_variable_name(name: str | None) -> bool:
    """True for an environment variable's name (`OPENAI_API_KEY`); False for what looks like
    a secret: other characters (`sk-...`), or 20 and more letters and digits without an
    underscore."""
    if not name:
        return True  # no key at all (a local server)
    if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]{0,63}", name):
        return False
    return not (len(name) >= 20 and "_" not in name and re.search(r"\d", name))


@dataclass
class GenerateConfig(Section):
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
    endpoint: str = opt("chat", "openai: `chat` (the prompt is one user message; the server "
                        "applies the chat template) or `completions` (the prompt is sent as "
                        "is, like the hf and vllm backends without chat_template).",
                        choices=["chat", "completions"], fingerprint=IF_READ)
    base_url: str | None = opt(None, "openai: the server's base URL, e.g. "
                               "http://127.0.0.1:8000/v1 (null = the OpenAI API).",
                               fingerprint=IF_READ)
    api_key_env: str = opt("OPENAI_API_KEY", "openai: the environment variable holding the API "
                           "key (the key itself is never written anywhere).", fingerprint=NEVER)
    concurrency: int = opt(16, "openai: requests in flight at once.", ge=1, le=4096,
                           fingerprint=NEVER)
    max_retries: int = opt(6, "openai: retries of a request on 429, 5xx, timeouts, dropped "
                           "connections and malformed bodies.", ge=0, le=100, fingerprint=NEVER)
    request_timeout: float = opt(120.0, "openai: seconds before a request times out.", gt=0.0,
                                 fingerprint=NEVER)
    backoff_max: float = opt(30.0, "openai: the longest wait between retries, in seconds.",
                             gt=0.0, fingerprint=NEVER)
    server_token_ids: bool = opt(False, "openai: ask the server for token ids "
                                 "(vLLM's `return_tokens_as_token_ids`).", fingerprint=IF_READ)
    tokenizer: str | None = opt(None, "openai: the teacher's tokenizer (folder or hub id), to "
                                "map token strings to ids when the server cannot send ids.",
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
    budget: float = opt(0.0, "openai: the most the run's teacher requests may cost, at "
                        "price_input/price_output (every response in the run's request cache "
                        "counts: all rounds, earlier settings). The stage stops before a request "
                        "could pass it, keeping all it has; raise it and rerun to go on. "
                        "0 = no cap.", ge=0.0, fingerprint=NEVER)
    budget_tokens: int = opt(0, "openai: the same cap in tokens (prompt + completion); "
                             "0 = no cap.", ge=0, fingerprint=NEVER)
    transport: str = opt("live", "openai: `live` (requests sent one by one, `concurrency` in "
                         "flight) or `batch` (each shard's requests as one job of the "
                         "provider's batch API: the OpenAI Batch API costs half, answers within "
                         "batch_window).", choices=["live", "batch"],
                         fingerprint=NEVER)
    batch_window: str = opt("24h", "openai, transport=batch: the batch's completion window (the "
                            "OpenAI Batch API accepts 24h).", fingerprint=NEVER)
    batch_poll_seconds: float = opt(30.0, "openai, transport=batch: seconds between two looks at "
                                    "a running batch.", gt=0.0, fingerprint=NEVER)
    pilot_questions: int = opt(0, "`distill generate --estimate`: questions of the first shard "
                               "sent as a pilot to measure completion lengths and the filter's "
                               "acceptance (their responses are cached: the run reuses them, "
                               "never paid twice); 0 = the estimate sends no request.", ge=0,
                               le=4096, fingerprint=NEVER)

    def _check(self, errors: list[str]) -> None:
        if not _looks_like_a_variable_name(self.api_key_env):
            # never echoed: a secret pasted where its variable's name belongs
            errors.append("generate.api_key_env: give the name of the environment variable "
                          "that holds the API key (letters, digits and _, such as "
                          "OPENAI_API_KEY), never the key itself; the value given does not "
                          "look like a variable name, so it is not shown and nothing was "
                          "written")
        # the chosen backend checks what it reads (an API's top-k limit, its endpoints)
        BACKENDS.get(self.backend).check(self, errors)
        api = BACKENDS.get(self.backend).request_cache
        for name, on in (("budget", self.budget), ("budget_tokens", self.budget_tokens),
                         ("transport", self.transport == "batch")):
            if on and not api:
                errors.append(f"generate.{name}: applies to an API teacher (generate.backend="
                              f"openai), not to the {self.backend} backend; a local engine's "
                              "tokens and engine-seconds are recorded in the ledger anyway")
        if self.budget and not (self.price_input or self.price_output):
            errors.append(f"generate.budget={self.budget:g} needs prices: set "
                          "generate.price_input and generate.price_output (per million "
                          "tokens), or cap tokens with generate.budget_tokens")
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


def _template_text(path: str, errors: list[str]) -> str:
    """A prompt file's text ("{answer}" when it cannot be read: its reader says why)."""
    from pipeline.shipped import shipped

    try:
        return shipped(path).read_text()
    except OSError:
        errors.append(f"generate.hint_template: {path} cannot be read; the shipped ones are "
                      "data/prompts/*_hint.txt")
        return "{answer}"


@dataclass
class VLLMConfig(Section):
    NAME: ClassVar[str] = "vllm"

    dtype: str | None = opt(None, "Engine dtype; null = generate.dtype.",
                            choices=["auto", "bfloat16", "float16", "float32"])
    max_model_len: int | None = opt(None, "Context length (prompt + generation); null = the "
                                    "model's. Longer prompts are recorded as errors on their "
                                    "row.", ge=16)
    tensor_parallel_size: int = opt(1, "GPUs the model is split over.", ge=1, fingerprint=NEVER)
    gpu_memory_utilization: float = opt(0.9, "Share of each GPU's memory the engine may take.",
                                        gt=0.0, le=1.0, fingerprint=NEVER)
    seed: int = opt(0, "Engine seed (every request also carries its own seed, derived from "
                    "generate.seed).", ge=0)
    enforce_eager: bool = opt(True, "Skip torch.compile / CUDA graphs: faster start-up (on a CPU "
                              "compiling costs minutes at every start), slower steps on a GPU.",
                              fingerprint=NEVER)
    max_num_seqs: int | None = opt(None, "Sequences in flight at most; null = vLLM's default.",
                                   ge=1, fingerprint=NEVER)
    logprobs_mode: str = opt("raw_logprobs", "Where top-k log-probabilities come from: "
                             "`raw_logprobs` (log-softmax of the logits before temperature / "
                             "top-p, what KD wants) or `processed_logprobs` (after them).",
                             choices=["raw_logprobs", "processed_logprobs"])
    in_process: bool | None = opt(None, "Run the engine core in this process (vLLM's "
                                  "VLLM_ENABLE_V1_MULTIPROCESSING=0); null = on a CPU only, "
                                  "where it starts sooner at the same speed.", fingerprint=NEVER)
    cpu_kvcache_gb: int = opt(4, "CPU only: GiB reserved for the KV cache "
                              "(VLLM_CPU_KVCACHE_SPACE).", ge=1, fingerprint=NEVER)
    cpu_threads: str = opt("all", "CPU only: the cores the engine binds its threads to "
                           "(VLLM_CPU_OMP_THREADS_BIND, e.g. '0-7'); `all` = every core this "
                           "process may use (vLLM's own default uses fewer).", fingerprint=NEVER)


@dataclass
class RayConfig(Section):
    NAME: ClassVar[str] = "ray"

    address: str = opt("", "The Ray cluster: empty = start a local one for this command (and "
                       "stop it after); `auto` = the cluster this machine belongs to (`ray "
                       "start`); or an address such as ray://head:10001.")
    num_cpus_per_worker: float = opt(1.0, "CPUs each worker asks Ray for (torch in a worker "
                                     "uses as many threads).", gt=0.0)
    num_gpus_per_worker: float = opt(0.0, "GPUs each worker asks Ray for (1 for a vLLM or "
                                     "transformers teacher on a GPU node; fractions share one).",
                                     ge=0.0)
    max_retries: int = opt(3, "Times a shard is tried again after its worker failed or died "
                           "(a dead worker is replaced); then it is given up, the other shards "
                           "are still made, and the stage ends with its error.", ge=0, le=100)
    local_cpus: int | None = opt(None, "CPUs of the local cluster started when `address` is "
                                 "empty; null = this machine's.", ge=1)


@dataclass
class FilterConfig(Section):
    NAME: ClassVar[str] = "filter"

    extractors: list[str] | None = opt(None, "Where the final answer is read, tried in order (the "
                                       "first match wins): answer_is, hash, boxed, "
                                       "answer_colon, last_number, last_letter, last_line; null "
                                       "= the answer type's default order.")
    require_answer_marker: bool = opt(True, "Drop traces with no explicit final-answer marker "
                                      "('The answer is', '####', \\boxed, 'Answer:'); a "
                                      "distilled student's traces (distill iterate) are exempt: "
                                      "its explain: mode writes the rationale alone.")
    tolerance: float = opt(1e-6, "Relative tolerance when comparing numeric answers.", ge=0.0)
    check_arithmetic: bool = opt(True, "Drop traces whose written arithmetic is wrong "
                                 "(`a op b = c` in the text, GSM8K's <<a*b=c>>), even with a "
                                 "right final answer.")
    min_steps: int = opt(1, "Reasoning steps required (numbered lines, 'Step N', sentences or "
                         "lines that carry a calculation).", ge=0)
    min_tokens: int = opt(4, "Fewest generated tokens in a kept trace.", ge=0)
    max_tokens: int | None = opt(None, "Most generated tokens in a kept trace; null = no bound "
                                 "beyond generate.max_new_tokens (a trace that hits it is "
                                 "truncated, and dropped as such).", ge=1)
    min_words: int = opt(0, "Fewest words in a kept trace.", ge=0)
    max_words: int = opt(1000, "Most words in a kept trace.", ge=1)
    drop_truncated: bool = opt(True, "Drop traces cut off by the length limit.")
    repeat_ngram: int = opt(4, "n of the word n-grams that measure repetition.", ge=1, le=16)
    max_repeat_share: float = opt(0.5, "Drop traces whose share of repeated word n-grams is "
                                  "above this (a looping trace); 1 = never.", ge=0.0, le=1.0)
    dedup: str = opt("near", "Duplicate rationales for the same question: `near` (identical "
                     "after normalising, or word-sequence similarity >= near_duplicate), "
                     "`exact` (identical after normalising), `off`.",
                     choices=["near", "exact", "off"])
    near_duplicate: float = opt(0.9, "Word-sequence similarity (difflib ratio: 2 x matching "
                                "words / all words) from which two rationales of a question "
                                "count as duplicates.", gt=0.0, le=1.0)
    max_per_question: int = opt(0, "Most traces kept per question (the first samples); 0 = no "
                                "cap.", ge=0)
    min_agreement: float = opt(0.5, "Rows without a gold answer: the majority answer of their "
                               "samples is the pseudo-gold when at least this share of the "
                               "samples give it.", gt=0.0, le=1.0)
    min_votes: int = opt(2, "Rows without a gold answer: samples that must give the majority "
                         "answer.", ge=1)
    plot: bool = opt(True, "Also draw the funnel as funnel.png.", fingerprint=NEVER)
    executor: str = opt("local", "How the filter shards are run: `local` (one after the other "
                        "in this process) or `ray` (`filter.workers` Ray actors, settings in "
                        "the `ray` section). Job arrays need no setting: see `--worker-index`.",
                        choices=EXECUTORS, fingerprint=NEVER)
    workers: int = opt(1, "Ray workers (actors) that take filter shards from one queue.",
                       ge=1, le=4096, fingerprint=NEVER)

    def _check(self, errors: list[str]) -> None:
        for name in self.extractors or []:
            if name not in EXTRACTORS.names():
                errors.append(f"filter.extractors: unknown extractor '{name}'; "
                              f"{did_you_mean(name, sorted(EXTRACTORS.names()))}")
        if self.extractors is not None and not self.extractors:
            errors.append("filter.extractors: give at least one extractor, or null for the "
                          "answer type's default order")
        if self.min_words > self.max_words:
            errors.append(f"filter.min_words ({self.min_words}) is above filter.max_words "
                          f"({self.max_words})")
        if self.max_tokens is not None and self.min_tokens > self.max_tokens:
            errors.append(f"filter.min_tokens ({self.min_tokens}) is above filter.max_tokens "
                          f"({self.max_tokens})")


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


@dataclass
class EvalConfig(Section):
    NAME: ClassVar[str] = "eval"

    systems: list[str] = opt(["teacher", "base", "predict", "explain"], "What to evaluate: the "
                             "teacher (few-shot CoT), the base student (predict:), the distilled "
                             "student in predict: and explain: modes.")
    variants: list[str] | None = opt(None, "Trained students to score (train.name values; '' "
                                     "is the run's train/ folder); null = every finished one.")
    n: int | None = opt(200, "Held-out rows to evaluate; null = all.", ge=1)
    split: str = opt("test", "The rows scored: `test` (the held-out split, into eval/) or "
                     "`validation` (task.validation_share of the training questions, into "
                     "eval-validation/: what to choose settings on).",
                     choices=["test", "validation"])
    batch_size: int = opt(64, "Prompts per generation batch.", ge=1)
    max_new_tokens: int = opt(160, "Generation budget in the reasoning modes (teacher, "
                              "explain:).", ge=1)
    predict_max_new_tokens: int = opt(16, "Generation budget in predict: mode.", ge=1)
    dtype: str = opt("bfloat16", "Weights' dtype at evaluation.",
                     choices=["bfloat16", "float32", "float16"])
    vote_samples: int = opt(0, "Self-consistency (Wang et al. 2023): also score the systems of "
                            "eval.vote_systems by a majority vote over this many sampled "
                            "answers (maj@k, next to greedy; tokens counted for all k); 0 = off.",
                            ge=0, le=64)
    vote_systems: list[str] = opt(["explain", "teacher"], "The reasoning systems scored by "
                                  "majority vote when eval.vote_samples > 0 (explain, teacher).")
    vote_temperature: float = opt(0.7, "Sampling temperature of the voted answers.", gt=0.0,
                                  le=5.0)

    def _check(self, errors: list[str]) -> None:
        for name in self.vote_systems:
            if name not in ("explain", "teacher"):
                errors.append(f"eval.vote_systems: '{name}' cannot vote (a vote is over "
                              "reasoning chains); use explain and/or teacher")
        for name in self.systems:
            if name not in VALID_SYSTEMS:
                errors.append(f"eval.systems: unknown system '{name}'; "
                              f"{did_you_mean(name, VALID_SYSTEMS)}")


@dataclass
class IterateConfig(Section):
    """`distill iterate`: the distilled student samples the training questions again (ReST-EM,
    Singh et al. 2023; STaR, Zelikman et al. 2022), the filter pools its kept traces with the
    teacher's, and the next student trains from the base model on the pool."""

    NAME: ClassVar[str] = "iterate"

    rounds: int = opt(3, "Rounds in all: round 1 is the teacher's pipeline, each later round "
                      "samples with the student of the round before.", ge=1, le=20)
    samples: int = opt(4, "Samples the student draws per question it samples.", ge=1, le=64)
    temperatures: list[float] = opt([0.7], "The student's sampling temperature in rounds 2, 3, "
                                    "...; the last one repeats.")
    covered_share: float = opt(0.0, "Share of the questions that already have enough kept "
                               "traces that the student samples too (for diverse paths; chosen "
                               "by a hash of the question and round).", ge=0.0, le=1.0)
    max_new_tokens: int | None = opt(None, "Tokens the student generates at most per trace; "
                                     "null = eval.max_new_tokens.", ge=1)
    teacher_scores: bool = opt(True, "The teacher scores the student's traces with a forward "
                               "pass: their stored top-k are the teacher's at every position, so "
                               "top-k KD learns from them (off by itself for API teachers).")
    until_flat: bool = opt(True, "Stop before rounds when a round raised neither question "
                           "coverage nor the explain: held-out accuracy.")
    batch_size: int = opt(32, "Prompts per batch of the student's sampling and the teacher's "
                          "scoring.", ge=1, fingerprint=NEVER)

    def _check(self, errors: list[str]) -> None:
        if not self.temperatures or any(not 0 < t <= 5 for t in self.temperatures):
            errors.append("iterate.temperatures: give one or more temperatures in (0, 5], "
                          "e.g. [0.7]")


def fingerprinted(section: Section, reads: frozenset[str] | set[str] = frozenset()) -> dict:
    """The settings of `section` that decide what its stage makes, by each field's declared
    rule (`opt(..., fingerprint=...)`): `NEVER` ones left out, `UNLESS_DEFAULT` ones left out
    at their default, knobs (`with_(switch)`) left out while their switch is at its default,
    `IF_READ` ones kept when they are in `reads` (what the chosen backend reads)."""
    fields = {f.name: f for f in dataclasses.fields(section)}

    def at_default(name: str) -> bool:
        f = fields[name]
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        return getattr(section, name) == default

    out = {}
    for name, f in fields.items():
        rule = f.metadata.get("fingerprint", ALWAYS)
        if (rule == NEVER or rule == UNLESS_DEFAULT and at_default(name)
                or rule == IF_READ and name not in reads
                or rule.startswith("with ") and at_default(rule[len("with "):])):
            continue
        out[name] = copy.deepcopy(getattr(section, name))
    return out


def answer_kind(task: "TaskConfig") -> str:
    """How answers of this task are read and compared (see stages.checks.answers)."""
    return "numeric" if task.kind in ("demo", "gsm8k") else task.answer_type


@dataclass
class Config:
    task: TaskConfig = field(default_factory=TaskConfig)
    generate: GenerateConfig = field(default_factory=GenerateConfig)
    vllm: VLLMConfig = field(default_factory=VLLMConfig)
    filter: FilterConfig = field(default_factory=FilterConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    ray: RayConfig = field(default_factory=RayConfig)
    iterate: IterateConfig = field(default_factory=IterateConfig)

    def section(self, name: str) -> dict:
        return dataclasses.asdict(getattr(self, name))

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


SECTION_TYPES = {"task": TaskConfig, "generate": GenerateConfig, "vllm": VLLMConfig,
                 "filter": FilterConfig, "train": TrainConfig, "eval": EvalConfig,
                 "ray": RayConfig, "iterate": IterateConfig}
VALID_SYSTEMS = ["teacher", "base", "predict", "explain"]


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _coerce(value: Any, tp: Any, where: str, errors: list[str]) -> Any:
    """Check `value` against the annotation `tp`; ints are accepted where floats are."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        return _coerce(value, inner[0], where, errors)
    if origin is list:
        (item_tp,) = typing.get_args(tp)
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            value = [value]
        if not isinstance(value, list):
            errors.append(f"{where}: expected a list, got {value!r}")
            return value
        return [_coerce(v, item_tp, f"{where}[{i}]", errors) for i, v in enumerate(value)]
    if tp is bool:
        if isinstance(value, bool):
            return value
    elif tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str) and re.fullmatch(r"[-+]?\d+(\.\d*)?[eE][-+]?\d+", value.strip()):
            return float(value)  # YAML 1.1 reads 3e-3 (no dot) as a string
    elif tp is str:
        if isinstance(value, str):
            return value
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return str(value)
    elif tp is dict:
        if isinstance(value, dict) and all(isinstance(k, str) for k in value):
            return dict(value)
        if value is None:
            return {}
    else:
        return value
    errors.append(f"{where}: expected {_type_name(tp)}, got {value!r}")
    return value


def _check_range(value: Any, meta: dict, where: str, errors: list[str]) -> None:
    if value is None:
        return
    values = value if isinstance(value, list) else [value]
    choices = meta.get("choices")
    if isinstance(choices, Registry):
        choices = sorted(choices.names())
    for v in values:
        if choices and v not in choices:
            errors.append(f"{where}: {v!r} is not allowed; {did_you_mean(str(v), choices)}")
        if not isinstance(v, (int, float)) or isinstance(v, bool):
            continue
        for key, ok, text in (("ge", lambda a, b: a >= b, ">="), ("le", lambda a, b: a <= b, "<="),
                              ("gt", lambda a, b: a > b, ">"), ("lt", lambda a, b: a < b, "<")):
            bound = meta.get(key)
            if bound is not None and not ok(v, bound):
                errors.append(f"{where}: {v!r} is out of range, it must be {text} {bound}")


def _build_section(name: str, raw: dict, errors: list[str]):
    """The section `name` built from `raw` (its problems appended to `errors`), or None."""
    cls = SECTION_TYPES[name]
    known = [f.name for f in dataclasses.fields(cls)]
    for key in raw:
        if key not in known:
            errors.append(f"unknown key '{name}.{key}'; {did_you_mean(key, known)}")
    try:
        return cls(**{k: v for k, v in raw.items() if k in known})
    except ConfigError as e:
        errors.extend(e.errors)
        return None


def _is_mapping(section: str, key: str) -> bool:
    """Whether `section.key` is a mapping (its fields can be set one by one)."""
    cls = SECTION_TYPES.get(section)
    hints = typing.get_type_hints(cls) if cls else {}
    return hints.get(key) is dict


def parse_override(text: str) -> tuple[list[str], Any]:
    """`section.key=value` -> (["section", "key"], value parsed as YAML)."""
    if "=" not in text:
        raise ConfigError([f"override '{text}' is not of the form section.key=value"])
    key, _, raw = text.partition("=")
    value = yaml.safe_load(raw) if raw.strip() else ""
    return key.strip().split("."), value


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> Config:
    """Read a YAML run config, apply `section.key=value` overrides, validate everything."""
    errors: list[str] = []
    raw: dict = {}
    source = str(path) if path else None
    if path is not None:
        from pipeline.shipped import shipped

        p = shipped(path)
        if not p.is_file():
            raise ConfigError([f"config file '{path}' does not exist; the shipped ones are in "
                               "configs/ (e.g. configs/demo.yaml)"])
        try:
            raw = yaml.safe_load(p.read_text(encoding="utf-8")) or {}
        except yaml.YAMLError as e:
            raise ConfigError([f"not valid YAML: {e}"], source) from None
        except UnicodeDecodeError as e:
            raise ConfigError([f"the file is not UTF-8 text (byte {e.start}: "
                               f"{e.object[e.start:e.start + 1]!r}), so it cannot be a YAML "
                               "config; give the run's YAML file, e.g. configs/demo.yaml"],
                              source) from None
        except OSError as e:
            raise ConfigError([f"cannot be read: {e.strerror or e}"], source) from None
        if not isinstance(raw, dict):
            raise ConfigError(["the file must hold a mapping of sections"], source)
    raw = {k: (dict(v) if isinstance(v, dict) else v) for k, v in raw.items()}
    for text in overrides or []:
        try:
            keys, value = parse_override(text)
        except ConfigError as e:
            errors.extend(e.errors)
            continue
        nested = len(keys) == 3 and _is_mapping(keys[0], keys[1])
        if len(keys) != 2 and not nested:
            errors.append(f"override '{text}': the key must be section.key, e.g. "
                          "filter.min_steps=2 (section.key.field for a mapping such as "
                          "train.args.optim=adafactor)")
            continue
        raw.setdefault(keys[0], {})
        if not isinstance(raw[keys[0]], dict):
            continue
        if nested:
            inner = raw[keys[0]].get(keys[1])
            raw[keys[0]][keys[1]] = {**(inner if isinstance(inner, dict) else {}),
                                     keys[2]: value}
        else:
            raw[keys[0]][keys[1]] = value
    sections = {}
    for name, body in raw.items():
        if name not in SECTION_TYPES:
            errors.append(f"unknown section '{name}'; {did_you_mean(name, list(SECTION_TYPES))}")
            continue
        if body is None:
            body = {}
        if not isinstance(body, dict):
            errors.append(f"section '{name}' must be a mapping of keys, got {body!r}")
            continue
        section = _build_section(name, body, errors)
        if section is not None:
            sections[name] = section
    if errors:
        raise ConfigError(errors, source)
    return Config(**sections)


def describe(cls: type) -> str:
    """Every key of a section as it is set (`section.key`), with its default and help text
    (for `distill config --keys`)."""
    lines = []
    for f in dataclasses.fields(cls):
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        lines.append(f"  {cls.NAME}.{f.name} = {default!r}\n      {f.metadata.get('help', '')}")
    return "\n".join(lines)
