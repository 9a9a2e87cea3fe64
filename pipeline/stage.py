"""What a stage is: a plan of shards, a function over one shard, and what its manifest records.

A stage declares what decides its output (`fingerprinted`, hashed into its fingerprint), its
input shards (each with a checksum of its content) and a shard function

    work(settings, shard, resources, progress) -> ShardOutput

that turns one input shard into output tables, counters and facts, using only its arguments:
no hidden state, so the same function runs in a loop, in a worker process or in a test on an
in-memory table. `resources` (a teacher backend, a tokenizer) are built by the stage's factory,
which an executor calls once per worker; `progress` reports rows done and running counts.
How shards are run, reused, written and committed is the executors' business
(`pipeline.executors`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Protocol

import pyarrow as pa

from pipeline.fingerprints import fingerprint


@dataclass
class Shard:
    """One unit of work: its name, a checksum of its content, its size and how to load it."""

    name: str
    checksum: str
    rows: int
    load: Callable[[], pa.Table]
    # its earlier output tables by kind, when it is redone on purpose (`Stage.redo`)
    previous: Callable[[], dict[str, pa.Table]] | None = None
    previous_counters: dict | None = None

    @classmethod
    def of(cls, name: str, table: pa.Table, checksum: str = "") -> "Shard":
        """A shard over a table already in memory."""
        return cls(name, checksum, table.num_rows, lambda: table)


@dataclass
class ShardOutput:
    """What a shard function returns: one table per output kind, counters summed over the
    stage's shards, facts for the manifest (a teacher's name and tokenizer, say), and folders
    it built on this machine's disk (a trained adapter, by its name in `Stage.folders`), which
    the executor moves into the stage folder, file by file recorded."""

    tables: dict[str, pa.Table]
    counters: dict[str, float] = field(default_factory=dict)
    facts: dict = field(default_factory=dict)
    folders: dict[str, Path] = field(default_factory=dict)


class Progress(Protocol):
    def __call__(self, rows: int = 0, **counts: float) -> None:
        """`rows` more rows are done; `counts` add to running totals shown beside the bar."""


def no_progress(rows: int = 0, **counts: float) -> None:
    """A `Progress` that shows nothing (a shard function called on its own)."""


ShardFn = Callable[[Any, Shard, Any, Progress], ShardOutput]


def output_file(kind: str, shard: str) -> str:
    """The file a shard's output of one kind is written to."""
    return f"{kind}-{shard}.parquet"


@dataclass
class Stage:
    """Everything an executor needs to run a stage.

    name (`str`): the stage folder inside the run (`generate`, `eval`).
    fingerprinted (`dict`): what decides the output; hashed into `fingerprint`, recorded in the
        plan and the manifest (as `settings`), and compared key by key when it changes.
    shards (`list[Shard]`): the input, in order.
    work (`ShardFn`) and settings: the shard function and what it gets as its first argument
        (the stage's settings object: its config section and what the plan resolved).
    outputs (`list[str]`): the output kinds; each shard writes `output_name(kind, shard)`
        (by default `<kind>-<shard>.parquet`).
    folders (`tuple[str, ...]`): folders a shard function builds (train's `adapter`), each
        published into the stage folder under its name.
    resources: a factory the executor calls once per worker, before the first shard that has
        to be done (never when every shard is reused); `close()` is called on what it built.
    facts (`dict`): facts known before any shard runs; shard facts are added to them.
    upstream (`dict`): what the stage read, for the manifest.
    finalize: called with the manifest before it is written (to derive facts from counters).
    prune: remove output files of shards that are no longer planned.
    rates: counts shown per second beside the progress bar (others as totals).
    paid: the outputs cost money or accelerator time (generate): a shard's outputs that are
        about to be remade are set aside first, never overwritten.
    redo: given a finished shard's record (counters, facts), whether to do it again anyway
        (`--retry-failed`: shards with failed rows); the shard function then gets the record
        as `shard.previous`.
    """

    name: str
    fingerprinted: dict
    shards: list[Shard]
    work: ShardFn
    settings: Any
    outputs: list[str]
    folders: tuple[str, ...] = ()
    resources: Callable[[], Any] | None = None
    facts: dict = field(default_factory=dict)
    upstream: dict | None = None
    finalize: Callable[[dict], None] | None = None
    prune: bool = True
    rates: tuple[str, ...] = ()
    unit: str = "row"
    output_name: Callable[[str, str], str] = output_file
    paid: bool = False
    redo: Callable[[dict], bool] | None = None

    @property
    def fingerprint(self) -> str:
        return fingerprint(self.fingerprinted)
