"""The rooms of the code and what each may import (the README's Layout), checked on the
imports themselves: no module imports from a room above its own, and no imports go round in a
circle."""

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# room -> the rooms it may import from (besides itself); order = from the top floor down
ROOMS = {
    "stages/commands": {"stages", "stages/backends", "stages/checks", "trainer", "pipeline"},
    "stages": {"stages/backends", "stages/checks", "trainer", "pipeline"},
    "stages/backends": {"pipeline"},
    "stages/checks": {"pipeline"},
    "trainer": {"pipeline"},
    "pipeline": set(),
}
STAGE_MODULES = {"stages.generate", "stages.filter", "stages.train", "stages.eval"}


def _room(module: str) -> str:
    parts = module.split(".")
    for depth in (2, 1):
        room = "/".join(parts[:depth])
        if room in ROOMS:
            return room
    raise AssertionError(f"{module} is in no room of the layout")


def _modules() -> dict[str, Path]:
    found = {}
    for top in ("pipeline", "stages", "trainer"):
        for path in (ROOT / top).rglob("*.py"):
            parts = list(path.relative_to(ROOT).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            found[".".join(parts)] = path
    return found


def _imported(path: Path) -> list[tuple[str, list[str]]]:
    """(module, names taken from it) for every absolute import of the file, at the top or
    inside functions."""
    out = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out += [(a.name, []) for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            out.append((node.module, [a.name for a in node.names]))
    return out


def _imports(path: Path, modules: set[str]) -> set[str]:
    """Our modules imported by the file."""
    out = set()
    for module, names in _imported(path):
        out |= {n for n in [module] + [f"{module}.{x}" for x in names] if n in modules}
    return out


def test_every_import_of_ours_names_a_module_that_exists():
    """An import inside a function runs only when it is reached: a stale one would fail then."""
    modules = _modules()
    stale = [f"{name} imports {module}" for name, path in modules.items()
             for module, _ in _imported(path)
             if module.split(".")[0] in ("pipeline", "stages", "trainer") and module not in modules]
    assert not stale, "\n".join(stale)


def test_every_import_points_down_the_layout():
    modules = _modules()
    wrong = []
    for name, path in modules.items():
        room = _room(name)
        for imported in _imports(path, set(modules)):
            target = _room(imported)
            if target != room and target not in ROOMS[room]:
                wrong.append(f"{name} ({room}) imports {imported} ({target})")
            if name in STAGE_MODULES and imported in STAGE_MODULES - {name}:
                wrong.append(f"{name} imports another stage, {imported}")
    assert not wrong, "\n".join(wrong)


def test_no_circles():
    modules = _modules()
    graph = {name: {i for i in _imports(path, set(modules)) if i != name
                    and not name.startswith(i + ".")}  # a package's own __init__ is no edge
             for name, path in modules.items()}
    state: dict[str, int] = {}

    def visit(node: str, trail: list[str]) -> None:
        state[node] = 1
        for nxt in graph[node]:
            if state.get(nxt) == 1:
                raise AssertionError("import circle: " + " -> ".join(
                    trail[trail.index(nxt):] + [node, nxt]) if nxt in trail else
                    f"import circle through {node} -> {nxt}")
            if nxt not in state:
                visit(nxt, trail + [node])
        state[node] = 2

    for node in graph:
        if node not in state:
            visit(node, [])
