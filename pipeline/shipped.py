"""The files that ship inside the package (`pipeline/resources/`): the configs and the prompt
templates, so that an installed `distill` works in any folder. In the repository `configs/` and
`data/prompts/` point at them."""

from __future__ import annotations

from pathlib import Path

RESOURCES = Path(__file__).parent / "resources"


def shipped(path: str | Path) -> Path:
    """`path` where it exists (relative to the current folder); else, for a relative path
    such as `configs/demo.yaml` or `data/prompts/arithmetic_cot.txt`, the copy shipped in the
    package when there is one; else `path` unchanged (the caller says it is missing)."""
    p = Path(path).expanduser()
    if p.exists() or p.is_absolute():
        return p
    packaged = RESOURCES / p
    return packaged if packaged.exists() else p
