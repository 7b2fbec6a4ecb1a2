"""The layout shows the architecture, and the imports keep to it (see ARCHITECTURE.md).

Every module of ``gateway/`` belongs to a layer; a module imports only from its own layer or a
lower one (an import anywhere in the file counts, at the top or inside a function), and no
modules import each other in a circle. Built-in plugins use the gateway but never each other.
Walked with ``ast``: nothing is imported to check it.
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
GATEWAY = ROOT / "gateway"

# Lowest first. A module's layer is that of the longest prefix of its dotted name listed here.
LAYERS = [
    {"gateway", "gateway.config", "gateway.errors", "gateway.hookspecs", "gateway.metrics", "gateway.progress",
     "gateway.logs"},
    {"gateway.security"},
    {"gateway.storage"},
    {"gateway.kubo"},
    {"gateway.core"},
    {"gateway.http"},
    {"gateway.cli", "gateway.__main__", "gateway.devcluster", "gateway.workers"},
]


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def layer_of(module: str) -> int:
    best, found = -1, None
    for index, names in enumerate(LAYERS):
        for name in names:
            if (module == name or module.startswith(name + ".")) and len(name) > best:
                best, found = len(name), index
    assert found is not None, f"{module} is in no layer: add it to LAYERS (and ARCHITECTURE.md)"
    return found


def imports(path: Path) -> set[str]:
    """Every ``gateway...``/``plugins...`` module the file imports, relative imports resolved."""
    package = module_name(path) if path.name == "__init__.py" else module_name(path).rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[:len(base) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            found.add(target)
            # ``from . import chain`` imports the module ``package.chain``
            found |= {f"{target}.{alias.name}" for alias in node.names
                      if (ROOT / Path(*f"{target}.{alias.name}".split("."))).with_suffix(".py").exists()}
    return {m for m in found if m.split(".")[0] in ("gateway", "plugins")}


def modules() -> dict[str, Path]:
    return {module_name(p): p for p in GATEWAY.rglob("*.py")}


def test_no_import_from_a_higher_layer():
    wrong = []
    for name, path in modules().items():
        for target in imports(path):
            if target.startswith("plugins"):
                wrong.append(f"{name} imports {target}: the gateway knows plugins only through pluggy")
            elif layer_of(target) > layer_of(name):
                wrong.append(f"{name} (layer {layer_of(name)}) imports {target} (layer {layer_of(target)})")
    assert not wrong, "\n".join(wrong)


def test_no_import_circles():
    known = modules()
    graph = {name: {t for t in imports(path) if t in known and t != name} for name, path in known.items()}
    # a package's __init__ re-exporting its own modules is not a circle through them
    graph = {n: {t for t in ts if not (n == t.rpartition(".")[0] and (GATEWAY.parent / Path(*n.split(".")) / "__init__.py").exists())}
             for n, ts in graph.items()}
    index, low, stack, on_stack, circles = {}, {}, [], set(), []

    def visit(node: str) -> None:  # Tarjan's strongly connected components
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for nxt in graph[node]:
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in on_stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                circles.append(sorted(component))

    for node in graph:
        if node not in index:
            visit(node)
    assert not circles, f"import circles: {circles}"


def test_builtin_plugins_do_not_import_each_other():
    for path in (ROOT / "plugins").glob("*.py"):
        others = {t for t in imports(path) if t.startswith("plugins")}
        assert not others, f"{path.name} imports {others}"


def test_the_core_knows_no_http():
    for name, path in modules().items():
        if layer_of(name) <= layer_of("gateway.core"):
            text = path.read_text()
            assert "from aiohttp import web" not in text and "aiohttp.web" not in text, name


def test_the_check_can_fail():
    """The walk sees imports the way they are written (relative, inside functions)."""
    found = imports(GATEWAY / "http" / "app.py")
    assert "gateway.core.service" in found and "gateway.http.rest" in found
    assert layer_of("gateway.http.rest") > layer_of("gateway.core.service")
