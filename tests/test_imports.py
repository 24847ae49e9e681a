"""qtune's import graph, read with ``ast``: no cycles, and nothing below the CLI imports ``qtune.cli``.

Every ``import``/``from ... import`` counts, at module level and inside functions, except those under
``if TYPE_CHECKING:``. ``from pkg import name`` counts as importing ``pkg.name`` when that is a module,
else ``pkg``. Importing a package also runs its ``__init__``, but that edge is not added: a module that
imports ``qtune.formats.base`` does not depend on everything ``qtune.formats`` re-exports.
"""
from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = {"qtune": ROOT / "qtune", "qtune.kernels": ROOT / "kernels"}  # kernels/ installs as qtune.kernels
ENTRY_POINTS = {"qtune.__main__"}  # `python -m qtune` is the CLI

# What is left, named exactly so that a new one fails, and so does fixing one of these (then delete its line):
KNOWN_CLI_IMPORTS: list[str] = []


def _modules() -> dict[str, Path]:
    out = {}
    for prefix, folder in PACKAGES.items():
        for file in folder.rglob("*.py"):
            parts = list(file.relative_to(folder).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts.pop()
            out[".".join([prefix, *parts])] = file
    return out


def _type_checking_nodes(tree: ast.AST) -> set[int]:
    skip: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            skip.update(id(n) for child in node.body for n in ast.walk(child))
    return skip


def _resolve(module: str, is_package: bool, node: ast.ImportFrom) -> str:
    if not node.level:
        return node.module or ""
    base = module.split(".") if is_package else module.split(".")[:-1]
    base = base[: len(base) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


def import_graph() -> dict[str, set[str]]:
    """``{module: {qtune modules it imports}}``."""
    modules = _modules()
    graph: dict[str, set[str]] = {m: set() for m in modules}
    for name, file in modules.items():
        tree = ast.parse(file.read_text(encoding="utf-8"))
        skip = _type_checking_nodes(tree)
        is_package = file.name == "__init__.py"
        for node in ast.walk(tree):
            if id(node) in skip:
                continue
            targets: list[str] = []
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = _resolve(name, is_package, node)
                targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base for a in node.names]
            for t in targets:
                while t and t not in modules and "." in t:  # `import qtune.ops.linear` style
                    t = t.rsplit(".", 1)[0]
                if t in modules and t != name:
                    graph[name].add(t)
    return graph


def find_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """One cycle per strongly connected component with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    comps: list[list[str]] = []
    counter = [0]

    def visit(v: str) -> None:
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                comps.append(sorted(comp))

    import sys

    sys.setrecursionlimit(max(sys.getrecursionlimit(), 10_000))
    for v in sorted(graph):
        if v not in index:
            visit(v)
    return comps


def test_the_graph_sees_known_edges():
    graph = import_graph()
    assert "qtune.formats.base" in graph["qtune.formats.nf4"]
    assert "qtune.ops.linear" in graph["qtune.nn.base"]
    assert "qtune.cli.quantize" in graph["qtune.cli.main"] or graph["qtune.cli.main"]


def test_no_import_cycles():
    cycles = find_cycles(import_graph())
    assert not cycles, "import cycles (each list is one strongly connected component):\n" + "\n".join(
        " <-> ".join(c) for c in cycles)


def test_nothing_below_the_cli_imports_it():
    graph = import_graph()
    bad = sorted(f"{m} imports {t}" for m, ts in graph.items() for t in ts
                 if t.startswith("qtune.cli") and not m.startswith("qtune.cli") and m not in ENTRY_POINTS)
    assert bad == KNOWN_CLI_IMPORTS, "\n".join(bad)
