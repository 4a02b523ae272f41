"""No import circles: the graph of `import` / `from` statements between polymodal modules, read from the
source (statements inside functions included: a lazy import that only dodges a circle is still a circle)."""
from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "polymodal"


def module_files(root: Path = PACKAGE) -> dict[str, Path]:
    """Dotted module name -> file, for every ``.py`` under `root` (packages named by their ``__init__``)."""
    out = {}
    for path in sorted(root.rglob("*.py")):
        parts = list(path.relative_to(root.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = path
    return out


def _resolve(name: str, modules: dict[str, Path]) -> str | None:
    """The deepest module of `modules` that `name` (a module or ``module.attribute``) lives in."""
    while name and name not in modules:
        name = name.rpartition(".")[0]
    return name or None


def import_graph(modules: dict[str, Path]) -> dict[str, set[str]]:
    """Module -> the modules of `modules` it imports, anywhere in its file (functions included).

    ``from a.b import c`` points at ``a.b.c`` when that is a module, else at ``a.b``; relative imports are
    resolved against the importing module's package. Importing a module's parent packages is not counted
    (Python runs their ``__init__`` first, but a package file that imports nothing cannot close a circle).
    """
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        edges = set()
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), str(path))):
            targets = []
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    anchor = package.split(".")
                    anchor = anchor[: len(anchor) - (node.level - 1)]
                    base = ".".join(anchor + ([base] if base else []))
                targets = [f"{base}.{alias.name}" for alias in node.names]
            for target in targets:
                found = _resolve(target, modules)
                if found is not None and found != name:
                    edges.add(found)
        graph[name] = edges
    return graph


def find_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan), each sorted; sorted list."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    out: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph.get(v, ())):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                out.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return sorted(out)


def test_find_cycles_sees_a_circle_through_a_function_level_import(tmp_path):
    pkg = tmp_path / "pkg"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "a.py").write_text("from .b import x\n")
    (pkg / "b.py").write_text("def f():\n    from pkg.c import y\n")
    (pkg / "c.py").write_text("import pkg.a\n")
    (pkg / "d.py").write_text("from . import a\n")
    graph = import_graph(module_files(pkg))
    assert graph["pkg.d"] == {"pkg.a"} and graph["pkg.b"] == {"pkg.c"}
    assert find_cycles(graph) == [["pkg.a", "pkg.b", "pkg.c"]]


def test_no_import_cycles_in_the_package():
    assert find_cycles(import_graph(module_files())) == []


# What a floor may not import (dependencies point down: data -> models -> losses -> methods -> train -> cli).
FORBIDDEN = {
    "polymodal.data": ("polymodal.models", "polymodal.losses", "polymodal.methods", "polymodal.train",
                       "polymodal.eval", "polymodal.hub", "polymodal.encode", "polymodal.search", "polymodal.cli"),
    "polymodal.models": ("polymodal.hub", "polymodal.losses", "polymodal.methods", "polymodal.train",
                         "polymodal.eval", "polymodal.encode", "polymodal.search", "polymodal.cli"),
    "polymodal.losses": ("polymodal.methods", "polymodal.train", "polymodal.eval", "polymodal.hub", "polymodal.cli"),
}


def test_floors_import_only_downwards():
    graph = import_graph(module_files())
    wrong = sorted((m, e) for m, edges in graph.items() for e in edges for floor, banned in FORBIDDEN.items()
                   if (m == floor or m.startswith(floor + ".")) and any(e == b or e.startswith(b + ".")
                                                                         for b in banned))
    assert wrong == []


def test_frame_shard_dataset_lives_in_data_and_the_method_reuses_it():
    from polymodal.data.frame_shards import FrameShardDataset
    from polymodal.methods.m2raap import FrameShardDataset as from_method
    assert from_method is FrameShardDataset and FrameShardDataset.__module__ == "polymodal.data.frame_shards"


if __name__ == "__main__":                      # print every circle in the package
    for cycle in find_cycles(import_graph(module_files())):
        print(" <-> ".join(cycle))
