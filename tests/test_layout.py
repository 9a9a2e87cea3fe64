"""The rooms of the code and what each may import (the README's Layout), checked on the
imports themselves: no module imports from a room above its own, and no imports go round in a
circle."""

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# room -> the rooms it may import from (besides itself); order = from the top floor down
BELOW_STAGES = {"stages/backends", "stages/checks", "trainer", "pipeline"}
STAGES = {"stages/generate", "stages/filter", "stages/train", "stages/eval"}
ROOMS = {
    "stages/commands": {"stages/iterate", *STAGES, *BELOW_STAGES},
    "stages/iterate": {*STAGES, *BELOW_STAGES},
    **{stage: set(BELOW_STAGES) for stage in STAGES},
    "stages": set(),
    "stages/backends": {"pipeline"},
    "stages/checks": {"pipeline"},
    "trainer": {"pipeline"},
    "pipeline": set(),
}
# where one stage needs another's output, the one named edge it may take: the filter reads
# generate's rounds (which rounds exist, their parts and checksums)
EDGES = {("stages/filter", "stages.generate.rounds")}


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
            if target != room and target not in ROOMS[room] and (room, imported) not in EDGES:
                wrong.append(f"{name} ({room}) imports {imported} ({target})")
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


def test_stages_holds_one_package_per_stage_and_no_loose_module():
    """A helper lives in the package of the stage it serves (or one floor down, shared)."""
    loose = sorted(p.name for p in (ROOT / "stages").glob("*.py") if p.name != "__init__.py")
    assert not loose, f"loose modules in stages/: {loose}"
    packages = {p.name for p in (ROOT / "stages").iterdir() if (p / "__init__.py").exists()}
    assert packages == {"generate", "filter", "train", "eval", "iterate", "backends", "checks",
                        "commands"}
    assert {f"stages/{p}" for p in packages} <= set(ROOMS)


def test_no_function_is_longer_than_a_reader_can_hold():
    """No function of the code is over 100 lines (split where a reader needs a name)."""
    long = []
    for name, path in _modules().items():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                lines = node.end_lineno - node.lineno + 1
                if lines > 100:
                    long.append(f"{name}.{node.name}: {lines} lines")
    assert not long, "\n".join(long)
