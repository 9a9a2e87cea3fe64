"""Registries: the one list of each kind of extension (teacher backends, executors, student
kinds, answer extractors), filled by the extensions themselves.

A registry knows the package its members live in by name. The first time its names are asked
for, every module of that package is imported, and each module registers what it defines
(`REGISTRY.register(thing)`), so adding a backend, an executor or a student kind is one new file
in its package: no list elsewhere to extend, and the settings take their choices from here
(`pipeline.config`), so a list of names exists once. The package is imported by name, so the
ground floor never imports the rooms above it; a member's module must be cheap to import
(heavy libraries are imported where they are used).
"""

from __future__ import annotations

import difflib
import importlib
import pkgutil
from typing import Generic, Iterator, TypeVar

T = TypeVar("T")


class UnknownName(ValueError):
    """A name that no member of a registry has (the message lists the ones there are)."""


def did_you_mean(name: str, options: list[str]) -> str:
    """'did you mean 'x'? available: a, b, c' for an unknown `name`."""
    close = difflib.get_close_matches(name, options, n=1, cutoff=0.6)
    hint = f"did you mean '{close[0]}'? " if close else ""
    return f"{hint}available: {', '.join(options)}"


class Registry(Generic[T]):
    """The members of one kind, by their `name`, in the order they registered.

    what (`str`): what a member is, for messages ("teacher backend").
    home (`str`): the package whose modules register the members (imported on first use).
    """

    def __init__(self, what: str, home: str):
        self.what, self.home = what, home
        self._members: dict[str, T] = {}
        self._loaded = False

    def register(self, member: T) -> T:
        """Add `member` (anything with a `name`); usable as a class decorator."""
        name = getattr(member, "name")
        there = self._members.get(name)
        if there is not None and there is not member and _origin(there) != _origin(member):
            raise ValueError(f"two {self.what}s are named {name!r}: {_origin(there)} and "
                             f"{_origin(member)}")
        self._members[name] = member
        return member

    def unregister(self, name: str) -> None:
        """Take a member out again (a test's throwaway extension)."""
        self._members.pop(name, None)

    def load(self) -> None:
        """Import every module of the home package once, so that each registers its members."""
        if self._loaded:
            return
        self._loaded = True
        package = importlib.import_module(self.home)
        for info in sorted(pkgutil.iter_modules(package.__path__), key=lambda i: i.name):
            importlib.import_module(f"{self.home}.{info.name}")

    def rescan(self) -> None:
        """Import the package's modules again (those not imported yet): for a file that
        joined the package after the first look (a test's throwaway extension)."""
        self._loaded = False
        self.load()

    def names(self) -> list[str]:
        self.load()
        return list(self._members)

    def get(self, name: str, setting: str = "") -> T:
        """The member called `name`; an unknown name says the ones there are (and which
        setting chose it)."""
        self.load()
        if name not in self._members:
            where = f"{setting}: " if setting else ""
            raise UnknownName(f"{where}unknown {self.what} {name!r}; "
                              f"{did_you_mean(str(name), sorted(self._members))}")
        return self._members[name]

    def __contains__(self, name: str) -> bool:
        self.load()
        return name in self._members

    def __iter__(self) -> Iterator[T]:
        self.load()
        return iter(list(self._members.values()))


def _origin(member) -> str:
    kind = member if isinstance(member, type) else type(member)
    module = getattr(member, "__module__", None) or kind.__module__
    return f"{module}.{getattr(member, '__qualname__', getattr(member, 'name', '?'))}"


# The registries of the house, filled by the files of their packages.
BACKENDS: Registry = Registry("teacher backend", "stages.backends")
EXECUTORS: Registry = Registry("executor", "pipeline.executors")
STUDENT_KINDS: Registry = Registry("student kind", "trainer.students")
EXTRACTORS: Registry = Registry("answer extractor", "stages.checks")
ANSWER_KINDS: Registry = Registry("answer kind", "stages.checks")
