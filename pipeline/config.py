"""Run configuration: one YAML file per run, a section per stage, `key=value` overrides.

Every field carries its help text and its allowed range. A section checks itself when it is
built, in code as from a file: its types, ranges and the rules between its fields, raising one
`ConfigError` that lists every problem at once; `load_config` also reports unknown keys and the
problems of every section together.

A section is declared beside the code that reads it (`SECTION_HOMES` names where); this module
holds the machinery and the one section no stage owns, `task`.
"""

from __future__ import annotations

import copy
import dataclasses
import importlib
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import yaml

from pipeline.registry import ANSWER_KINDS, Registry, did_you_mean


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


# Each section is declared beside the code that reads it (fields, help, checks, fingerprint
# rules); the loader finds it in the module named here, imported the first time settings are
# built (as the registries import their packages), and lists the sections in this order.
SECTION_HOMES = {"task": "pipeline.config", "generate": "stages.generate.settings",
                 "vllm": "stages.backends.vllm_engine", "filter": "stages.checks.settings",
                 "train": "trainer.settings", "eval": "stages.eval.settings",
                 "ray": "pipeline.executors.ray", "iterate": "stages.iterate.settings"}


def section_type(name: str) -> type:
    """The class of section `name`: the `Section` of its home module whose NAME it is (or, for
    a section that others add fields to, what its `joined()` makes of it)."""
    module = importlib.import_module(SECTION_HOMES[name])
    (cls,) = [v for v in vars(module).values() if isinstance(v, type) and issubclass(v, Section)
              and v.NAME == name and v.__module__ == module.__name__]
    return cls.joined() if hasattr(cls, "joined") else cls


def section_types() -> dict[str, type]:
    """name -> class of every section, in the order of `SECTION_HOMES`."""
    return {name: section_type(name) for name in SECTION_HOMES}


class Config:
    """A run's settings: one checked section per name of `SECTION_HOMES`, as attributes
    (`cfg.train.seed`); a section not given takes its defaults."""

    def __init__(self, **sections: Section):
        types_ = section_types()
        unknown = sorted(set(sections) - set(types_))
        if unknown:
            raise TypeError(f"unknown config section(s) {unknown}; known: {list(types_)}")
        for name, cls in types_.items():
            setattr(self, name, sections[name] if name in sections else cls())

    def sections(self) -> dict[str, Section]:
        return {name: getattr(self, name) for name in SECTION_HOMES}

    def replace(self, **sections: Section) -> "Config":
        """A copy with the sections given replaced."""
        return Config(**{**self.sections(), **sections})

    def section(self, name: str) -> dict:
        return dataclasses.asdict(getattr(self, name))

    def to_dict(self) -> dict:
        return {name: dataclasses.asdict(s) for name, s in self.sections().items()}

    def __eq__(self, other) -> bool:
        return isinstance(other, Config) and self.sections() == other.sections()

    def __repr__(self) -> str:
        return f"Config({', '.join(f'{k}={v!r}' for k, v in self.sections().items())})"


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
    cls = section_type(name)
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
    cls = section_type(section) if section in SECTION_HOMES else None
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
        if name not in SECTION_HOMES:
            errors.append(f"unknown section '{name}'; {did_you_mean(name, list(SECTION_HOMES))}")
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
