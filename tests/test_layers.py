"""The import graph of engine/: no cycles, and every import runs down the layer order of
docs/DESIGN-NOTES.md ("Layers"). Every import counts: module level, inside functions, under
TYPE_CHECKING. A module may import its own layer or any layer below it, never one above."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1] / "engine"

NOTES = ROOT.parent / "docs" / "DESIGN-NOTES.md"


def read_layers(text: str) -> dict[str, tuple[str, ...]]:
    """The layer table of DESIGN-NOTES ("## Layers"), lowest first: `| layer | `a`, `pkg/` |` rows, each
    name a module of engine/ or (`engine/model/`, `model/`) a package and everything under it. The
    document is the one list: this test reads it rather than keeping a second copy."""
    section = text.split("\n## Layers\n", 1)[1].split("\n## ", 1)[0]
    layers: dict[str, tuple[str, ...]] = {}
    for line in section.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) != 2 or cells[0] in ("layer", "---") or "`" not in cells[1]:
            continue
        names = [n.strip().strip("`").removeprefix("engine/").rstrip("/") for n in cells[1].split(",")]
        layers[cells[0]] = tuple(f"engine.{n.replace('/', '.')}" for n in names)
    return layers


LAYERS = read_layers(NOTES.read_text())
ORDER = list(LAYERS)


def modules() -> dict[str, Path]:
    found = {}
    for path in ROOT.rglob("*.py"):
        name = ".".join(path.relative_to(ROOT.parent).with_suffix("").parts).removesuffix(".__init__")
        found[name] = path
    return found


def resolve(name: str, known: dict[str, Path]) -> str | None:
    while name and name not in known:
        name = name.rpartition(".")[0]
    return name or None


def import_graph() -> dict[str, set[str]]:
    """module -> the engine modules it imports. `from . import x` names module x when x is one,
    and the package otherwise (Python imports a parent package for every submodule import anyway)."""
    known = modules()
    graph: dict[str, set[str]] = {m: set() for m in known}
    for mod, path in known.items():
        package = mod if path.name == "__init__.py" else mod.rpartition(".")[0]
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                if node.level:
                    parts = package.split(".")
                    anchor = ".".join(parts[: len(parts) - node.level + 1])
                    base = f"{anchor}.{node.module}" if node.module else anchor
                else:
                    base = node.module or ""
                subs = [f"{base}.{a.name}" for a in node.names if f"{base}.{a.name}" in known]
                targets = subs if len(subs) == len(node.names) else [*subs, base]
            else:
                continue
            for target in targets:
                found = resolve(target, known)
                if found and found != mod and found.split(".")[0] == "engine":
                    graph[mod].add(found)
    return graph


def layer_of(mod: str) -> int | None:
    for i, names in enumerate(LAYERS.values()):
        if any(mod == n or mod.startswith(n + ".") for n in names):
            return i
    return None


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    out: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in graph:
        if v not in index:
            visit(v)
    return out


def test_no_import_cycles() -> None:
    assert cycles(import_graph()) == []


def test_every_module_has_a_layer() -> None:
    unplaced = [m for m in modules() if m != "engine" and layer_of(m) is None]
    assert unplaced == [], "add these modules to the layer table of docs/DESIGN-NOTES.md"


def test_the_package_root_imports_only_its_version_and_noise_filters() -> None:
    # the API resolves lazily (types: __init__.pyi); noise.py is logging filters, importing nothing of engine
    assert import_graph()["engine"] == {"engine.version", "engine.noise"}
    assert import_graph()["engine.noise"] == set()


def test_imports_run_down_the_layers() -> None:
    graph = import_graph()
    upward = sorted(
        f"{m} ({ORDER[layer_of(m) or 0]}) -> {t} ({ORDER[layer_of(t) or 0]})"
        for m, targets in graph.items()
        for t in targets
        if m != "engine" and t != "engine" and (layer_of(t) or 0) > (layer_of(m) or 0)
    )
    assert upward == []


def test_the_layer_table_is_read_from_the_design_notes() -> None:
    assert list(LAYERS) == ["base", "model", "compute", "pipeline", "runtime", "apps", "cli"]
    assert "engine.model" in LAYERS["model"] and "engine.clock" in LAYERS["base"]
    known = modules()
    stale = [n for names in LAYERS.values() for n in names if n not in known]
    assert stale == [], "the table names modules that do not exist"
    table = (
        "x\n## Layers\n\n| layer | modules |\n| --- | --- |\n| base | `errors`, `engine/model/` |\n## Next\n"
    )
    assert read_layers(table) == {"base": ("engine.errors", "engine.model")}


def test_the_checker_sees_a_cycle_and_an_upward_import(tmp_path: Path) -> None:
    """The negative control: the graph reader would catch what it is meant to catch."""
    graph = {"engine.a": {"engine.b"}, "engine.b": {"engine.a"}, "engine.c": set()}
    assert cycles(graph) == [["engine.a", "engine.b"]]
    assert layer_of("engine.cli") > layer_of("engine.pipeline")  # type: ignore[operator]
    assert "engine.sampling" in import_graph()["engine.pipeline"]  # `from . import sampling` is seen
